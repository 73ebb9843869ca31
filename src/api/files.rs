//! `/v1/files`: upload (streamed to disk and validated line by line; stored only if every line
//! is valid, then moved into the artifact storage), list, get, download (streamed from the
//! storage), delete (row and object).

use super::error::{AppError, AppPath, AppQuery};
use super::types::{DeletedObject, FileListQuery, FileObject, List};
use super::upload::{self, Upload};
use super::AppState;
use crate::storage::Storage;
use crate::store::files::{DeleteFile, NewFile, PURPOSE_FINE_TUNE, PURPOSE_RESULTS};
use crate::store::new_id;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

/// The upload route meters its body itself against `SFTD_MAX_UPLOAD_BYTES` (see `upload`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/files",
            get(list).post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{file_id}", get(retrieve).delete(delete))
        .route("/v1/files/{file_id}/content", get(content))
}

/// Multipart `file` (JSONL) and `purpose`; the file streams to disk and is validated as it
/// arrives (see `upload`).
async fn upload(State(s): State<AppState>, req: Request) -> Response {
    let upload = match upload::receive(&s.store, req, s.config.max_upload_bytes).await {
        Ok(u) => u,
        Err(refusal) => return refusal,
    };
    match store_upload(&s, upload).await {
        Ok(row) => {
            tracing::info!(file = %row.id, bytes = row.bytes, "file uploaded");
            Json(FileObject::from(row)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn list(
    State(s): State<AppState>,
    AppQuery(q): AppQuery<FileListQuery>,
) -> Result<Json<List<FileObject>>, AppError> {
    let limit = super::types::page_limit(q.limit, 10_000)?;
    if let Some(p) = q.purpose.as_deref() {
        if p != PURPOSE_FINE_TUNE && p != PURPOSE_RESULTS {
            return Err(AppError::bad_request(format!(
                "purpose must be {PURPOSE_FINE_TUNE:?} or {PURPOSE_RESULTS:?}, got {p:?}"
            ))
            .param("purpose"));
        }
    }
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
    let (bytes, stream) = s.storage.get(&row.path).await?;
    let body = Body::from_stream(stream);
    let disposition = format!(
        "attachment; filename=\"{}\"",
        upload::clean_filename(Some(&row.filename)).replace(|c: char| !c.is_ascii(), "_")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, bytes.to_string()),
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
            // The row is gone, so nothing reaches the object any more: a failed delete leaves
            // an orphan (logged), not a broken file.
            if let Err(e) = s.storage.delete(&row.path).await {
                tracing::warn!(file = %id, error = %e, "could not delete the file's object");
            }
            s.storage.forget_local(&row.path).await;
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

/// Moves a validated upload into the storage and inserts its row. On any error nothing
/// remains: the temporary file is removed by its guard, the stored object by this function.
async fn store_upload(
    s: &AppState,
    upload: Upload,
) -> Result<crate::store::files::FileRow, AppError> {
    let id = new_id("file");
    let key = format!("files/{id}.jsonl");
    s.storage.move_in(&key, &upload.tmp.0).await?;
    let new = NewFile {
        id,
        filename: upload.filename,
        purpose: upload.purpose,
        bytes: upload.bytes as i64,
        path: key.clone(),
        rows: Some(upload.rows as i64),
        job_id: None,
    };
    match s.store.insert_file(&new).await {
        Ok(row) => Ok(row),
        Err(e) => {
            remove_object(&s.storage, &key).await;
            Err(e.into())
        }
    }
}

async fn remove_object(storage: &Storage, key: &str) {
    if let Err(e) = storage.delete(key).await {
        tracing::warn!(key, error = %e, "could not remove an unregistered upload");
    }
}
