//! `xdplb-bench` (run by `cargo xtask bench`): measures xdplb side by side
//! with baselines and a real peer in one run, and writes a report with
//! charts. Figures are ratios to what runs next to them, because these
//! machines are shared and noisy; nothing here fails on a number.
mod control;
mod frames;
mod packet;
mod peer;
mod report;
mod stats;
mod throughput;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;

/// The CPU the per-packet measurements are pinned to.
pub const BENCH_CPU: usize = 1;

#[derive(Parser)]
#[command(name = "xdplb-bench")]
struct Args {
    /// A smoke run of every section in well under 3 minutes (numbers are rough).
    #[arg(long)]
    quick: bool,
    /// Where report.md and the charts go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The fuzzing soak's summary line (written by `cargo xtask bench`).
    #[arg(long)]
    soak: Option<PathBuf>,
    /// Criterion's estimates for the Maglev build (target/criterion).
    #[arg(long, default_value = "target/criterion")]
    criterion: PathBuf,
    /// The xdplb binary, for the peer comparison.
    #[arg(long)]
    xdplb: PathBuf,
    /// The XDP_PASS object for the harness (tests/netns-harness.sh).
    #[arg(long)]
    xdp_pass: PathBuf,
    /// lb-ebpf's `xdp-baselines` object: baselines, generator and sink.
    #[arg(long)]
    baselines: PathBuf,
    /// Run only this section (packet, throughput, peer, control); the others
    /// are left out of the report.
    #[arg(long)]
    only: Option<String>,
    /// Measure only these per-packet fixtures (repeatable; default: all).
    #[arg(long = "fixture")]
    fixtures: Vec<String>,
}

/// Where `--baselines` points (bench-only programs stay out of `xdplb`).
static BASELINES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Where the baseline programs' object is (`--baselines`).
pub fn baselines_path() -> Result<&'static std::path::Path> {
    Ok(BASELINES.get().ok_or_else(|| anyhow::anyhow!("--baselines is not set"))?)
}

/// A fresh load of the baseline programs.
pub fn load_baselines() -> Result<aya::Ebpf> {
    let path = baselines_path()?;
    aya::Ebpf::load_file(path).map_err(|e| anyhow::anyhow!("loading the baselines {}: {e}", path.display()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    BASELINES.set(args.baselines.clone()).expect("set once");
    std::fs::create_dir_all(&args.out)?;
    let (iterations, rounds) = if args.quick { (20_000, 3) } else { (1_000_000, 5) };

    let wanted = |section: &str| args.only.as_deref().is_none_or(|only| only == section);
    let quick = args.quick;

    let costs = if wanted("packet") {
        eprintln!("== per-packet cost ({iterations} calls × {rounds} rounds per fixture and program)");
        // The per-packet part moves its thread into a namespace of its own.
        let chosen = args.fixtures.clone();
        std::thread::spawn(move || packet::run(iterations, rounds, quick, &chosen)).join().expect("thread")?
    } else {
        Vec::new()
    };
    let throughput = if wanted("throughput") {
        eprintln!("== throughput through the namespace topology");
        throughput::run(if quick { 1.0 } else { 5.0 }, if quick { 1 } else { 3 })?
    } else {
        Vec::new()
    };
    let peer = if wanted("peer") {
        eprintln!("== HAProxy (mode tcp) vs xdplb");
        peer::run(&args.xdplb, &args.xdp_pass, if quick { 2 } else { 10 })?
    } else {
        Vec::new()
    };
    let control = if wanted("control") {
        eprintln!("== control plane");
        Some(control::run(&args.criterion)?)
    } else {
        None
    };

    let soak = match &args.soak {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let report = report::Report { quick: args.quick, iterations, rounds, costs, throughput, peer, control, soak };
    let path = report::write(&report, &args.out)?;
    println!("report: {}", path.display());
    Ok(())
}
