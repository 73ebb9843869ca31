//! The `files` table: uploaded datasets and job result files, whose bytes live under the data dir.

use super::status::{in_list, JobStatus};
use super::{now, Result, Store};
use sqlx::AnyConnection;
use std::collections::HashMap;
use std::path::PathBuf;

/// Purpose of an uploaded dataset.
pub const PURPOSE_FINE_TUNE: &str = "fine-tune";
/// Purpose of a file a job produced.
pub const PURPOSE_RESULTS: &str = "fine-tune-results";

row_struct! {
    #[derive(Debug, Clone)]
    pub struct FileRow {
        pub id: String,
        pub created_at: i64,
        pub filename: String,
        pub purpose: String,
        pub bytes: i64,
        /// Relative to the data dir.
        pub path: String,
        pub rows: Option<i64>,
        pub job_id: Option<String>,
    }
}

/// A file to register; its bytes are already at `path` (relative to the data dir).
pub struct NewFile {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub path: String,
    pub rows: Option<i64>,
    pub job_id: Option<String>,
}

const COLUMNS: &str = "id, created_at, filename, purpose, bytes, path, rows, job_id";

/// Registers `f` inside the caller's transaction (an upload's own, or a job's success).
pub(super) async fn insert(conn: &mut AnyConnection, f: &NewFile) -> Result<FileRow> {
    Ok(sqlx::query_as::<_, FileRow>(&format!(
        "INSERT INTO files ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
    ))
    .bind(&f.id)
    .bind(now())
    .bind(&f.filename)
    .bind(&f.purpose)
    .bind(f.bytes)
    .bind(&f.path)
    .bind(f.rows)
    .bind(&f.job_id)
    .fetch_one(conn)
    .await?)
}

impl Store {
    pub async fn insert_file(&self, f: &NewFile) -> Result<FileRow> {
        let (_writer, mut tx) = self.begin_write().await?;
        let row = insert(&mut tx, f).await?;
        tx.commit().await?;
        Ok(row)
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRow>> {
        Ok(
            sqlx::query_as::<_, FileRow>(&format!("SELECT {COLUMNS} FROM files WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Newest first; `after` is the id of the last file of the previous page.
    pub async fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        ascending: bool,
    ) -> Result<Vec<FileRow>> {
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let n = self.backend.file_order();
        let sql = format!(
            "SELECT {COLUMNS} FROM files \
             WHERE ($1 IS NULL OR purpose = $1) \
               AND ($2 IS NULL OR {n} {cmp} (SELECT {n} FROM files WHERE id = $2)) \
             ORDER BY {n} {order} LIMIT $3"
        );
        Ok(sqlx::query_as::<_, FileRow>(&sql)
            .bind(purpose)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The ids of the result files of each of `job_ids`, each job's in the order they were
    /// registered, in one query. A job without result files has no entry.
    pub async fn result_file_ids(&self, job_ids: &[&str]) -> Result<HashMap<String, Vec<String>>> {
        let ids = serde_json::to_string(job_ids).expect("strings serialize. This is a bug.");
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT job_id, id FROM files \
             WHERE job_id IN (SELECT value FROM {}) ORDER BY {}",
            self.backend.json_array("$1"),
            self.backend.file_order()
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let mut by_job: HashMap<String, Vec<String>> = HashMap::new();
        for (job_id, id) in rows {
            by_job.entry(job_id).or_default().push(id);
        }
        Ok(by_job)
    }

    /// The storage key of job `job_id`'s result file named `filename`, if it has one.
    pub async fn result_file_path(&self, job_id: &str, filename: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT path FROM files WHERE job_id = $1 AND purpose = $2 AND filename = $3",
        )
        .bind(job_id)
        .bind(PURPOSE_RESULTS)
        .bind(filename)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Deletes the row unless a job that has not finished uses the file; returns whether a row
    /// was deleted, or `Err(InUse)` through the outer result.
    pub async fn delete_file(&self, id: &str) -> Result<DeleteFile> {
        let (_writer, mut tx) = self.begin_write().await?;
        let in_use: Option<String> = sqlx::query_scalar(&format!(
            "SELECT id FROM jobs WHERE (training_file = $1 OR validation_file = $1 \
             OR {} = $1) \
             AND status IN ({}) LIMIT 1",
            self.backend.json_field("spec", "'tool_eval_file'"),
            in_list(&[
                JobStatus::ValidatingFiles,
                JobStatus::Queued,
                JobStatus::Running
            ])
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(job) = in_use {
            return Ok(DeleteFile::InUse(job));
        }
        let row = sqlx::query_as::<_, FileRow>(&format!(
            "DELETE FROM files WHERE id = $1 RETURNING {COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match row {
            Some(r) => DeleteFile::Deleted(r),
            None => DeleteFile::NotFound,
        })
    }

    /// Absolute path of a file's bytes.
    pub fn file_path(&self, f: &FileRow) -> PathBuf {
        self.data_dir.join(&f.path)
    }

    /// Every stored path, for removing orphaned uploads at start-up.
    pub async fn all_file_paths(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT path FROM files")
            .fetch_all(&self.pool)
            .await?)
    }
}

pub enum DeleteFile {
    Deleted(FileRow),
    NotFound,
    /// The id of a job that still needs the file.
    InUse(String),
}
