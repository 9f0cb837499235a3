//! Idempotent bootstrap of a fresh machine. Each step checks first and only
//! installs what is missing; nothing is downloaded as a prebuilt binary.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::exec;

/// Commands the tests and the demo run, and the Debian package of each.
const DEBIAN_PACKAGES: &[(&str, &str)] =
    &[("ip", "iproute2"), ("ethtool", "ethtool"), ("curl", "curl"), ("python3", "python3"), ("nsenter", "util-linux")];

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages()
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The eBPF crate builds core from source (-Z build-std) with nightly.
fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
        .context("the nightly toolchain is required for the eBPF program")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask setup: adding rust-src to nightly");
    exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker, built from crates.io against the libLLVM that ships with the
/// nightly toolchain (so both agree on the LLVM bitcode version). It links
/// that libLLVM dynamically, so it runs under `rustup run nightly`, which is
/// how aya-build calls it; after a nightly update it no longer loads and is
/// rebuilt.
fn bpf_linker() -> Result<()> {
    if bpf_linker_runs() {
        return Ok(());
    }
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?);
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib_dir.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| anyhow!("cannot read the LLVM version from {libllvm}"))?
        .to_string();
    let prefix = std::env::temp_dir().join(format!("xdplb-llvm-prefix-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)?;
    eprintln!("xtask setup: building bpf-linker against {libllvm} (about a minute)");
    exec(
        Command::new("cargo")
            .args(["+nightly", "install", "--force", "bpf-linker", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    if !bpf_linker_runs() {
        bail!("bpf-linker was installed but does not run under `rustup run nightly`; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn bpf_linker_runs() -> bool {
    succeeds(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(cmd, _)| !succeeds(Command::new("sh").args(["-c", &format!("command -v {cmd}")])))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing Debian packages {}", missing.join(" "));
    exec(Command::new("apt-get").arg("update").arg("-q"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
