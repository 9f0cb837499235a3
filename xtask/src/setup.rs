//! Idempotent bootstrap of a fresh machine. Each step checks first and only
//! installs what is missing; nothing is downloaded as a prebuilt binary.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::exec;

/// What the tests and the demo need: a shell check, and the Debian package
/// that satisfies it.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("command -v ip", "iproute2"),
    ("command -v ethtool", "ethtool"),
    ("command -v curl", "curl"),
    ("command -v python3", "python3"),
    ("command -v nsenter", "util-linux"),
    // tests/units.rs checks contrib/systemd with systemd-analyze.
    ("command -v systemd-analyze", "systemd"),
    // The Grafana dashboard's queries are checked against a real Prometheus.
    ("command -v prometheus", "prometheus"),
    // The benchmark crate builds with the tests; its charts render text with
    // fontconfig and freetype.
    ("command -v pkg-config", "pkg-config"),
    ("test -e /usr/include/fontconfig/fontconfig.h", "libfontconfig1-dev"),
    ("test -e /usr/include/freetype2/ft2build.h", "libfreetype-dev"),
    ("test -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
    // etcd-client compiles etcd's gRPC definitions with protoc at build time;
    // they import protobuf's well-known types (a Recommends we do not take).
    ("command -v protoc", "protobuf-compiler"),
    ("test -e /usr/include/google/protobuf/descriptor.proto", "libprotobuf-dev"),
    // The discovery tests run a real etcd (server and etcdctl).
    ("command -v etcd", "etcd-server"),
    ("command -v etcdctl", "etcd-client"),
    // The multi-node tests announce VIPs by BGP between BIRD daemons.
    ("command -v bird", "bird2"),
];

/// What only `cargo xtask bench` needs: the peer and the load generator.
pub const BENCH_PACKAGES: &[(&str, &str)] =
    &[("command -v haproxy", "haproxy"), ("command -v wrk", "wrk"), ("command -v nginx", "nginx")];

/// What `cargo xtask package` needs besides cargo-deb: dpkg-shlibdeps for
/// the package's library dependencies, gzip for the man pages.
const PACKAGING_PACKAGES: &[(&str, &str)] = &[("command -v dpkg-shlibdeps", "dpkg-dev"), ("command -v gzip", "gzip")];

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    let had_etcd = succeeds(Command::new("sh").args(["-c", "command -v etcd"]));
    debian_packages(DEBIAN_PACKAGES)?;
    if !had_etcd {
        // Debian's package starts a host etcd where systemd runs; the tests
        // start their own inside their namespaces and need none outside.
        let _ =
            Command::new("systemctl").args(["disable", "--now", "etcd"]).stderr(std::process::Stdio::null()).status();
    }
    packaging()
}

/// cargo-deb, built from crates.io (major version 3, whose metadata keys
/// lb-userspace/Cargo.toml uses).
fn packaging() -> Result<()> {
    debian_packages(PACKAGING_PACKAGES)?;
    let version = Command::new("cargo").args(["deb", "--version"]).output();
    if version.is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("cargo-deb 3."))
    {
        return Ok(());
    }
    eprintln!("xtask setup: building cargo-deb (about two minutes)");
    exec(Command::new("cargo").args(["install", "--locked", "cargo-deb", "--version", "^3"]))
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

pub fn debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(check, _)| !succeeds(Command::new("sh").args(["-c", check])))
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
