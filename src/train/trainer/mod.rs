//! The training loop: tokenize → forward → chunked loss → backward → clip → AdamW step → log,
//! with per-layer gradient checkpointing, periodic eval and resumable checkpoints.
//!
//! [`run`] below is the whole loop; the pieces it calls live in the submodules:
//! `session` (setup, resume, eval/checkpoint cadence, metrics.jsonl), `window` (one optimizer
//! step: accumulate micro-batches, clip, AdamW), `step` (a micro-batch's forward + backward and
//! the chunked loss), `batch`, `plan` (step counts, data order, ETA), `dataset`, `eval`,
//! `tool_eval` (generated tool calls scored), `build`.
//!
//! Shapes: N packed tokens of a micro-batch, M label positions among them, H hidden, V vocab.

mod batch;
mod build;
mod dataset;
mod eval;
mod plan;
mod session;
mod step;
mod tool_eval;
mod window;

pub use crate::train::checkpoint::latest_checkpoint;
pub use batch::{make_batch, Batch};
pub use build::{build_model, build_model_in, resolve_precision};
pub use dataset::{load_dataset, Dataset};
pub use eval::evaluate;
pub use plan::Plan;
pub use step::{loss_chunk_rows, micro_step, MicroStats};

use crate::train::checkpoint;
use crate::train::events::{Control, Outcome, TrainEvent};
use crate::train::spec::TrainConfig;
use anyhow::Result;
use candle_core::Device;
use session::Session;
use std::path::PathBuf;
use window::Accumulated;

/// Everything one run needs, with paths already resolved.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub model_dir: PathBuf,
    /// Written into `adapter_config.json` as `base_model_name_or_path`.
    pub base_model_name: String,
    pub training_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    /// Conversations for the tool-call evaluation (else the validation file's).
    pub tool_eval_file: Option<PathBuf>,
    /// A PEFT adapter directory to start from instead of a fresh init.
    pub init_adapter: Option<PathBuf>,
    pub config: TrainConfig,
    /// Receives `adapter/`, `checkpoints/step-N/` and `metrics.jsonl`.
    pub output_dir: PathBuf,
    /// A checkpoint directory to continue from.
    pub resume_from: Option<PathBuf>,
    pub device: Device,
}

/// Runs (or resumes) a job to completion, cancellation or suspension.
pub fn run(
    job: &TrainJob,
    control: &Control,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome> {
    let mut s = Session::start(job, control, on_event)?;
    while s.state.step < s.plan.total_steps {
        let window = match s.accumulate(control, on_event)? {
            Accumulated::Window(w) => w,
            Accumulated::Stopped(outcome) => return Ok(outcome),
        };
        let metrics = s.update(window)?;
        s.report(metrics, control, on_event)?;
    }
    let adapter_dir = job.output_dir.join("adapter");
    checkpoint::save_adapter(&adapter_dir, &s.params, &s.lora, &job.base_model_name)?;
    Ok(Outcome::Completed {
        adapter_dir,
        steps: s.state.step,
        trained_tokens: s.state.num_tokens,
    })
}
