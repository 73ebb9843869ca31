//! The trainer's yield point: work its owner lends the training device to between
//! micro-batches (serving generation requests while a job trains), run with the model being
//! trained so that nothing loads a second copy of its base weights.

use crate::train::model::Qwen3;

/// Work waiting for the device. The trainer asks [`Interlude::pending`] at every micro-batch
/// boundary and, when it says yes, lends its model to [`Interlude::run`] before going on.
///
/// `run` must leave the model as it found it: it may read the frozen weights and the LoRA
/// weights (as of the last optimizer step) but not track gradients or draw from the trainer's
/// random streams, so a run's losses are the same with or without interludes.
pub trait Interlude: Send + Sync {
    /// Whether anything waits (cheap: polled before every micro-batch).
    fn pending(&self) -> bool;
    /// Runs everything that waits, with the model being trained.
    fn run(&self, model: &Qwen3);
}
