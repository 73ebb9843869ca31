//! Claims with leases and fencing. A claim takes the oldest queued job that fits the worker's
//! memory, increments the job's `epoch` (the fencing token) and sets `lease_expires_at`, which
//! the worker's heartbeat renews. Every write the worker makes for the job carries its
//! [`Lease`] and lands only while the job is `running` under that epoch with an unexpired lease,
//! so a worker that was paused or cut off past its lease can no longer write anything for it.
//! An expired lease is requeued by whoever notices (any worker), and the next claim resumes it.

use super::events::{insert as insert_event, NewEvent};
use super::guard::Guard;
pub use super::guard::Lease;
use super::jobs::{JobRow, COLUMNS};
use super::status::JobStatus;
use super::{now, Result, Store};
use std::collections::HashMap;
use std::time::Duration;

/// Who claims, with how much memory, for how long.
#[derive(Debug, Clone)]
pub struct Claimant {
    pub worker_id: String,
    /// Memory free for a job on the worker's device; a job whose estimate exceeds it is left for
    /// a bigger worker. `None`: take any job.
    pub memory_bytes: Option<u64>,
    /// How long a claim (and each renewal) lasts without a heartbeat.
    pub lease: Duration,
    /// Which jobs without a memory estimate it may take. `None`: any. `Some(ids)`: only these
    /// (the ones it tried and failed to estimate), so that a job queued between a worker's
    /// estimate pass and its claim waits for the next pass rather than run unjudged.
    pub unestimated_ok: Option<Vec<String>>,
}

impl Claimant {
    /// A claimant that takes any job, with a lease long enough never to expire in a test.
    pub fn any(worker_id: &str) -> Self {
        Self {
            worker_id: worker_id.into(),
            memory_bytes: None,
            lease: Duration::from_secs(3600),
            unestimated_ok: None,
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl JobRow {
    /// The lease this row's claim holds.
    pub fn lease(&self) -> Lease {
        Lease {
            job_id: self.id.clone(),
            epoch: self.epoch,
        }
    }
}

impl Store {
    /// Claims the oldest queued job that fits `who` (`queued → running`): counts the attempt,
    /// increments the epoch and starts the lease. Concurrent claims on PostgreSQL skip each
    /// other's locked rows, so no job is claimed twice and no claimant waits on another.
    pub async fn claim_next_job(&self, who: &Claimant) -> Result<Option<JobRow>> {
        let (_writer, mut tx) = self.begin_write().await?;
        let unestimated = match &who.unestimated_ok {
            None => "TRUE".to_string(),
            Some(ids) if ids.is_empty() => "FALSE".to_string(),
            Some(ids) => {
                let params: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 7)).collect();
                format!("id IN ({})", params.join(", "))
            }
        };
        let sql = format!(
            "UPDATE jobs SET status = $1, epoch = epoch + 1, attempts = attempts + 1, \
             started_at = COALESCE(started_at, $2), lease_expires_at = {now} + $3, worker_id = $4 \
             WHERE n = (SELECT n FROM jobs WHERE status = $5 \
                 AND ($6 IS NULL OR estimated_peak_memory_bytes IS NULL \
                      OR estimated_peak_memory_bytes <= $6) \
                 AND (estimated_peak_memory_bytes IS NOT NULL OR {unestimated}) \
                 ORDER BY n LIMIT 1{skip}) \
             AND status = $5 RETURNING {COLUMNS}",
            now = self.backend.now_ms(),
            skip = self.backend.skip_locked(),
        );
        let mut claim = sqlx::query_as::<_, JobRow>(&sql)
            .bind(JobStatus::Running)
            .bind(now())
            .bind(millis(who.lease))
            .bind(&who.worker_id)
            .bind(JobStatus::Queued)
            .bind(
                who.memory_bytes
                    .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            );
        for id in who.unestimated_ok.iter().flatten() {
            claim = claim.bind(id);
        }
        let Some(row) = claim.fetch_optional(&mut *tx).await? else {
            return Ok(None);
        };
        let ev = NewEvent::status(JobStatus::Running, "info", "Fine-tuning job started");
        let ev = insert_event(&mut tx, self.backend, &row.id, &ev, Guard::None).await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(Some(row))
    }

    /// Extends the lease by `ttl` from now. `false`: the lease is lost (expired, taken over,
    /// or the job left `running`, e.g. cancelled), and the holder must stop.
    pub async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let sql = format!(
            "UPDATE jobs SET lease_expires_at = {now} + $1 WHERE id = $2{cond}",
            now = self.backend.now_ms(),
            cond = Guard::Holding(lease).condition(self.backend, "$3"),
        );
        let renewed = sqlx::query(&sql)
            .bind(millis(ttl))
            .bind(&lease.job_id)
            .bind(lease.epoch)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(renewed)
    }

    /// For every job, the newest claim (epoch) that can no longer write anything for it. A running
    /// job's holder still may, so its bound is the epoch before; every claim of a job in any other
    /// status is fenced, since only a new claim (a higher epoch) can write again. So an object a
    /// claim up to its job's bound stored under its own keys, that no row names, never will be
    /// named: read the rows after this, and they are final for those claims.
    pub async fn fenced_epochs(&self) -> Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, CASE WHEN status = $1 THEN epoch - 1 ELSE epoch END FROM jobs",
        )
        .bind(JobStatus::Running)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Running jobs whose holder is gone: their lease expired. When this process is the
    /// database's only writer and `at_start`, every running job was left by a dead process:
    /// their leases are ended first, whatever they said.
    pub async fn orphaned_jobs(&self, at_start: bool) -> Result<Vec<JobRow>> {
        if at_start && self.is_exclusive() {
            let (_writer, mut tx) = self.begin_write().await?;
            sqlx::query("UPDATE jobs SET lease_expires_at = NULL WHERE status = $1")
                .bind(JobStatus::Running)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = $1 \
             AND (lease_expires_at IS NULL OR lease_expires_at <= {}) ORDER BY n",
            self.backend.now_ms()
        ))
        .bind(JobStatus::Running)
        .fetch_all(&self.pool)
        .await?)
    }
}
