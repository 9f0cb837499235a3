//! What xdplb's tests (`tests/`) and benchmarks (`lb-bench`) share, written
//! once: entering network namespaces, pinning to a CPU, building frames, a
//! live-frames traffic generator, the harness topology's lifecycle, and
//! reading `xdplb status` as typed data.

pub mod frames;
pub mod fuzz;
pub mod generator;
pub mod topology;

use std::{fs::File, path::Path, process::Command, thread};

use anyhow::{Context as _, Result, bail};
use xdplb::control::Status;

/// Moves the calling thread into a new network namespace of its own.
pub fn isolate_thread() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET): run as root")
}

/// Moves the calling thread into the named namespace (`/run/netns/NAME`).
pub fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| path.clone())?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))
}

/// Runs `f` on a thread inside namespace `ns`. Sockets made there stay in
/// that namespace whatever thread uses them later. A panic in `f` is resumed.
pub fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let ns = ns.to_string();
    thread::spawn(move || -> Result<T> {
        enter(&ns)?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Pins the calling thread to one CPU (test runs execute on the calling
/// CPU; per-CPU state such as the sequence cursor follows it).
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("sched_setaffinity")
}

/// `xdplb --socket SOCKET status --json`, through the CLI, as `Status`.
pub fn status_via_cli(xdplb: &Path, socket: &Path) -> Result<Status> {
    let out = Command::new(xdplb).arg("--socket").arg(socket).args(["status", "--json"]).output()?;
    if !out.status.success() {
        bail!("xdplb status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("xdplb status --json is not a Status")
}

/// A directory removed with everything in it on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
