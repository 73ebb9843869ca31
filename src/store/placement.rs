//! Queued jobs no live worker can hold: their memory estimate exceeds the device memory of
//! every worker whose heartbeat is current. Such a job would wait forever, so once it has
//! waited a grace period it is failed, through the usual status change and event.

use super::jobs::{JobError, JobRow, COLUMNS};
use super::status::JobStatus;
use super::{now, Result, Store};
use std::time::Duration;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// The device memory of the largest worker whose last heartbeat came less than `live` ago.
    /// `None` when no worker is live, or when a live worker does not know its memory (it
    /// claims any job, so no job is too big for it).
    pub async fn largest_live_worker_memory(&self, live: Duration) -> Result<Option<u64>> {
        let totals: Vec<Option<i64>> = sqlx::query_scalar(&format!(
            "SELECT memory_total_bytes FROM workers WHERE heartbeat_at > {} - $1",
            self.backend.now_ms()
        ))
        .bind(millis(live))
        .fetch_all(&self.pool)
        .await?;
        let known: Option<Vec<i64>> = totals.into_iter().collect();
        Ok(known
            .and_then(|t| t.into_iter().max())
            .map(|b| u64::try_from(b).unwrap_or(0)))
    }

    /// Fails every queued job created at least `waited` ago whose memory estimate exceeds the
    /// memory of the largest worker live within `live` ([`Store::largest_live_worker_memory`]),
    /// with the error `why(estimate, largest)`. Returns the failed jobs' ids. A job claimed or
    /// cancelled meanwhile is left alone.
    pub async fn fail_queued_too_big(
        &self,
        live: Duration,
        waited: Duration,
        why: impl Fn(u64, u64) -> JobError,
    ) -> Result<Vec<String>> {
        let Some(largest) = self.largest_live_worker_memory(live).await? else {
            return Ok(Vec::new());
        };
        let waited = i64::try_from(waited.as_secs()).unwrap_or(i64::MAX);
        let jobs = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = $1 AND estimated_peak_memory_bytes > $2 \
             AND created_at <= $3 ORDER BY n"
        ))
        .bind(JobStatus::Queued)
        .bind(i64::try_from(largest).unwrap_or(i64::MAX))
        .bind(now().saturating_sub(waited))
        .fetch_all(&self.pool)
        .await?;
        let mut failed = Vec::new();
        for job in jobs {
            let estimate = job
                .estimated_peak_memory_bytes
                .map_or(0, |b| u64::try_from(b).unwrap_or(0));
            let err = why(estimate, largest);
            if self.fail_job(&job.id, &[JobStatus::Queued], &err).await? {
                failed.push(job.id);
            }
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{new_job as job, on_both_backends};
    use super::super::workers;
    use super::*;

    on_both_backends!(
        a_job_too_big_for_every_live_worker_fails_after_a_grace,
        too_big
    );
    /// A queued job whose estimate exceeds every live worker's memory fails once it has waited;
    /// a worker that does not know its memory, or a lost one, changes what counts as too big.
    async fn too_big(s: Store) {
        let live = Duration::from_secs(60);
        let why = |est: u64, largest: u64| {
            JobError::new("insufficient_memory", format!("{est} > {largest}"), None)
        };
        for (id, bytes) in [("ftjob-huge", 64u64 << 30), ("ftjob-fits", 8 << 30)] {
            s.create_job(&job(id, None)).await.unwrap();
            s.set_estimated_memory(id, bytes).await.unwrap();
            s.mark_queued(id).await.unwrap();
        }
        let worker = |id: &str, total: Option<u64>| workers::NewWorker {
            id: id.into(),
            hostname: "h".into(),
            device: "cuda:0".into(),
            memory_total_bytes: total,
            memory_free_bytes: total,
        };
        let lost = |id: &'static str| {
            sqlx::query("UPDATE workers SET heartbeat_at = heartbeat_at - 120000 WHERE id = $1")
                .bind(id)
                .execute(&s.pool)
        };
        // No live worker: nothing is judged.
        assert!(s
            .fail_queued_too_big(live, Duration::ZERO, why)
            .await
            .unwrap()
            .is_empty());
        for (id, total) in [
            ("wrk-small", Some(16 << 30)),
            ("wrk-big", Some(128 << 30)),
            ("wrk-unknown", None),
        ] {
            s.register_worker(&worker(id, total)).await.unwrap();
        }
        // A live worker of unknown memory takes any job.
        assert_eq!(s.largest_live_worker_memory(live).await.unwrap(), None);
        lost("wrk-unknown").await.unwrap();
        assert_eq!(
            s.largest_live_worker_memory(live).await.unwrap(),
            Some(128 << 30)
        );
        assert!(s
            .fail_queued_too_big(live, Duration::ZERO, why)
            .await
            .unwrap()
            .is_empty());
        // Only a small worker is left: the huge job fails, but not before it has waited.
        lost("wrk-big").await.unwrap();
        assert_eq!(
            s.largest_live_worker_memory(live).await.unwrap(),
            Some(16 << 30)
        );
        let hour = Duration::from_secs(3600);
        assert!(s
            .fail_queued_too_big(live, hour, why)
            .await
            .unwrap()
            .is_empty());
        let failed = s
            .fail_queued_too_big(live, Duration::ZERO, why)
            .await
            .unwrap();
        assert_eq!(failed, ["ftjob-huge"]);
        let huge = s.get_job("ftjob-huge").await.unwrap().unwrap();
        assert_eq!(huge.status, JobStatus::Failed);
        assert_eq!(huge.error_code.as_deref(), Some("insufficient_memory"));
        assert_eq!(
            huge.error_message.as_deref(),
            Some("68719476736 > 17179869184")
        );
        let events = s.list_events("ftjob-huge", 0, 100).await.unwrap();
        let statuses: Vec<String> = events
            .iter()
            .filter_map(|e| e.status().map(|s| s.to_string()))
            .collect();
        assert_eq!(statuses, ["validating_files", "queued", "failed"]);
        assert!(events
            .last()
            .unwrap()
            .message
            .contains("68719476736 > 17179869184"));
        let fits = s.get_job("ftjob-fits").await.unwrap().unwrap();
        assert_eq!(fits.status, JobStatus::Queued);
        assert!(s
            .fail_queued_too_big(live, Duration::ZERO, why)
            .await
            .unwrap()
            .is_empty());
    }
}
