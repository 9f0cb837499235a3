//! `xdplb`: the agent (`xdplb run`) and, later, the CLI that talks to it.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use xdplb::{agent::Agent, config::Config};

#[derive(Parser)]
#[command(
    name = "xdplb",
    version,
    about = "XDP L4 load balancer (Maglev, L2 DSR)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the configured interface and run the agent until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => Config::load(&config).map(|c| {
            println!("{}: ok, {} service(s)", config.display(), c.services.len());
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xdplb: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(config: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let agent = Agent::start(config).await?;
        agent.run().await
    })
}
