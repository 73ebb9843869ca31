//! The event recorder of a running job: turns the engine's events into stored (then
//! broadcast) events and checkpoint rows (each checkpoint published to the artifact storage,
//! under its claim's own keys, before its row), skips the steps a resumed run repeats, and retries a failed write a few
//! times before stopping the run rather than leave a hole in its record.

use super::{checkpoints, Ctx};
use crate::store::{Lease, NewEvent};
use crate::train::events::{
    CheckpointInfo, Control, EvalMetrics, Level, StepMetrics, ToolEvalMetrics, TrainEvent,
};
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
    /// The baseline evaluation is step 0, so "none yet" is `None` rather than 0.
    last_tool_eval_step: Option<i64>,
    /// `save_total_limit`: checkpoint rows kept (0: all), like the directories on disk.
    keep_checkpoints: u32,
    /// Set when an event or checkpoint could not be stored even after retries: the run is
    /// stopped and the job fails with this, rather than go on with a hole in its record.
    lost: Option<String>,
    /// What was lost was a checkpoint's upload: the artifact storage is down, which should
    /// pass, so the job is requeued rather than failed.
    storage_down: bool,
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
            last_tool_eval_step: last("tool_eval_examples"),
            keep_checkpoints,
            lost: None,
            storage_down: false,
        }
    }

    /// Why the run had to be stopped, if a write failed for good (see `lost`).
    pub(super) fn take_lost(&mut self) -> Option<String> {
        self.lost.take()
    }

    /// Whether the write that failed for good was an upload to the artifact storage.
    pub(super) fn storage_down(&self) -> bool {
        self.storage_down
    }

    /// Runs a store (or storage) write with bounded retries. `None` once it has failed for good
    /// (the run is then being stopped and `lost` says why).
    fn store_write<T, E: std::fmt::Display>(
        &mut self,
        what: &str,
        write: impl Fn() -> Result<T, E>,
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
            TrainEvent::ToolEval(t) => {
                let step = t.step as i64;
                if self.last_tool_eval_step.is_some_and(|last| step <= last) {
                    return;
                }
                self.last_tool_eval_step = Some(step);
                self.record(tool_eval_event(&t));
            }
            TrainEvent::Checkpoint(c) => self.checkpoint(&c),
        }
    }

    fn checkpoint(&mut self, c: &CheckpointInfo) {
        let (ctx, lease, keep) = (self.ctx, self.lease, self.keep_checkpoints);
        let store = &ctx.store;
        let tool = c.tool_eval.as_ref();
        let metrics = serde_json::json!({
            "step": c.step,
            "train_loss": c.train_loss,
            "train_mean_token_accuracy": c.train_mean_token_accuracy,
            "valid_loss": c.eval_loss,
            "valid_mean_token_accuracy": c.eval_mean_token_accuracy,
            "tool_name_accuracy": tool.and_then(|t| t.tool_name_accuracy),
            "tool_args_exact": tool.and_then(|t| t.tool_args_exact),
            "tool_json_valid": tool.and_then(|t| t.tool_json_valid),
            "no_call_accuracy": tool.and_then(|t| t.no_call_accuracy),
            "tool_args_valid": tool.and_then(|t| t.tool_args_valid),
        });
        let what = format!("the checkpoint of step {}", c.step);
        // No upload once the job is no longer this worker's (cancelled, or its lease lost while
        // it was paused): the lease is checked, and renewed, right before.
        match ctx
            .rt
            .block_on(store.renew_lease(lease, ctx.claimant.lease))
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(job = %lease.job_id, "lease lost before a checkpoint upload: stopping the run");
                self.control.cancel();
                return;
            }
            // The database is down: the row write below will say so (with its retries).
            Err(e) => tracing::warn!(job = %lease.job_id, error = %e, "could not renew the lease"),
        }
        // Every object first (manifest last), under this claim's own keys, then the row: a row
        // always names a whole checkpoint, on any host, that only this claim wrote.
        let already_lost = self.lost.is_some();
        let Some(key) = self.store_write(&what, || {
            ctx.rt
                .block_on(checkpoints::publish(&ctx.storage, lease, c.step, &c.path))
        }) else {
            self.storage_down = !already_lost;
            return;
        };
        crate::fault::pause("checkpoint_published");
        let recorded = self.store_write(&what, || {
            ctx.rt.block_on(store.add_checkpoint_keeping(
                lease,
                c.step as i64,
                &metrics,
                &key,
                keep,
            ))
        });
        match recorded {
            // Only the holder prunes.
            Some(true) => {
                let pruned = ctx
                    .rt
                    .block_on(checkpoints::prune(store, &ctx.storage, lease));
                if let Err(e) = pruned {
                    tracing::warn!(job = %lease.job_id, error = %e, "could not delete old stored checkpoints");
                }
            }
            // Not taken: the job is someone else's now (or cancelled), and what this claim just
            // published is named by no row, ever (unless an earlier try of this write landed).
            Some(false) => {
                let withdrawn = ctx.rt.block_on(checkpoints::withdraw(
                    store,
                    &ctx.storage,
                    &lease.job_id,
                    &key,
                ));
                match withdrawn {
                    Ok(true) => {
                        tracing::warn!(job = %lease.job_id, key, "checkpoint row refused (lease lost): its objects deleted")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(job = %lease.job_id, key, error = %e, "checkpoint row refused (lease lost): could not delete its objects")
                    }
                }
            }
            None => {}
        }
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

fn tool_eval_event(t: &ToolEvalMetrics) -> NewEvent {
    NewEvent {
        level: "info",
        kind: "metrics",
        message: format!("Step {}: {}", t.step, t.summary()),
        data: serde_json::to_value(t).ok(),
        step: Some(t.step as i64),
    }
}
