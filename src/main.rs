//! The `sftd` binary: parses the command line and hands off to the library.

use clap::{Parser, Subcommand};
use sftd::cli;

#[derive(Parser)]
#[command(
    name = "sftd",
    version,
    about = "LoRA fine-tuning of Qwen3 models, as a service or from the command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Train(a) => cli::train(a),
        Command::DemoModel(a) => cli::demo_model(a),
        Command::Logits(a) => cli::logits(a),
        Command::Merge(a) => cli::merge(a),
        Command::Bench(a) => sftd::bench::bench(a),
    }
}
