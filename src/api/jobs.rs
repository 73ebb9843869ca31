//! `/v1/fine_tuning/jobs`: create (idempotent with `Idempotency-Key`), list, retrieve, cancel,
//! checkpoints. The events route lives in `events.rs`.

use super::error::{AppError, AppJson, AppPath, AppQuery};
use super::types::{CheckpointObject, JobObject, List, Pagination};
use super::AppState;
use crate::store::JobRow;
use crate::train::spec::JobSpec;
use crate::worker::SubmitError;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/fine_tuning/jobs", get(list).post(create))
        .route("/v1/fine_tuning/jobs/{job_id}", get(retrieve))
        .route("/v1/fine_tuning/jobs/{job_id}/cancel", post(cancel))
        .route(
            "/v1/fine_tuning/jobs/{job_id}/checkpoints",
            get(checkpoints),
        )
}

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    AppJson(spec): AppJson<JobSpec>,
) -> Result<Response, AppError> {
    let key = idempotency_key(&headers)?;
    let (row, replayed) = s.worker.submit(spec, key).await.map_err(submit_error)?;
    let mut resp = Json(job_object(&s, row).await?).into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// `?after=&limit=` and OpenAI's `metadata[key]=value` filters.
async fn list(
    State(s): State<AppState>,
    AppQuery(q): AppQuery<Vec<(String, String)>>,
) -> Result<Json<List<JobObject>>, AppError> {
    let (p, metadata) = list_query(q)?;
    let limit = p.limit(1000)?;
    let rows = s
        .store
        .list_jobs(p.after.as_deref(), limit + 1, &metadata)
        .await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let mut files = s.store.result_file_ids(&ids).await?;
    let items = rows
        .into_iter()
        .map(|row| {
            let result_files = files.remove(&row.id).unwrap_or_default();
            JobObject::from_row(row, result_files)
        })
        .collect();
    Ok(Json(List::page(items, limit, |j| j.id.clone())))
}

async fn retrieve(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<JobObject>, AppError> {
    let row = s
        .store
        .get_job(&id)
        .await?
        .ok_or_else(|| no_such_job(&id))?;
    Ok(Json(job_object(&s, row).await?))
}

/// Cancelling a finished job is not an error: it returns the job unchanged (as OpenAI does).
async fn cancel(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<JobObject>, AppError> {
    let row = match s.worker.cancel_job(&id).await? {
        Some(Ok(row)) | Some(Err(row)) => row,
        None => return Err(no_such_job(&id)),
    };
    Ok(Json(job_object(&s, row).await?))
}

async fn checkpoints(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
    AppQuery(p): AppQuery<Pagination>,
) -> Result<Json<List<CheckpointObject>>, AppError> {
    let limit = p.limit(1000)?;
    let job = s
        .store
        .get_job(&id)
        .await?
        .ok_or_else(|| no_such_job(&id))?;
    let name = crate::worker::fine_tuned_model_name(&job.model, job.suffix.as_deref(), &job.id);
    let rows = s
        .store
        .list_checkpoints(&id, p.after.as_deref(), limit + 1)
        .await?;
    let items = rows
        .into_iter()
        .map(|c| CheckpointObject::from_row(c, &name))
        .collect();
    Ok(Json(List::page(items, limit, |c| c.id.clone())))
}

/// Splits the list query into pagination and `metadata[key]=value` pairs.
fn list_query(q: Vec<(String, String)>) -> Result<(Pagination, Vec<(String, String)>), AppError> {
    let mut p = Pagination::default();
    let mut metadata = Vec::new();
    for (k, v) in q {
        match k.as_str() {
            "after" => p.after = Some(v),
            "limit" => {
                p.limit = Some(v.parse().map_err(|_| {
                    AppError::bad_request(format!("limit must be an integer, got {v:?}"))
                        .param("limit")
                })?)
            }
            _ => {
                if let Some(key) = k
                    .strip_prefix("metadata[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    if key.is_empty() {
                        return Err(AppError::bad_request(
                            "metadata filters are metadata[key]=value with a non-empty key",
                        )
                        .param("metadata"));
                    }
                    metadata.push((key.to_string(), v));
                }
            }
        }
    }
    Ok((p, metadata))
}

pub(super) fn no_such_job(id: &str) -> AppError {
    AppError::not_found(format!("no fine-tuning job with id {id:?}"))
        .param("job_id")
        .code("job_not_found")
}

async fn job_object(s: &AppState, row: JobRow) -> Result<JobObject, AppError> {
    let mut files = s.store.result_file_ids(&[row.id.as_str()]).await?;
    let result_files = files.remove(&row.id).unwrap_or_default();
    Ok(JobObject::from_row(row, result_files))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, AppError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY => Ok(Some(k.to_string())),
        _ => Err(AppError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))
        .param("Idempotency-Key")),
    }
}

fn submit_error(e: SubmitError) -> AppError {
    match e {
        SubmitError::Invalid {
            param,
            code,
            message,
        } => AppError::bad_request(message).param(param).code(code),
        SubmitError::Model(e) => e.into(),
        e @ SubmitError::IdempotencyConflict(_) => AppError::conflict(e.to_string())
            .param("Idempotency-Key")
            .code("idempotency_key_reused"),
        SubmitError::Store(e) => e.into(),
    }
}
