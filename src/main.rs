//! The `sftd` command line: `serve` (the default) and `healthcheck`; each dispatches into the library.

use clap::{Parser, Subcommand};
use sftd::config::Config;

#[derive(Parser)]
#[command(name = "sftd", version, about = "LoRA SFT service for Qwen3 models")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Settings of `serve` when no subcommand is given.
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server and the training worker (the default).
    Serve(Config),
    /// Exit 0 if the server at SFTD_ADDR answers GET /healthz, else 1 (for container HEALTHCHECK).
    Healthcheck(Config),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(config)) => serve(config),
        Some(Command::Healthcheck(config)) => {
            std::process::exit(if sftd::api::health::probe(config.addr) {
                0
            } else {
                1
            })
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    sftd::api::init_tracing(&config.log_format);
    tokio::runtime::Runtime::new()?.block_on(sftd::api::serve(config))
}
