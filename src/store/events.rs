//! The `events` table: each job's log, numbered 1, 2, 3, … by `seq`, assigned inside the
//! inserting transaction so a committed event's `seq` never repeats and never skips.

use super::guard::{Guard, Lease};
use super::sql::Backend;
use super::status::JobStatus;
use super::{now, Result, Store};
use sqlx::AnyConnection;

row_struct! {
    #[derive(Debug, Clone, PartialEq)]
    pub struct EventRow {
        pub job_id: String,
        pub seq: i64,
        pub created_at: i64,
        pub level: String,
        pub kind: String as "type",
        pub message: String,
        /// JSON text.
        pub data: Option<String>,
        pub step: Option<i64>,
    }
}

impl EventRow {
    /// The job status this event announces, if it is a status change.
    pub fn status(&self) -> Option<JobStatus> {
        let data: serde_json::Value = serde_json::from_str(self.data.as_deref()?).ok()?;
        data.get("status")?.as_str()?.parse().ok()
    }

    /// Whether this is the job's last event (a terminal status change).
    pub fn is_terminal(&self) -> bool {
        self.status().is_some_and(|s| s.is_terminal())
    }
}

/// An event to append. `kind` is OpenAI's `type`: `message` or `metrics`.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub level: &'static str,
    pub kind: &'static str,
    pub message: String,
    pub data: Option<serde_json::Value>,
    pub step: Option<i64>,
}

impl NewEvent {
    pub fn info(message: impl Into<String>) -> Self {
        Self {
            level: "info",
            kind: "message",
            message: message.into(),
            data: None,
            step: None,
        }
    }

    /// A status change: `data.status` is what clients (and the stream's close) key on.
    pub fn status(status: JobStatus, level: &'static str, message: impl Into<String>) -> Self {
        Self {
            level,
            kind: "message",
            message: message.into(),
            data: Some(serde_json::json!({ "status": status.as_str() })),
            step: None,
        }
    }
}

const COLUMNS: &str = "job_id, seq, created_at, level, type, message, data, step";

/// Appends `e` to `job_id`'s log inside the caller's transaction. With a guard, the insert
/// happens only while the job is in one of those statuses, or still leased to the writer
/// (returns `None` otherwise), so a worker can never add events after a job's terminal event,
/// nor after it lost the job to another worker.
pub(super) async fn insert(
    conn: &mut AnyConnection,
    backend: Backend,
    job_id: &str,
    e: &NewEvent,
    guard: Guard<'_>,
) -> Result<Option<EventRow>> {
    if backend == Backend::Postgres {
        // Writers of one job's events queue on its row, so `MAX(seq) + 1` is never taken twice
        // and commits come in `seq` order.
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(job_id)
            .execute(&mut *conn)
            .await?;
    }
    let condition = guard.condition(backend, "$8");
    let where_clause = if condition.is_empty() {
        String::new()
    } else {
        format!("WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1{condition})")
    };
    let sql = format!(
        "INSERT INTO events ({COLUMNS}) \
         SELECT $1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = $1), $2, $3, $4, $5, $6, $7 \
         {where_clause} RETURNING {COLUMNS}"
    );
    let mut q = sqlx::query_as::<_, EventRow>(&sql)
        .bind(job_id)
        .bind(now())
        .bind(e.level)
        .bind(e.kind)
        .bind(&e.message)
        .bind(e.data.as_ref().map(|d| d.to_string()))
        .bind(e.step);
    if let Guard::Holding(lease) = guard {
        q = q.bind(lease.epoch);
    }
    let row = q.fetch_optional(&mut *conn).await?;
    if let (Some(row), Backend::Postgres) = (&row, backend) {
        // Delivered at commit to every API node's event feed (see `feed`).
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::sql::EVENTS_CHANNEL)
            .bind(format!("{} {}", row.job_id, row.seq))
            .execute(&mut *conn)
            .await?;
    }
    Ok(row)
}

impl Store {
    /// Appends an event of the worker holding `lease` (the job is `running` and leased to it);
    /// `None` when the job has left `running` (cancelled meanwhile) or the lease was lost, in
    /// which case nothing was written.
    pub async fn append_running_event(
        &self,
        lease: &Lease,
        e: &NewEvent,
    ) -> Result<Option<EventRow>> {
        if crate::fault::fails("event_insert") {
            return Err(std::io::Error::other("injected fault (SFTD_FAULT_FAIL)").into());
        }
        let job_id = lease.job_id.as_str();
        let (_writer, mut tx) = self.begin_write().await?;
        let row = insert(&mut tx, self.backend, job_id, e, Guard::Holding(lease)).await?;
        crate::fault::point("event_insert");
        if let (Some(eta), Some(data)) = (
            e.data.as_ref().and_then(|d| d.get("eta_seconds")?.as_f64()),
            e.data.as_ref(),
        ) {
            if row.is_some() && data.get("train_loss").is_some() {
                sqlx::query("UPDATE jobs SET estimated_finish = $1 WHERE id = $2")
                    .bind(now() + eta.round() as i64)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        self.publish(row.clone());
        Ok(row)
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    pub async fn list_events(&self, job_id: &str, after: i64, limit: i64) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as::<_, EventRow>(&format!(
            "SELECT {COLUMNS} FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(job_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Highest optimizer step already recorded for `kind_key` (`train_loss` or `valid_loss`
    /// metrics), so a resumed run does not record a step twice.
    pub async fn last_metrics_step(&self, job_id: &str, key: &str) -> Result<Option<i64>> {
        let field = self.backend.json_field("data", "$2");
        Ok(sqlx::query_scalar(&format!(
            "SELECT MAX(step) FROM events WHERE job_id = $1 AND type = 'metrics' \
             AND {field} IS NOT NULL"
        ))
        .bind(job_id)
        .bind(key)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Every metrics event of a job, oldest first (for the results CSV).
    pub async fn metrics_events(&self, job_id: &str) -> Result<Vec<EventRow>> {
        Ok(sqlx::query_as::<_, EventRow>(&format!(
            "SELECT {COLUMNS} FROM events WHERE job_id = $1 AND type = 'metrics' ORDER BY seq"
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
