//! Jobs whose holder is gone (its process died, or its lease expired without a heartbeat):
//! requeued to resume from their last checkpoint, or failed with `job_interrupted` once they
//! have been interrupted more than `SFTD_MAX_ATTEMPTS` times, so a job that kills every worker
//! that runs it (by exhausting memory, say) cannot block the queue.

use crate::store::jobs::JobError;
use crate::store::{JobRow, Store};

/// Requeues (or fails) the jobs whose lease expired: their worker died or lost contact.
pub(super) async fn reclaim_expired(store: &Store, max_attempts: u32) -> crate::store::Result<()> {
    for job in store.orphaned_jobs(false).await? {
        tracing::warn!(job = %job.id, worker = ?job.worker_id, "taking over a job whose lease expired");
        recover_interrupted(store, &job, max_attempts).await?;
    }
    Ok(())
}

/// Requeues a job whose holder is gone (its process died, or its lease expired), or fails it
/// once it has been interrupted more than `max_attempts` times (a job that kills its worker,
/// e.g. by exhausting memory, would otherwise crash every worker in turn and block the queue).
pub(super) async fn recover_interrupted(
    store: &Store,
    job: &JobRow,
    max_attempts: u32,
) -> crate::store::Result<()> {
    let (id, lease) = (job.id.as_str(), job.lease());
    let times = store.interruptions(id).await? + 1;
    if times <= i64::from(max_attempts) {
        tracing::info!(job = %id, times, "requeueing a job whose worker is gone");
        store
            .requeue_interrupted(
                &lease,
                "Job interrupted by a server restart or a lost worker (its lease expired); \
                 it will resume from its last checkpoint",
            )
            .await?;
        return Ok(());
    }
    let reached = match store.last_metrics_step(id, "train_loss").await? {
        Some(step) => format!("the last step reached was {step}"),
        None => "it never completed a step".to_string(),
    };
    let message = format!(
        "Job interrupted {times} times: the worker process died while running it each time \
         (killed, out of memory, power loss, or lost contact with the database); {reached}. \
         It was resumed {max_attempts} times (SFTD_MAX_ATTEMPTS) and is not retried again; \
         check the worker's memory and logs before creating it again."
    );
    tracing::warn!(job = %id, times, "failing a job interrupted too often");
    store
        .fail_interrupted(&lease, &JobError::new("job_interrupted", message, None))
        .await?;
    Ok(())
}
