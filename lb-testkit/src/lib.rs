//! What xdplb's tests (`tests/`) and benchmarks (`lb-bench`) share, written
//! once: entering network namespaces, pinning to a CPU, building frames, a
//! live-frames traffic generator, the harness topology's lifecycle, and
//! reading `xdplb status` as typed data, waiting for a condition.

pub mod frames;
pub mod fuzz;
pub mod generator;
pub mod topology;

use std::{
    fs::File,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

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

/// Polls `done` every `every` until it holds; panics with `what()` once
/// `within` has passed without it. The tests' bounded waits for an agent,
/// a registry or a server.
pub fn wait_until(within: Duration, every: Duration, mut done: impl FnMut() -> bool, what: impl FnOnce() -> String) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{} (waited {within:?})", what());
        thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        panic,
        time::{Duration, Instant},
    };

    use super::wait_until;

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let calls = Cell::new(0);
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                calls.get() == 3
            },
            String::new,
        );
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn wait_until_fails_with_its_message_after_the_time_given() {
        let started = Instant::now();
        let failed = panic::catch_unwind(|| {
            wait_until(Duration::from_millis(50), Duration::from_millis(5), || false, || "never".to_string())
        });
        let message = failed.unwrap_err().downcast::<String>().unwrap();
        assert!(message.starts_with("never (waited 50ms)"), "{message}");
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
