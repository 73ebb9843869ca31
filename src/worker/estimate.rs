//! Memory estimates made at claim time. A job created on an API node (`sftd serve --no-worker`)
//! has no estimate: that node has no training device to estimate for. Before each claim a
//! worker estimates the oldest such queued jobs for its own device, the way `sftd serve` does at
//! creation, and records each estimate on the job's row; the claim then takes only a job whose
//! estimate fits, so a job too big for this worker stays queued for a bigger one. A job too
//! big for every live worker's device (its total memory) would wait forever: once it and this
//! worker have been around for the placement grace (`SFTD_PLACEMENT_GRACE_MS`, time for
//! workers started together to register), it fails with `insufficient_memory`.

use super::submit::MEMORY_PARAM;
use super::{Ctx, MemoryBudget};
use crate::store::jobs::JobError;
use crate::train::spec::TrainConfig;
use std::collections::HashSet;

/// Queued jobs estimated per look at the queue (the oldest first).
const PER_PASS: i64 = 8;

/// Jobs this worker could not estimate (the model's config unreadable, a precision its device
/// cannot run): they are claimed like any job, and their run reports why. Other jobs without
/// an estimate are not claimed until an estimate pass has looked at them.
#[derive(Default)]
pub(super) struct Unestimable(HashSet<String>);

impl Unestimable {
    /// The ids, for [`crate::store::Claimant::unestimated_ok`].
    pub(super) fn ids(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// Records an estimate on each of the oldest queued jobs that have none, for `budget`'s device.
pub(super) async fn estimate_queued(ctx: &Ctx, budget: &MemoryBudget, skip: &mut Unestimable) {
    // Past the ones already found unestimable, so they cannot hide younger jobs.
    let limit = PER_PASS + skip.0.len() as i64;
    let jobs = match ctx.store.queued_without_estimate(limit).await {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the queued jobs to estimate");
            return;
        }
    };
    for job in jobs {
        if skip.0.contains(&job.id) {
            continue;
        }
        let Some(bytes) = estimate(ctx, budget, &job.model, &job.config).await else {
            skip.0.insert(job.id);
            continue;
        };
        match ctx.store.set_queued_estimate(&job.id, bytes).await {
            Ok(_) => tracing::info!(job = %job.id, bytes, "estimated a queued job's memory"),
            Err(e) => tracing::warn!(job = %job.id, error = %e, "could not record an estimate"),
        }
    }
}

/// The job's peak memory on this device, whether it fits or not (`None`: cannot be estimated).
async fn estimate(ctx: &Ctx, budget: &MemoryBudget, model: &str, config: &str) -> Option<u64> {
    let config: TrainConfig = serde_json::from_str(config).ok()?;
    let dir = ctx.hub.resolve(model).await.ok()?;
    match budget.check(&dir, &config) {
        Ok(bytes) => bytes,
        Err(too_big) => Some(too_big.estimated_peak_memory_bytes),
    }
}

/// Fails the queued jobs whose estimate no live worker's device can hold (see the module
/// comment), once this worker has been up for the placement grace.
pub(super) async fn fail_too_big(ctx: &Ctx) {
    if ctx.started.elapsed() < ctx.placement_grace {
        return;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let why = |estimate: u64, largest: u64| {
        JobError::new(
            "insufficient_memory",
            format!(
                "No worker can run this job: its estimated peak memory is {:.2} GiB ({estimate} \
                 bytes), and the largest device of a live worker has {:.2} GiB ({largest} bytes). \
                 Lower batch_size or max_seq_len (or use a smaller model), or add a worker with \
                 more memory, then create the job again.",
                gib(estimate),
                gib(largest)
            ),
            Some(MEMORY_PARAM),
        )
    };
    let live = ctx.claimant.lease;
    match ctx
        .store
        .fail_queued_too_big(live, ctx.placement_grace, why)
        .await
    {
        Ok(failed) => {
            for job in failed {
                tracing::warn!(job = %job, "failed a queued job too big for every live worker");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not look for jobs too big for every worker"),
    }
}
