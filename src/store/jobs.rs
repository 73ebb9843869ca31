//! The `jobs` table and its state machine. Each transition is one guarded
//! `UPDATE … WHERE id = ? AND status IN (…)` plus its status event, in one transaction.

use super::events::{insert as insert_event, EventRow, NewEvent};
use super::files::{insert as insert_file, NewFile};
use super::status::{in_list, JobStatus};
use super::{now, Result, Store};
use sqlx::FromRow;

#[derive(Debug, Clone, FromRow)]
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

const COLUMNS: &str = "n, id, created_at, started_at, finished_at, model, training_file, \
    validation_file, status, spec, config, seed, suffix, metadata, fine_tuned_model, \
    trained_tokens, estimated_finish, error_code, error_message, error_param, attempts, \
    idempotency_key, estimated_peak_memory_bytes";

use JobStatus::*;

impl Store {
    /// Inserts the job and its first event; with an idempotency key already used, returns
    /// that job instead and writes nothing.
    pub async fn create_job(&self, j: &NewJob) -> Result<Created> {
        let (_writer, mut tx) = self.begin_write().await?;
        if let Some(key) = &j.idempotency_key {
            let existing = sqlx::query_as::<_, JobRow>(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ?"
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {COLUMNS}"
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
        let ev = insert_event(&mut tx, &j.id, &ev, None).await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(Created::New(row))
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<JobRow>> {
        Ok(
            sqlx::query_as::<_, JobRow>(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?"))
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
        let filters: String = (0..metadata.len())
            .map(|i| {
                format!(
                    " AND EXISTS (SELECT 1 FROM json_each(jobs.metadata) m \
                     WHERE m.key = ?{} AND m.value = ?{})",
                    3 + 2 * i,
                    4 + 2 * i
                )
            })
            .collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs \
             WHERE (?1 IS NULL OR n < (SELECT n FROM jobs WHERE id = ?1)){filters} \
             ORDER BY n DESC LIMIT ?2"
        );
        let mut q = sqlx::query_as::<_, JobRow>(&sql).bind(after).bind(limit);
        for (k, v) in metadata {
            q = q.bind(k).bind(v);
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    /// Runs a guarded status change `from → to` with `extra_set` (SQL assignments, binding
    /// nothing) and appends `event` in the same transaction. `None`: the job was not in `from`.
    async fn transition(
        &self,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        extra_set: &str,
        event: NewEvent,
    ) -> Result<Option<(JobRow, EventRow)>> {
        let (_writer, mut tx) = self.begin_write().await?;
        let sql = format!(
            "UPDATE jobs SET status = ?1{extra_set} WHERE id = ?2 AND status IN ({}) RETURNING {COLUMNS}",
            in_list(from)
        );
        let Some(row) = sqlx::query_as::<_, JobRow>(&sql)
            .bind(to)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let ev = insert_event(&mut tx, id, &event, None)
            .await?
            .expect("an unguarded event insert returns its row. This is a bug.");
        tx.commit().await?;
        self.publish([ev.clone()]);
        Ok(Some((row, ev)))
    }

    /// Records a job's estimated peak memory; returns the updated row.
    pub async fn set_estimated_memory(&self, id: &str, bytes: u64) -> Result<Option<JobRow>> {
        let (_writer, mut tx) = self.begin_write().await?;
        let row = sqlx::query_as::<_, JobRow>(&format!(
            "UPDATE jobs SET estimated_peak_memory_bytes = ? WHERE id = ? RETURNING {COLUMNS}"
        ))
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// `validating_files → queued`.
    pub async fn mark_queued(&self, id: &str) -> Result<bool> {
        let ev = NewEvent::status(Queued, "info", "Files validated; job queued");
        Ok(self
            .transition(id, &[ValidatingFiles], Queued, "", ev)
            .await?
            .is_some())
    }

    /// Claims the oldest queued job (`queued → running`), counting the attempt.
    pub async fn claim_next_job(&self) -> Result<Option<JobRow>> {
        let id: Option<String> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE status = ? ORDER BY n LIMIT 1")
                .bind(Queued)
                .fetch_optional(&self.pool)
                .await?;
        let Some(id) = id else { return Ok(None) };
        let ev = NewEvent::status(Running, "info", "Fine-tuning job started");
        let set = ", started_at = COALESCE(started_at, unixepoch()), attempts = attempts + 1";
        // Lost a race (cancelled in between): the caller simply asks again.
        Ok(self
            .transition(&id, &[Queued], Running, set, ev)
            .await?
            .map(|(row, _)| row))
    }

    /// `running → queued` (suspended for shutdown, or found running after a crash).
    pub async fn requeue(&self, id: &str, message: &str) -> Result<bool> {
        let ev = NewEvent::status(Queued, "info", message);
        Ok(self
            .transition(id, &[Running], Queued, "", ev)
            .await?
            .is_some())
    }

    /// `running → queued` for a job a previous process left running: the status event carries
    /// `interrupted: true`, which is what [`Store::interruptions`] counts.
    pub async fn requeue_interrupted(&self, id: &str, message: &str) -> Result<bool> {
        let mut ev = NewEvent::status(Queued, "info", message);
        if let Some(data) = ev.data.as_mut() {
            data["interrupted"] = true.into();
        }
        Ok(self
            .transition(id, &[Running], Queued, "", ev)
            .await?
            .is_some())
    }

    /// How many times a run of this job was interrupted by a crash (requeued at start-up).
    pub async fn interruptions(&self, id: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM events WHERE job_id = ? \
             AND json_extract(data, '$.interrupted') = 1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Jobs a previous process left `running` or `validating_files`.
    pub async fn interrupted_jobs(&self) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status IN ({}) ORDER BY n",
            in_list(&[Running, ValidatingFiles])
        ))
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
                &[ValidatingFiles, Queued, Running],
                Cancelled,
                ", finished_at = unixepoch(), estimated_finish = NULL",
                ev,
            )
            .await?
            .map(|(row, _)| row))
    }

    /// `from → failed` with a message the user can act on.
    pub async fn fail_job(&self, id: &str, from: &[JobStatus], err: &JobError) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let done = sqlx::query(&format!(
            "UPDATE jobs SET status = ?, finished_at = unixepoch(), estimated_finish = NULL, \
             error_code = ?, error_message = ?, error_param = ? \
             WHERE id = ? AND status IN ({})",
            in_list(from)
        ))
        .bind(Failed)
        .bind(&err.code)
        .bind(&err.message)
        .bind(&err.param)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !done {
            return Ok(false);
        }
        let ev = NewEvent::status(
            Failed,
            "error",
            format!("Fine-tuning job failed: {}", err.message),
        );
        let ev = insert_event(&mut tx, id, &ev, None).await?;
        tx.commit().await?;
        self.publish(ev);
        Ok(true)
    }

    /// `running → succeeded`, registering the result files in the same transaction. Returns
    /// `false` (and writes nothing) if the job was cancelled meanwhile.
    pub async fn succeed_job(
        &self,
        id: &str,
        trained_tokens: i64,
        fine_tuned_model: &str,
        results: &[NewFile],
    ) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE jobs SET status = ?1, finished_at = unixepoch(), estimated_finish = NULL, \
             trained_tokens = ?2, fine_tuned_model = ?3 WHERE id = ?4 AND status = ?5",
        )
        .bind(Succeeded)
        .bind(trained_tokens)
        .bind(fine_tuned_model)
        .bind(id)
        .bind(Running)
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
        let ev = insert_event(&mut tx, id, &ev, None).await?;
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
            sqlx::query_scalar("SELECT COALESCE(SUM(trained_tokens), 0) FROM jobs")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
