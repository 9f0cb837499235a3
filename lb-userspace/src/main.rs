//! `xdplb`: the agent (`xdplb run`) and the CLI that manages a running agent.
use std::path::PathBuf;

use clap::Parser;
use xdplb::{
    agent::Agent,
    config::Config,
    control::cli::{self, Cli, Command},
    dataplane::{DataplaneParams, memory},
    decap, logging,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run { config, detach_on_exit } => run(config, detach_on_exit),
        Command::Stop { config, pin_dir } => cli::stop(&cli.socket, config, pin_dir).map(|text| print!("{text}")),
        Command::Check { config } => check(&config),
        Command::Decap { interface, gue_port, detach, stats, xdp_mode, pin_dir } => {
            let pin_dir = pin_dir.unwrap_or_else(|| decap::default_pin_dir(&interface));
            let report = if detach {
                decap::detach(&interface, &pin_dir)
            } else if stats {
                decap::counters_text(&pin_dir)
            } else {
                decap::attach(&interface, gue_port, xdp_mode, &pin_dir)
            };
            report.map(|text| print!("{text}"))
        }
        Command::Completions { shell } => {
            print!("{}", cli::completions(shell));
            Ok(())
        }
        Command::Register(args) => args.into_registrant().and_then(|r| r.run()).map(|text| print!("{text}")),
        Command::Manpages { dir } => cli::write_manpages(&dir).map(|text| print!("{text}")),
        command => cli::client(&cli.socket, command).map(|text| print!("{text}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xdplb: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Validates a config and prints the kernel memory its maps will take.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let params = DataplaneParams::from_config(&config, None);
    let cpus = aya::util::nr_cpus().map_err(|(file, err)| anyhow::anyhow!("reading {file}: {err}"))?;
    let maps = memory::estimate(&params, cpus as u64)?;
    println!("{}: ok, {} service(s)", path.display(), config.services.len());
    println!("map memory: {}", memory::summary(&maps));
    Ok(())
}

fn run(config: PathBuf, detach_on_exit: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let agent = Agent::start(config, detach_on_exit).await?;
        agent.run().await
    })
}
