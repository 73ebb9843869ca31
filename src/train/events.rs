//! What a training run reports while it runs, and how its owner steers it (cancel, checkpoint-and-stop).

use crate::train::interlude::Interlude;
use crate::train::model::Qwen3;
pub use crate::train::tool_eval::ToolEvalMetrics;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Metrics of one optimizer step (field names are the event-stream contract: docs/architecture.md, openapi.yaml).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch: epoch index + fraction of its micro-batches done.
    pub epoch: f64,
    /// Σ token CE over the window's label positions ÷ their count.
    pub train_loss: f64,
    /// The learning rate this step was taken with.
    pub learning_rate: f64,
    /// Global L2 norm of the LoRA gradients before clipping (unscaled under loss scaling; not
    /// finite, serialized as null, on a step skipped for overflow).
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Unweighted mean over the window's micro-batches of (correct argmax ÷ label positions).
    pub train_mean_token_accuracy: f64,
    /// Cumulative non-pad tokens seen (prompt included).
    pub num_tokens: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
    /// The factor this step's loss was multiplied by before backward (f16 base weights only;
    /// `None` when the loss is not scaled).
    #[serde(default)]
    pub loss_scale: Option<f64>,
    /// Optimizer steps skipped so far because the scaled gradients overflowed (0 without scaling).
    #[serde(default)]
    pub skipped_steps: u64,
}

/// serde_json writes a non-finite f64 as null; this reads it back (as NaN).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Loss and accuracy over the whole validation file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub step: u64,
    pub eval_loss: f64,
    pub eval_mean_token_accuracy: f64,
    /// Label positions evaluated.
    pub eval_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointInfo {
    pub step: u64,
    /// Directory holding `adapter/` (PEFT files) and the resumable trainer state.
    pub path: PathBuf,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_mean_token_accuracy: Option<f64>,
    pub train_mean_token_accuracy: Option<f64>,
    /// The last tool-call evaluation at or before this step.
    #[serde(default)]
    pub tool_eval: Option<ToolEvalMetrics>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Everything the trainer reports, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TrainEvent {
    Log {
        level: Level,
        message: String,
    },
    Metrics(StepMetrics),
    Eval(EvalMetrics),
    /// Tool-call accuracies of generated turns (see [`crate::train::tool_eval`]).
    #[serde(rename = "tool_eval")]
    ToolEval(ToolEvalMetrics),
    Checkpoint(CheckpointInfo),
}

/// How a run ended when it did not fail.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done; the final adapter is in `adapter_dir`.
    Completed {
        adapter_dir: PathBuf,
        steps: u64,
        trained_tokens: u64,
    },
    /// Stopped on request after writing a checkpoint it can resume from.
    Suspended { checkpoint: PathBuf, step: u64 },
    /// Cancelled on request; nothing further was written.
    Cancelled { step: u64 },
}

const RUN: u8 = 0;
const CANCEL: u8 = 1;
const SUSPEND: u8 = 2;

/// A shared flag the owner flips, and the work it lends the device to; the trainer polls both
/// between micro-batches.
#[derive(Clone, Default)]
pub struct Control(Arc<AtomicU8>, Option<Arc<dyn Interlude>>);

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("state", &self.0.load(Ordering::SeqCst))
            .field("interlude", &self.1.is_some())
            .finish()
    }
}

impl Control {
    pub fn new() -> Self {
        Self::default()
    }
    /// The same control, lending the device to `interlude` between micro-batches.
    pub fn with_interlude(self, interlude: Arc<dyn Interlude>) -> Self {
        Self(self.0, Some(interlude))
    }
    /// Called by the trainer at a micro-batch boundary: runs the waiting interlude work, if any,
    /// with the model being trained.
    pub fn yield_to_interlude(&self, model: &Qwen3) {
        if let Some(i) = self.1.as_ref().filter(|i| i.pending()) {
            i.run(model);
        }
    }
    /// Stop at the next micro-batch boundary, writing nothing more.
    pub fn cancel(&self) {
        self.0.store(CANCEL, Ordering::SeqCst);
    }
    /// Stop at the next micro-batch boundary after checkpointing the last completed step.
    pub fn suspend(&self) {
        let _ = self
            .0
            .compare_exchange(RUN, SUSPEND, Ordering::SeqCst, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CANCEL
    }
    pub fn is_suspended(&self) -> bool {
        self.0.load(Ordering::SeqCst) == SUSPEND
    }
}
