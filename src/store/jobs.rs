//! The `jobs` table and its state machine. Each transition is one guarded
//! `UPDATE … WHERE id = $2 AND status IN (…)` (and, for a worker's writes, its lease; see
//! `lease`) plus its status event, in one transaction.

use super::events::{insert as insert_event, EventRow, NewEvent};
use super::files::{insert as insert_file, NewFile};
use super::guard::{Guard, Lease};
use super::sql::Backend;
use super::status::JobStatus;
use super::{now, Result, Store};

row_struct! {
    #[derive(Debug, Clone)]
    pub struct JobRow {
        pub n: i64,
        pub id: String,
        pub created_at: i64,
        pub started_at: Option<i64>,
        pub finished_at: Option<i64>,
        pub model: String,
        pub training_file: String,
        pub validation_file: Option<String>,
        pub status: JobStatus,
        /// The request body as parsed (`JobSpec` JSON).
        pub spec: String,
        /// The resolved `TrainConfig` JSON.
        pub config: String,
        pub seed: i64,
        pub suffix: Option<String>,
        pub metadata: Option<String>,
        pub fine_tuned_model: Option<String>,
        pub trained_tokens: Option<i64>,
        pub estimated_finish: Option<i64>,
        pub error_code: Option<String>,
        pub error_message: Option<String>,
        pub error_param: Option<String>,
        pub attempts: i64,
        pub idempotency_key: Option<String>,
        /// Estimated peak memory of a training run (`train::memory`), once known.
        pub estimated_peak_memory_bytes: Option<i64>,
        /// The fencing token: incremented by every claim (see `lease`).
        pub epoch: i64,
        /// Unix milliseconds (the database's clock) when the running claim lapses without a heartbeat.
        pub lease_expires_at: Option<i64>,
        /// The worker that claimed the job last.
        pub worker_id: Option<String>,
    }
}

/// A job to create (status `validating_files`).
pub struct NewJob {
    pub id: String,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub spec: String,
    pub config: String,
    pub seed: i64,
    pub suffix: Option<String>,
    pub metadata: Option<String>,
    pub idempotency_key: Option<String>,
}

pub enum Created {
    New(JobRow),
    /// A job with this idempotency key already exists (its `spec` tells whether the body matched).
    Existing(JobRow),
}

/// A user-facing failure recorded on the job.
#[derive(Debug, Clone)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

impl JobError {
    pub fn new(code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            param: param.map(String::from),
        }
    }

    /// An `internal_error`: a failure of sftd itself (database, storage), not of the request.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new("internal_error", e.to_string(), None)
    }
}

pub(super) const COLUMNS: &str = "n, id, created_at, started_at, finished_at, model, \
    training_file, validation_file, status, spec, config, seed, suffix, metadata, \
    fine_tuned_model, trained_tokens, estimated_finish, error_code, error_message, error_param, \
    attempts, idempotency_key, estimated_peak_memory_bytes, epoch, lease_expires_at, worker_id";

use JobStatus::*;

/// What a requeue clears: nobody holds the job any more.
const RELEASE: &str = ", lease_expires_at = NULL, worker_id = NULL";

impl Store {
    /// Inserts the job and its first event; with an idempotency key already used, returns
    /// that job instead and writes nothing.
    pub async fn create_job(&self, j: &NewJob) -> Result<Created> {
        let (_writer, mut tx) = self.begin_write().await?;
        if let Some(key) = &j.idempotency_key {
            let existing = sqlx::query_as::<_, JobRow>(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE idempotency_key = $1"
            ))
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                return Ok(Created::Existing(row));
            }
        }
        let row = sqlx::query_as::<_, JobRow>(&format!(
            "INSERT INTO jobs (id, created_at, model, training_file, validation_file, status, \
             spec, config, seed, suffix, metadata, idempotency_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {COLUMNS}"
        ))
        .bind(&j.id)
        .bind(now())
        .bind(&j.model)
        .bind(&j.training_file)
        .bind(&j.validation_file)
        .bind(ValidatingFiles)
        .bind(&j.spec)
        .bind(&j.config)
        .bind(j.seed)
        .bind(&j.suffix)
        .bind(&j.metadata)
        .bind(&j.idempotency_key)
        .fetch_one(&mut *tx)
        .await?;
        let ev = NewEvent::status(
            ValidatingFiles,
            "info",
            format!("Created fine-tuning job: {}", j.id),
        );
        let ev = insert_event(&mut tx, self.backend, &j.id, &ev, Guard::None).await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(Created::New(row))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRow>> {
        Ok(
            sqlx::query_as::<_, JobRow>(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Newest first; `after` is the id of the last job of the previous page. Only jobs whose
    /// metadata has every `(key, value)` of `metadata`.
    pub async fn list_jobs(
        &self,
        after: Option<&str>,
        limit: i64,
        metadata: &[(String, String)],
    ) -> Result<Vec<JobRow>> {
        let pairs = self.backend.json_pairs("jobs.metadata");
        let filters: String = (0..metadata.len())
            .map(|i| {
                format!(
                    " AND EXISTS (SELECT 1 FROM {pairs} m \
                     WHERE m.key = ${} AND m.value = ${})",
                    3 + 2 * i,
                    4 + 2 * i
                )
            })
            .collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs \
             WHERE ($1 IS NULL OR n < (SELECT n FROM jobs WHERE id = $1)){filters} \
             ORDER BY n DESC LIMIT $2"
        );
        let mut q = sqlx::query_as::<_, JobRow>(&sql).bind(after).bind(limit);
        for (k, v) in metadata {
            q = q.bind(k).bind(v);
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    /// Runs a status change `from → to` guarded by `guard` on the row, with `extra_set` (SQL
    /// assignments that may use `$3`, the time in unix seconds) and appends `event` in the same
    /// transaction. `None`: the guard did not hold.
    async fn transition(
        &self,
        id: &str,
        guard: Guard<'_>,
        to: JobStatus,
        extra_set: &str,
        event: NewEvent,
    ) -> Result<Option<(JobRow, EventRow)>> {
        let (_writer, mut tx) = self.begin_write().await?;
        // PostgreSQL refuses a bound parameter the statement does not use.
        let uses_now = extra_set.contains("$3");
        let sql = format!(
            "UPDATE jobs SET status = $1{extra_set} WHERE id = $2{} RETURNING {COLUMNS}",
            guard.condition(self.backend, if uses_now { "$4" } else { "$3" })
        );
        let mut q = sqlx::query_as::<_, JobRow>(&sql).bind(to).bind(id);
        if uses_now {
            q = q.bind(now());
        }
        if let Some(epoch) = guard.epoch() {
            q = q.bind(epoch);
        }
        let Some(row) = q.fetch_optional(&mut *tx).await? else {
            return Ok(None);
        };
        let ev = insert_event(&mut tx, self.backend, id, &event, Guard::None)
            .await?
            .expect("an unguarded event insert returns its row. This is a bug.");
        if to == Queued {
            self.notify_queue(&mut tx).await?;
        }
        tx.commit().await?;
        self.publish([ev.clone()]);
        Ok(Some((row, ev)))
    }

    /// Wakes every worker's claim loop at commit (PostgreSQL; a SQLite worker is woken in
    /// process by whoever queued the job).
    async fn notify_queue(&self, tx: &mut sqlx::AnyConnection) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(super::sql::QUEUE_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// Records a job's estimated peak memory; returns the updated row.
    pub async fn set_estimated_memory(&self, id: &str, bytes: u64) -> Result<Option<JobRow>> {
        let (_writer, mut tx) = self.begin_write().await?;
        let row = sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET estimated_peak_memory_bytes = $1 WHERE id = $2 RETURNING {COLUMNS}"
        ))
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// The oldest queued jobs without a memory estimate (created on an API node, which has no
    /// device to estimate for): a worker estimates them for its device before it claims.
    pub async fn queued_without_estimate(&self, limit: i64) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = $1 \
             AND estimated_peak_memory_bytes IS NULL ORDER BY n LIMIT $2"
        ))
        .bind(Queued)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records the estimate of a queued job that has none yet (the first worker to estimate
    /// it wins; all of a cluster's workers of one kind estimate the same). `false`: it had one,
    /// or left the queue.
    pub async fn set_queued_estimate(&self, id: &str, bytes: u64) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE jobs SET estimated_peak_memory_bytes = $1 WHERE id = $2 AND status = $3 \
             AND estimated_peak_memory_bytes IS NULL",
        )
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(id)
        .bind(Queued)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// `validating_files → queued`.
    pub async fn mark_queued(&self, id: &str) -> Result<bool> {
        let ev = NewEvent::status(Queued, "info", "Files validated; job queued");
        Ok(self
            .transition(id, Guard::Statuses(&[ValidatingFiles]), Queued, "", ev)
            .await?
            .is_some())
    }

    /// `running → queued` by the worker holding `lease` (suspended for a shutdown).
    pub async fn requeue(&self, lease: &Lease, message: &str) -> Result<bool> {
        let ev = NewEvent::status(Queued, "info", message);
        Ok(self
            .transition(&lease.job_id, Guard::Holding(lease), Queued, RELEASE, ev)
            .await?
            .is_some())
    }

    /// `running → queued` for a job whose holder is gone (its lease expired, or its process
    /// died): the status event carries `interrupted: true`, which is what
    /// [`Store::interruptions`] counts.
    pub async fn requeue_interrupted(&self, lease: &Lease, message: &str) -> Result<bool> {
        self.requeue_counted(Guard::Expired(lease), lease, message)
            .await
    }

    /// `running → queued` by the worker holding `lease`, for a run stopped by a failure that
    /// should pass (the artifact storage down): counted like an interruption, so
    /// `SFTD_MAX_ATTEMPTS` caps these retries too.
    pub async fn requeue_held_interrupted(&self, lease: &Lease, message: &str) -> Result<bool> {
        self.requeue_counted(Guard::Holding(lease), lease, message)
            .await
    }

    async fn requeue_counted(
        &self,
        guard: Guard<'_>,
        lease: &Lease,
        message: &str,
    ) -> Result<bool> {
        let mut ev = NewEvent::status(Queued, "info", message);
        if let Some(data) = ev.data.as_mut() {
            data["interrupted"] = true.into();
        }
        Ok(self
            .transition(&lease.job_id, guard, Queued, RELEASE, ev)
            .await?
            .is_some())
    }

    /// How many times a run of this job was interrupted by a crash (requeued at start-up).
    pub async fn interruptions(&self, id: &str) -> Result<i64> {
        let interrupted = self.backend.json_field("data", "'interrupted'");
        Ok(sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM events WHERE job_id = $1 AND {interrupted} IS NOT NULL"
        ))
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Jobs waiting for their files and model to be checked (a previous process may have left
    /// them half-way).
    pub async fn validating_jobs(&self) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = $1 ORDER BY n"
        ))
        .bind(ValidatingFiles)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Any non-terminal status → `cancelled`. Returns the updated job, or `None` if it had
    /// already finished.
    pub async fn cancel_job(&self, id: &str) -> Result<Option<JobRow>> {
        let ev = NewEvent::status(Cancelled, "info", "Fine-tuning job cancelled");
        Ok(self
            .transition(
                id,
                Guard::Statuses(&[ValidatingFiles, Queued, Running]),
                Cancelled,
                ", finished_at = $3, estimated_finish = NULL, lease_expires_at = NULL",
                ev,
            )
            .await?
            .map(|(row, _)| row))
    }

    /// `from → failed` with a message the user can act on (a job that never ran).
    pub async fn fail_job(&self, id: &str, from: &[JobStatus], err: &JobError) -> Result<bool> {
        self.fail(id, Guard::Statuses(from), err).await
    }

    /// `running → failed` by the worker holding `lease`.
    pub async fn fail_running(&self, lease: &Lease, err: &JobError) -> Result<bool> {
        self.fail(&lease.job_id, Guard::Holding(lease), err).await
    }

    /// `running → failed` for a job whose holder is gone and that has been interrupted too often.
    pub async fn fail_interrupted(&self, lease: &Lease, err: &JobError) -> Result<bool> {
        self.fail(&lease.job_id, Guard::Expired(lease), err).await
    }

    async fn fail(&self, id: &str, guard: Guard<'_>, err: &JobError) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let sql = format!(
            "UPDATE jobs SET status = $1, finished_at = $2, estimated_finish = NULL, \
             lease_expires_at = NULL, error_code = $3, error_message = $4, error_param = $5 \
             WHERE id = $6{}",
            guard.condition(self.backend, "$7")
        );
        let mut q = sqlx::query(&sql)
            .bind(Failed)
            .bind(now())
            .bind(&err.code)
            .bind(&err.message)
            .bind(&err.param)
            .bind(id);
        if let Some(epoch) = guard.epoch() {
            q = q.bind(epoch);
        }
        if q.execute(&mut *tx).await?.rows_affected() != 1 {
            return Ok(false);
        }
        let ev = NewEvent::status(
            Failed,
            "error",
            format!("Fine-tuning job failed: {}", err.message),
        );
        let ev = insert_event(&mut tx, self.backend, id, &ev, Guard::None).await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(true)
    }

    /// `running → succeeded` by the worker holding `lease`, registering the result files in
    /// the same transaction. Returns `false` (and writes nothing) if the job was cancelled
    /// meanwhile or the lease was lost.
    pub async fn succeed_job(
        &self,
        lease: &Lease,
        trained_tokens: i64,
        fine_tuned_model: &str,
        results: &[NewFile],
    ) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let sql = format!(
            "UPDATE jobs SET status = $1, finished_at = $2, estimated_finish = NULL, \
             lease_expires_at = NULL, trained_tokens = $3, fine_tuned_model = $4 WHERE id = $5{}",
            Guard::Holding(lease).condition(self.backend, "$6")
        );
        let done = sqlx::query(&sql)
            .bind(Succeeded)
            .bind(now())
            .bind(trained_tokens)
            .bind(fine_tuned_model)
            .bind(&lease.job_id)
            .bind(lease.epoch)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !done {
            return Ok(false);
        }
        for f in results {
            insert_file(&mut tx, f).await?;
        }
        let ev = NewEvent::status(Succeeded, "info", "The job has successfully completed");
        let ev = insert_event(&mut tx, self.backend, &lease.job_id, &ev, Guard::None).await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(true)
    }

    /// Jobs per status, for `/metrics`.
    pub async fn job_counts(&self) -> Result<Vec<(JobStatus, i64)>> {
        Ok(
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Tokens trained by finished jobs, for `/metrics`.
    pub async fn trained_tokens_total(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(trained_tokens), 0) AS BIGINT) FROM jobs")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
