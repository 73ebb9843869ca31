//! `/v1/files`: upload (every line validated before anything is stored), list, get, download,
//! delete.

use super::error::{AppError, AppPath, AppQuery};
use super::types::{DeletedObject, FileListQuery, FileObject, List};
use super::AppState;
use crate::store::files::{DeleteFile, NewFile, PURPOSE_FINE_TUNE};
use crate::store::{new_id, Store};
use crate::train::data::{validate_jsonl, RowError};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Multipart framing allowance on top of the file itself.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

pub fn routes(max_upload_bytes: u64) -> Router<AppState> {
    let body_limit = (max_upload_bytes + MULTIPART_OVERHEAD).min(usize::MAX as u64) as usize;
    Router::new()
        .route(
            "/v1/files",
            get(list)
                .post(upload)
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/v1/files/{file_id}", get(retrieve).delete(delete))
        .route("/v1/files/{file_id}/content", get(content))
}

async fn upload(
    State(s): State<AppState>,
    multipart: Multipart,
) -> Result<Json<FileObject>, AppError> {
    let upload = receive(&s.store, multipart, s.config.max_upload_bytes).await?;
    let row = store_upload(&s.store, upload).await?;
    tracing::info!(file = %row.id, bytes = row.bytes, "file uploaded");
    Ok(Json(row.into()))
}

async fn list(
    State(s): State<AppState>,
    AppQuery(q): AppQuery<FileListQuery>,
) -> Result<Json<List<FileObject>>, AppError> {
    let limit = super::types::page_limit(q.limit, 10_000)?;
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(
                AppError::bad_request(format!("order must be asc or desc, got {o:?}"))
                    .param("order"),
            )
        }
    };
    let rows = s
        .store
        .list_files(
            q.purpose.as_deref(),
            q.after.as_deref(),
            limit + 1,
            ascending,
        )
        .await?;
    let items = rows.into_iter().map(FileObject::from).collect();
    Ok(Json(List::page(items, limit, |f| f.id.clone())))
}

async fn retrieve(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<FileObject>, AppError> {
    let row = s
        .store
        .get_file(&id)
        .await?
        .ok_or_else(|| no_such_file(&id))?;
    Ok(Json(row.into()))
}

async fn content(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Response, AppError> {
    let row = s
        .store
        .get_file(&id)
        .await?
        .ok_or_else(|| no_such_file(&id))?;
    let file = tokio::fs::File::open(s.store.file_path(&row))
        .await
        .map_err(AppError::internal)?;
    let body = Body::from_stream(chunks(file));
    let disposition = format!(
        "attachment; filename=\"{}\"",
        clean_filename(Some(&row.filename)).replace(|c: char| !c.is_ascii(), "_")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, row.bytes.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

async fn delete(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<DeletedObject>, AppError> {
    match s.store.delete_file(&id).await? {
        DeleteFile::Deleted(row) => {
            let _ = tokio::fs::remove_file(s.store.file_path(&row)).await;
            Ok(Json(DeletedObject {
                id,
                object: "file",
                deleted: true,
            }))
        }
        DeleteFile::NotFound => Err(no_such_file(&id)),
        DeleteFile::InUse(job) => Err(AppError::conflict(format!(
            "file {id} is used by job {job}, which has not finished; cancel it first"
        ))
        .code("file_in_use")),
    }
}

fn no_such_file(id: &str) -> AppError {
    AppError::not_found(format!("no file with id {id:?}"))
        .param("file_id")
        .code("file_not_found")
}

/// A received upload: its bytes are in a temporary file under the data dir.
struct Upload {
    tmp: TempPath,
    filename: String,
    purpose: String,
    bytes: u64,
}

/// Streams the multipart body into a temporary file, enforcing the size limit as it goes.
async fn receive(store: &Store, mut multipart: Multipart, max: u64) -> Result<Upload, AppError> {
    let mut purpose = None;
    let mut file: Option<(TempPath, String, u64)> = None;
    while let Some(mut field) = multipart.next_field().await? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await?),
            Some("file") => {
                let filename = clean_filename(field.file_name());
                let tmp = TempPath(store.data_dir().join("tmp").join(new_id("upload")));
                let mut out = tokio::fs::File::create(&tmp.0)
                    .await
                    .map_err(AppError::internal)?;
                let mut n = 0u64;
                while let Some(chunk) = field.chunk().await? {
                    n += chunk.len() as u64;
                    if n > max {
                        return Err(AppError::too_large(max).param("file"));
                    }
                    out.write_all(&chunk).await.map_err(AppError::internal)?;
                }
                out.flush().await.map_err(AppError::internal)?;
                file = Some((tmp, filename, n));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        AppError::bad_request("missing form field `purpose` (use \"fine-tune\")").param("purpose")
    })?;
    if purpose != PURPOSE_FINE_TUNE {
        return Err(AppError::bad_request(format!(
            "purpose must be \"fine-tune\", got {purpose:?}"
        ))
        .param("purpose"));
    }
    let (tmp, filename, bytes) =
        file.ok_or_else(|| AppError::bad_request("missing form field `file`").param("file"))?;
    Ok(Upload {
        tmp,
        filename,
        purpose,
        bytes,
    })
}

/// Validates every line, then moves the bytes into place and inserts the row. On any error
/// nothing remains: the temporary file is removed by its guard.
async fn store_upload(
    store: &Store,
    upload: Upload,
) -> Result<crate::store::files::FileRow, AppError> {
    // Each validation holds a whole file in memory: bound how many run at once.
    static VALIDATIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _permit = VALIDATIONS
        .acquire()
        .await
        .expect("the semaphore is never closed. This is a bug.");
    let path = upload.tmp.0.clone();
    let summary = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&path)?;
        Ok::<_, std::io::Error>(validate_jsonl(&bytes))
    })
    .await
    .map_err(AppError::internal)?
    .map_err(AppError::internal)?;
    let summary = match summary {
        Ok(s) => s,
        Err(rows) => return Err(invalid_dataset(&rows)),
    };
    let id = new_id("file");
    let rel = PathBuf::from("files").join(format!("{id}.jsonl"));
    let dest = store.data_dir().join(&rel);
    tokio::fs::rename(&upload.tmp.0, &dest)
        .await
        .map_err(AppError::internal)?;
    let new = NewFile {
        id,
        filename: upload.filename,
        purpose: upload.purpose,
        bytes: upload.bytes as i64,
        path: rel.to_string_lossy().into_owned(),
        rows: Some(summary.rows as i64),
        job_id: None,
    };
    match store.insert_file(&new).await {
        Ok(row) => Ok(row),
        Err(e) => {
            let _ = tokio::fs::remove_file(&dest).await;
            Err(e.into())
        }
    }
}

/// The client's file name reduced to its last path component, without control characters or
/// quotes (it ends up in a `Content-Disposition` header), at most 255 characters.
fn clean_filename(name: Option<&str>) -> String {
    let base = name
        .unwrap_or_default()
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default();
    let clean: String = base
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '"' | ';'))
        .take(255)
        .collect();
    if clean.trim().is_empty() {
        "upload.jsonl".into()
    } else {
        clean
    }
}

/// Lines reported in an error (the message says how many there were in all).
const MAX_REPORTED_LINES: usize = 1000;

fn invalid_dataset(rows: &[RowError]) -> AppError {
    let details: Vec<_> = rows
        .iter()
        .take(MAX_REPORTED_LINES)
        .map(|r| serde_json::json!({"line": r.line, "code": r.code, "message": r.message}))
        .collect();
    let first = rows
        .first()
        .map(|r| format!("; line {}: {}", r.line, r.message))
        .unwrap_or_default();
    AppError::bad_request(format!(
        "the file is not a valid fine-tuning dataset: {} bad line(s){first}",
        rows.len()
    ))
    .param("file")
    .code("invalid_file")
    .details(serde_json::Value::Array(details))
}

/// Removes a temporary upload unless it was moved into place.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        if Path::new(&self.0).exists() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The file's bytes as a stream of 64 KiB chunks, for streaming downloads.
fn chunks(file: tokio::fs::File) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
