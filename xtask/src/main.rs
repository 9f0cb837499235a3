//! `cargo xtask`: set up the toolchain, build, test and demo xdplb.
//!
//!   cargo xtask setup   idempotent bootstrap: rust-src for nightly, bpf-linker
//!                       built against nightly's own libLLVM, Debian packages
//!   cargo xtask build   setup, then build the xdplb binary (eBPF embedded)
//!   cargo xtask test    setup, then every test (unit, packet, namespace)
//!   cargo xtask demo    setup, build, then the namespace demo with traffic
//!   cargo xtask bench   benchmarks side by side; target/bench/report.md
//!   cargo xtask package the Debian package (target/debian/xdplb_*.deb)
mod older_release;
mod package;
mod setup;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (safe to run again).
    Setup,
    /// Build the xdplb binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test (needs root: XDP, namespaces).
    Test,
    /// Benchmarks side by side with baselines and HAProxy; writes target/bench/report.md.
    Bench {
        /// A smoke run in under 3 minutes (rough numbers).
        #[arg(long)]
        quick: bool,
    },
    /// Build the Debian package: binary, config, systemd units, completions, man pages.
    Package,
    /// Build, create the namespace topology, run xdplb, send traffic, show the result.
    Demo {
        /// HTTP requests per address family.
        #[arg(long, default_value_t = 300)]
        requests: u32,
        /// 2: two LB nodes behind a router (BGP, ECMP, BFD, sync), one of
        /// them killed under traffic.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        nodes: u8,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(&root, release)
        }
        Task::Test => {
            setup::run()?;
            require_root("the tests")?;
            // One test at a time: the packet and namespace tests load XDP
            // programs and build topologies; on 2 cores that is kinder and
            // keeps timings honest. The package is built first: its tests
            // (tests/units.rs) check the .deb itself.
            let deb = package::run(&root)?;
            let older = older_release::binary(&root)?;
            test(&root, &deb, older.as_deref())
        }
        Task::Package => {
            setup::run()?;
            package::run(&root).map(drop)
        }
        Task::Bench { quick } => {
            setup::run()?;
            setup::debian_packages(setup::BENCH_PACKAGES)?;
            require_root("the benchmarks")?;
            bench(&root, quick)
        }
        Task::Demo { requests, nodes } => {
            setup::run()?;
            require_root("the demo")?;
            build(&root, false)?;
            let prefix = format!("xd{}", std::process::id() % 100_000);
            let script = if nodes == 2 { "tests/demo-nodes.sh" } else { "tests/demo.sh" };
            exec(
                Command::new("bash")
                    .current_dir(&root)
                    .arg("tests/netns-harness.sh")
                    .args(["run", &prefix, "bash", script])
                    .env("HARNESS_NODES", if nodes == 2 { "1" } else { "0" })
                    .env("XDPLB", root.join("target/debug/xdplb"))
                    .env("DEMO_REQUESTS", requests.to_string()),
            )
        }
    }
}

/// `cargo test` on every default member, echoing its output; then, when an
/// older binary is at hand, the upgrade-from-an-older-release test the first
/// run skipped. One closing line with the totals over both.
fn test(root: &Path, deb: &Path, older: Option<&Path>) -> Result<()> {
    let mut totals = cargo_test(root, &[("XDPLB_DEB", deb)], &["--", "--test-threads=1"])?;
    if let Some(older) = older {
        let upgrade = cargo_test(
            root,
            &[("XDPLB_UPGRADE_FROM", older)],
            &["--package", "lb-userspace", "--test", "netns", "--", "--ignored", "--exact", UPGRADE_TEST],
        )?;
        if upgrade.passed + upgrade.failed != 1 {
            bail!("the run of {UPGRADE_TEST} ran {} tests, not 1", upgrade.passed + upgrade.failed);
        }
        totals.ignored = totals.ignored.saturating_sub(1);
        totals.passed += upgrade.passed;
        totals.failed += upgrade.failed;
        totals.success &= upgrade.success;
    }
    println!("tests: {} passed, {} failed, {} skipped", totals.passed, totals.failed, totals.ignored);
    if !totals.success {
        bail!("cargo test failed");
    }
    if totals.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

/// The test the first run skips for want of an older binary.
const UPGRADE_TEST: &str = "upgrade_from_an_older_release_keeps_flows_and_moves_the_state_it_reshaped";

struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

/// One `cargo test --features lb-userspace/test-hooks ARGS`, its output
/// echoed and its "test result:" lines summed.
fn cargo_test(root: &Path, env: &[(&str, &Path)], args: &[&str]) -> Result<Totals> {
    let mut child = Command::new("cargo")
        .current_dir(root)
        .envs(env.iter().copied())
        .args(["test", "--features", "lb-userspace/test-hooks"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut totals = Totals { passed: 0, failed: 0, ignored: 0, success: false };
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        let Some(result) = line.strip_prefix("test result: ") else {
            continue;
        };
        for part in result.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) else {
                continue;
            };
            match what {
                "passed" => totals.passed += n,
                "failed" => totals.failed += n,
                "ignored" => totals.ignored += n,
                _ => {}
            }
        }
    }
    totals.success = child.wait()?.success();
    Ok(totals)
}

fn bench(root: &Path, quick: bool) -> Result<()> {
    // Release builds: the control-plane timings measure our code, not debug asserts.
    exec(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--package",
        "lb-bench",
    ]))?;
    let criterion: &[&str] = if quick {
        &["--warm-up-time", "0.2", "--measurement-time", "0.5", "--sample-size", "10"]
    } else {
        &["--warm-up-time", "1", "--measurement-time", "3"]
    };
    exec(
        Command::new("cargo")
            .current_dir(root)
            .args(["bench", "--package", "lb-bench", "--bench", "maglev", "--"])
            .args(criterion),
    )?;
    let soak = fuzz_soak(root, if quick { 1_000_000 } else { 10_000_000 })?;
    let xdp_pass = newest(&root.join("target/release/build"), "lb-userspace-", "out/xdp-pass")?;
    let baselines = newest(&root.join("target/release/build"), "lb-userspace-", "out/xdp-baselines")?;
    let mut cmd = Command::new(root.join("target/release/xdplb-bench"));
    cmd.current_dir(root)
        .arg("--xdplb")
        .arg(root.join("target/release/xdplb"))
        .arg("--xdp-pass")
        .arg(xdp_pass)
        .arg("--baselines")
        .arg(baselines)
        .arg("--criterion")
        .arg(root.join("target/criterion"))
        .arg("--soak")
        .arg(soak)
        .arg("--out")
        .arg(root.join("target/bench"));
    if quick {
        cmd.arg("--quick");
    }
    exec(&mut cmd)
}

/// The fuzzing soak: `frames` mutated frames through the real program
/// (the packet test's fuzzer, 10^5 in CI), with a new seed each run so that
/// soaks explore new frames. Its summary line goes into the report.
fn fuzz_soak(root: &Path, frames: u64) -> Result<PathBuf> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    eprintln!("== fuzzing soak: {frames} frames, seed {seed:#x}");
    let out = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--features", "lb-userspace/test-hooks", "--package", "lb-userspace", "--test", "packet"])
        .args(["--", "--exact", "fuzzed_frames_never_abort_and_change_only_what_their_mode_allows", "--nocapture"])
        .env("XDPLB_FUZZ_FRAMES", frames.to_string())
        .env("XDPLB_FUZZ_SEED", seed.to_string())
        .stderr(Stdio::piped())
        .output()
        .context("running the fuzzing soak")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("the fuzzing soak failed (seed {seed}: rerun with XDPLB_FUZZ_SEED={seed}):\n{stderr}");
    }
    let summary = stderr.lines().find(|l| l.starts_with("fuzzing:")).context("the soak printed no summary")?;
    let path = root.join("target/bench/fuzz-soak.txt");
    std::fs::create_dir_all(root.join("target/bench"))?;
    std::fs::write(&path, format!("{summary}\n"))?;
    Ok(path)
}

/// The most recently built `DIR/PREFIX*/SUFFIX`.
fn newest(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(suffix))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .ok_or_else(|| anyhow::anyhow!("no {prefix}*/{suffix} under {}", dir.display()))
}

fn build(root: &Path, release: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(["build", "--package", "lb-userspace"]);
    if release {
        cmd.arg("--release");
    }
    exec(&mut cmd)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} need root (XDP programs, network namespaces)");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub(crate) fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
