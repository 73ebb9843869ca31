//! The `checkpoints` table: one row per saved training step, recorded with its event.

use super::events::{insert as insert_event, NewEvent};
use super::guard::{Guard, Lease};
use super::{new_id, now, Result, Store};

row_struct! {
    #[derive(Debug, Clone)]
    pub struct CheckpointRow {
        pub id: String,
        pub job_id: String,
        pub created_at: i64,
        pub step: i64,
        /// JSON: step, train_loss, train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy.
        pub metrics: String,
        /// The key of the checkpoint's objects in the artifact storage (= its path relative to the
        /// data dir): `jobs/<id>/checkpoints/epoch-<E>/step-<N>`, or `…/checkpoints/step-<N>` for
        /// rows written before per-claim keys.
        pub path: String,
    }
}

const COLUMNS: &str = "id, job_id, created_at, step, metrics, path";

impl Store {
    /// Records a checkpoint (`path`: the key of its objects) and its event while the job runs
    /// under `lease`. A step already recorded under the same path is ignored; under another
    /// path (the step saved again by a later run) the row is pointed at the new objects.
    /// Returns whether anything was written.
    pub async fn add_checkpoint(
        &self,
        lease: &Lease,
        step: i64,
        metrics: &serde_json::Value,
        path: &str,
    ) -> Result<bool> {
        self.add_checkpoint_keeping(lease, step, metrics, path, 0)
            .await
    }

    /// [`Store::add_checkpoint`], then deletes all but the job's `keep` newest checkpoint rows
    /// (0 keeps all), matching the directories `save_total_limit` keeps on disk.
    pub async fn add_checkpoint_keeping(
        &self,
        lease: &Lease,
        step: i64,
        metrics: &serde_json::Value,
        path: &str,
        keep: u32,
    ) -> Result<bool> {
        let job_id = lease.job_id.as_str();
        let (_writer, mut tx) = self.begin_write().await?;
        let holding = Guard::Holding(lease);
        // A step recorded before (a run that resumed from an older checkpoint because the newer
        // one was damaged or gone, and saved this step again) now names the new objects.
        let id: Option<String> = sqlx::query_scalar(&format!(
            "INSERT INTO checkpoints (id, job_id, created_at, step, metrics, path) \
             SELECT $1, $2, $3, $4, $5, $6 \
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $2{}) \
             ON CONFLICT (job_id, step) DO UPDATE SET created_at = excluded.created_at, \
             metrics = excluded.metrics, path = excluded.path \
             WHERE checkpoints.path <> excluded.path RETURNING id",
            holding.condition(self.backend, "$7")
        ))
        .bind(new_id("ftckpt"))
        .bind(job_id)
        .bind(now())
        .bind(step)
        .bind(metrics.to_string())
        .bind(path)
        .bind(lease.epoch)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            return Ok(false);
        };
        let ev = NewEvent {
            level: "info",
            kind: "message",
            message: format!("Checkpoint saved at step {step}"),
            data: Some(serde_json::json!({ "checkpoint_id": id, "step": step })),
            step: None,
        };
        let ev = insert_event(&mut tx, self.backend, job_id, &ev, holding).await?;
        if keep > 0 {
            sqlx::query(
                "DELETE FROM checkpoints WHERE job_id = $1 AND step NOT IN \
                 (SELECT step FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT $2)",
            )
            .bind(job_id)
            .bind(i64::from(keep))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.publish(ev);
        Ok(true)
    }

    /// The key every checkpoint row names, of every job.
    pub async fn all_checkpoint_paths(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT path FROM checkpoints")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Newest first; `after` is the id of the last checkpoint of the previous page.
    pub async fn list_checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<CheckpointRow>> {
        Ok(sqlx::query_as::<_, CheckpointRow>(&format!(
            "SELECT {COLUMNS} FROM checkpoints WHERE job_id = $1 \
             AND ($2 IS NULL OR step < (SELECT step FROM checkpoints WHERE id = $2)) \
             ORDER BY step DESC LIMIT $3"
        ))
        .bind(job_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}
