//! The `sftd` binary: parses the command line and hands off to the library. With no subcommand
//! it runs the service (`serve`).

use clap::{Parser, Subcommand};
use sftd::cli;
use sftd::config::Config;

#[derive(Parser)]
#[command(
    name = "sftd",
    version,
    about = "LoRA fine-tuning of Qwen3 models, as a service or from the command line"
)]
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
    /// Run the API server and the training worker (the default); `--no-worker`: the API only.
    Serve(Config),
    /// Run a worker: claim and train jobs from the shared database (SFTD_DATABASE_URL), serving
    /// only /healthz, /readyz and /metrics on SFTD_ADDR.
    Worker(Config),
    /// Exit 0 if the server at SFTD_ADDR answers GET /healthz, else 1 (for container HEALTHCHECK).
    Healthcheck(Config),
    /// Run one fine-tuning job from a JSON file, without a server.
    Train(cli::TrainArgs),
    /// Write the small random-init demo model into a directory.
    DemoModel(cli::DemoModelArgs),
    /// Write a model's logits for a text (parity checks against PEFT).
    Logits(cli::LogitsArgs),
    /// Merge a LoRA adapter into its base model's weights.
    Merge(cli::MergeArgs),
    /// Measure training throughput, step time, peak memory and MFU on this machine.
    Bench(sftd::bench::BenchArgs),
    /// Estimate a job's peak memory and whether it fits a device (this machine or a named GPU).
    Estimate(sftd::estimate::EstimateArgs),
}

fn main() -> anyhow::Result<()> {
    sftd::alloc::keep_freed_buffers();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(config)) => serve(config),
        Some(Command::Worker(config)) => {
            sftd::api::init_tracing(&config);
            tokio::runtime::Runtime::new()?.block_on(sftd::api::serve_worker(config))
        }
        Some(Command::Healthcheck(config)) => {
            std::process::exit(if sftd::api::health::probe(config.addr) {
                0
            } else {
                1
            })
        }
        Some(Command::Train(a)) => cli::train(a),
        Some(Command::DemoModel(a)) => cli::demo_model(a),
        Some(Command::Logits(a)) => cli::logits(a),
        Some(Command::Merge(a)) => cli::merge(a),
        Some(Command::Bench(a)) => sftd::bench::bench(a),
        Some(Command::Estimate(a)) => sftd::estimate::estimate(a),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    sftd::api::init_tracing(&config);
    tokio::runtime::Runtime::new()?.block_on(sftd::api::serve(config))
}
