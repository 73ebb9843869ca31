//! The `workers` table: every worker process registers itself, and its heartbeat keeps its row
//! current (device, free memory, the job it runs); the API lists it in `GET /v1/workers`.

use super::{now, Result, Store};

row_struct! {
    #[derive(Debug, Clone)]
    pub struct WorkerRow {
        pub id: String,
        pub hostname: String,
        pub device: String,
        pub memory_total_bytes: Option<i64>,
        pub memory_free_bytes: Option<i64>,
        pub current_job: Option<String>,
        /// Unix seconds.
        pub started_at: i64,
        /// Unix milliseconds, the database's clock.
        pub heartbeat_at: i64,
        /// Milliseconds since the last heartbeat, by the database's clock when read.
        pub heartbeat_age_ms: i64,
    }
}

/// A worker as it registers.
pub struct NewWorker {
    pub id: String,
    pub hostname: String,
    pub device: String,
    pub memory_total_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
}

fn bytes(b: Option<u64>) -> Option<i64> {
    b.map(|b| i64::try_from(b).unwrap_or(i64::MAX))
}

impl Store {
    pub async fn register_worker(&self, w: &NewWorker) -> Result<()> {
        let (_writer, mut tx) = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO workers (id, hostname, device, memory_total_bytes, memory_free_bytes, \
             started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $5, $6, {})",
            self.backend.now_ms()
        ))
        .bind(&w.id)
        .bind(&w.hostname)
        .bind(&w.device)
        .bind(bytes(w.memory_total_bytes))
        .bind(bytes(w.memory_free_bytes))
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a heartbeat. `false`: the row is gone (removed as dead by an operator); the
    /// caller registers again.
    pub async fn worker_heartbeat(
        &self,
        id: &str,
        memory_free_bytes: Option<u64>,
        current_job: Option<&str>,
    ) -> Result<bool> {
        let (_writer, mut tx) = self.begin_write().await?;
        let n = sqlx::query(&format!(
            "UPDATE workers SET heartbeat_at = {}, memory_free_bytes = $1, current_job = $2 \
             WHERE id = $3",
            self.backend.now_ms()
        ))
        .bind(bytes(memory_free_bytes))
        .bind(current_job)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// A worker that stops cleanly leaves the registry.
    pub async fn remove_worker(&self, id: &str) -> Result<()> {
        let (_writer, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every registered worker, oldest first.
    pub async fn list_workers(&self) -> Result<Vec<WorkerRow>> {
        Ok(sqlx::query_as::<_, WorkerRow>(&format!(
            "SELECT id, hostname, device, memory_total_bytes, memory_free_bytes, current_job, \
             started_at, heartbeat_at, {} - heartbeat_at AS heartbeat_age_ms \
             FROM workers ORDER BY started_at, id",
            self.backend.now_ms()
        ))
        .fetch_all(&self.pool)
        .await?)
    }
}
