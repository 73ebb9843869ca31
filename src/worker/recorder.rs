//! The event recorder of a running job: turns the engine's events into stored (then
//! broadcast) events and checkpoint rows, skips the steps a resumed run repeats, and retries a
//! failed store write a few times before stopping the run rather than leave a hole in its record.

use super::Ctx;
use crate::store::{Lease, NewEvent};
use crate::train::checkpoint;
use crate::train::events::{CheckpointInfo, Control, EvalMetrics, Level, StepMetrics, TrainEvent};
use std::path::Path;
use std::time::Duration;

/// Waits before retrying a store write that failed (a locked or briefly full database); after
/// the last one the job fails rather than lose the event.
const RECORD_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// Turns engine events into stored events, dropping steps a resumed run repeats.
pub(super) struct Recorder<'a> {
    ctx: &'a Ctx,
    job_id: &'a str,
    /// Carried by every write, so nothing lands once the job is no longer this worker's.
    lease: &'a Lease,
    control: &'a Control,
    last_train_step: i64,
    last_eval_step: i64,
    /// `save_total_limit`: checkpoint rows kept (0: all), like the directories on disk.
    keep_checkpoints: u32,
    /// Set when an event or checkpoint could not be stored even after retries: the run is
    /// stopped and the job fails with this, rather than go on with a hole in its record.
    lost: Option<String>,
}

impl<'a> Recorder<'a> {
    /// A recorder for the job `lease` holds that skips the steps its earlier runs already
    /// recorded.
    pub(super) fn new(
        ctx: &'a Ctx,
        lease: &'a Lease,
        control: &'a Control,
        keep_checkpoints: u32,
    ) -> Self {
        let job_id = lease.job_id.as_str();
        let last = |key| {
            ctx.rt
                .block_on(ctx.store.last_metrics_step(job_id, key))
                .ok()
                .flatten()
        };
        Self {
            ctx,
            job_id,
            lease,
            control,
            last_train_step: last("train_loss").unwrap_or(0),
            last_eval_step: last("valid_loss").unwrap_or(0),
            keep_checkpoints,
            lost: None,
        }
    }

    /// Why the run had to be stopped, if a write failed for good (see `lost`).
    pub(super) fn take_lost(&mut self) -> Option<String> {
        self.lost.take()
    }

    /// Runs a store write with bounded retries. `None` once it has failed for good (the run is
    /// then being stopped and `lost` says why).
    fn store_write<T>(
        &mut self,
        what: &str,
        write: impl Fn() -> crate::store::Result<T>,
    ) -> Option<T> {
        if self.lost.is_some() {
            return None;
        }
        let mut delays = RECORD_RETRY_DELAYS.iter();
        loop {
            match write() {
                Ok(v) => return Some(v),
                Err(e) => match delays.next() {
                    Some(delay) => {
                        tracing::warn!(job = self.job_id, error = %e, "could not record {what}; retrying");
                        std::thread::sleep(*delay);
                    }
                    None => {
                        tracing::error!(job = self.job_id, error = %e, "could not record {what}; stopping the job");
                        self.lost = Some(format!("could not record {what}: {e}"));
                        self.control.cancel();
                        return None;
                    }
                },
            }
        }
    }

    pub(super) fn record(&mut self, ev: NewEvent) {
        let (ctx, lease) = (self.ctx, self.lease);
        let what = format!("the event {:?}", ev.message);
        let appended = self.store_write(&what, || {
            ctx.rt.block_on(ctx.store.append_running_event(lease, &ev))
        });
        // The job left `running` (cancelled) or is no longer this worker's: stop training it.
        if let Some(None) = appended {
            self.control.cancel();
        }
    }

    /// Records the checkpoint a run resumes from if a crash came between writing it and
    /// committing its row (ignored when the row exists).
    pub(super) fn register_resumed_checkpoint(&mut self, dir: &Path) {
        if let Ok(state) = checkpoint::load_state(dir) {
            self.checkpoint(&CheckpointInfo {
                step: state.step,
                path: dir.to_path_buf(),
                train_loss: state.last_train_loss,
                train_mean_token_accuracy: state.last_train_accuracy,
                eval_loss: state.last_eval_loss,
                eval_mean_token_accuracy: state.last_eval_accuracy,
            });
        }
    }

    pub(super) fn on_event(&mut self, ev: TrainEvent) {
        match ev {
            TrainEvent::Log { level, message } => self.record(NewEvent {
                level: match level {
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                },
                kind: "message",
                message,
                data: None,
                step: None,
            }),
            TrainEvent::Metrics(m) => {
                let step = m.step as i64;
                if step <= self.last_train_step {
                    return;
                }
                self.last_train_step = step;
                self.record(metrics_event(&m));
            }
            TrainEvent::Eval(e) => {
                let step = e.step as i64;
                if step <= self.last_eval_step {
                    return;
                }
                self.last_eval_step = step;
                self.record(eval_event(&e));
            }
            TrainEvent::Checkpoint(c) => self.checkpoint(&c),
        }
    }

    fn checkpoint(&mut self, c: &CheckpointInfo) {
        let (ctx, lease, keep) = (self.ctx, self.lease, self.keep_checkpoints);
        let store = &ctx.store;
        let metrics = serde_json::json!({
            "step": c.step,
            "train_loss": c.train_loss,
            "train_mean_token_accuracy": c.train_mean_token_accuracy,
            "valid_loss": c.eval_loss,
            "valid_mean_token_accuracy": c.eval_mean_token_accuracy,
        });
        let rel = c.path.strip_prefix(store.data_dir()).unwrap_or(&c.path);
        let rel = rel.to_string_lossy();
        let what = format!("the checkpoint of step {}", c.step);
        self.store_write(&what, || {
            ctx.rt.block_on(store.add_checkpoint_keeping(
                lease,
                c.step as i64,
                &metrics,
                &rel,
                keep,
            ))
        });
    }
}

fn metrics_event(m: &StepMetrics) -> NewEvent {
    NewEvent {
        level: "info",
        kind: "metrics",
        message: format!(
            "Step {}/{}: training loss={:.4}",
            m.step, m.total_steps, m.train_loss
        ),
        data: serde_json::to_value(m).ok(),
        step: Some(m.step as i64),
    }
}

fn eval_event(e: &EvalMetrics) -> NewEvent {
    NewEvent {
        level: "info",
        kind: "metrics",
        message: format!("Step {}: validation loss={:.4}", e.step, e.eval_loss),
        data: Some(serde_json::json!({
            "step": e.step,
            "valid_loss": e.eval_loss,
            "valid_mean_token_accuracy": e.eval_mean_token_accuracy,
            "eval_tokens": e.eval_tokens,
        })),
        step: Some(e.step as i64),
    }
}
