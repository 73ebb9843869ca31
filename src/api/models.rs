//! `/v1/models`: every model id chat completions accept (base models in use, each succeeded
//! job's `fine_tuned_model`, each checkpoint's `fine_tuned_model_checkpoint`), and the
//! resolution of such an id (or a base model plus an `adapter` directory) to the directories
//! generation loads.

use super::error::{AppError, AppPath};
use super::types::List;
use super::AppState;
use crate::hub::Hub;
use crate::store::{JobRow, JobStatus};
use crate::train::spec::DEMO_MODEL;
use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What serving needs beside [`AppState`]: model resolution (the models themselves are loaded
/// and run by the worker, which owns the device).
#[derive(Clone)]
pub struct Models {
    pub hub: Hub,
}

impl Models {
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            hub: Hub::new(config),
        }
    }
}

pub fn routes(models: Models) -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{*model}", get(retrieve))
        .layer(Extension(models))
}

#[derive(Serialize, Clone)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
    /// sftd: the model this one was fine-tuned from (its base model, or for a checkpoint its
    /// job's fine-tuned model); absent for base models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// Every model id, base models first, then each job's models newest job first.
async fn all_models(s: &AppState) -> Result<Vec<ModelObject>, AppError> {
    let mut jobs: Vec<JobRow> = Vec::new();
    let mut after = None;
    loop {
        let page = s.store.list_jobs(after.as_deref(), 1000, &[]).await?;
        after = page.last().map(|j| j.id.clone());
        let done = page.len() < 1000;
        jobs.extend(page);
        if done {
            break;
        }
    }
    let mut bases: BTreeMap<String, i64> = BTreeMap::from([(DEMO_MODEL.to_string(), 0)]);
    for j in &jobs {
        let created = bases.entry(j.model.clone()).or_insert(j.created_at);
        *created = (*created).min(j.created_at);
    }
    let mut out: Vec<ModelObject> = bases
        .into_iter()
        .map(|(id, created)| ModelObject {
            id,
            object: "model",
            created,
            owned_by: "sftd",
            parent: None,
        })
        .collect();
    for j in &jobs {
        let name = crate::worker::fine_tuned_model_name(&j.model, j.suffix.as_deref(), &j.id);
        if j.fine_tuned_model.is_some() {
            out.push(ModelObject {
                id: name.clone(),
                object: "model",
                created: j.finished_at.unwrap_or(j.created_at),
                owned_by: "user",
                parent: Some(j.model.clone()),
            });
        }
        for c in s.store.list_checkpoints(&j.id, None, i64::MAX).await? {
            out.push(ModelObject {
                id: format!("{name}:ckpt-step-{}", c.step),
                object: "model",
                created: c.created_at,
                owned_by: "user",
                parent: Some(name.clone()),
            });
        }
    }
    Ok(out)
}

async fn list(State(s): State<AppState>) -> Result<Json<List<ModelObject>>, AppError> {
    let items = all_models(&s).await?;
    let n = items.len() as i64;
    Ok(Json(List::page(items, n.max(1), |m| m.id.clone())))
}

async fn retrieve(
    State(s): State<AppState>,
    AppPath(model): AppPath<String>,
) -> Result<Json<ModelObject>, AppError> {
    all_models(&s)
        .await?
        .into_iter()
        .find(|m| m.id == model)
        .map(Json)
        .ok_or_else(|| model_not_found(&model))
}

pub fn model_not_found(model: &str) -> AppError {
    AppError::not_found(format!(
        "the model {model:?} does not exist; GET /v1/models lists the models you can use"
    ))
    .param("model")
    .code("model_not_found")
}

/// The directories a request's model loads from.
pub struct Resolved {
    pub base_dir: PathBuf,
    pub adapter_dir: Option<PathBuf>,
}

/// `model` is a base model (demo, local directory, hub id), `ft:…:<job id>` (a succeeded job's
/// adapter) or `ft:…:<job id>:ckpt-step-<N>` (one of its checkpoints); `adapter` is an adapter
/// directory under `SFTD_MODEL_DIRS` applied to a base model.
pub async fn resolve(
    s: &AppState,
    models: &Models,
    model: &str,
    adapter: Option<&str>,
) -> Result<Resolved, AppError> {
    if model.starts_with("ft:") {
        if adapter.is_some() {
            return Err(AppError::bad_request(
                "`adapter` applies to a base model; a fine-tuned model already has its adapter",
            )
            .param("adapter"));
        }
        return resolve_fine_tuned(s, models, model).await;
    }
    let base_dir = base_dir(models, model).await?;
    let adapter_dir = match adapter {
        None => None,
        Some(a) => {
            let dir = models
                .hub
                .allowed_dir(a, "adapter")
                .map_err(|e| AppError::bad_request(e.to_string()).param("adapter"))?;
            if !dir.join(crate::train::checkpoint::ADAPTER_CONFIG).is_file() {
                return Err(AppError::bad_request(format!(
                    "adapter {a:?} is not a PEFT adapter directory (no adapter_config.json)"
                ))
                .param("adapter")
                .code("invalid_adapter"));
            }
            Some(dir)
        }
    };
    Ok(Resolved {
        base_dir,
        adapter_dir,
    })
}

async fn base_dir(models: &Models, model: &str) -> Result<PathBuf, AppError> {
    Ok(models.hub.resolve(model).await?)
}

async fn resolve_fine_tuned(
    s: &AppState,
    models: &Models,
    model: &str,
) -> Result<Resolved, AppError> {
    let (name, step) = match model.rsplit_once(":ckpt-step-") {
        Some((name, step)) => (
            name,
            Some(step.parse::<i64>().map_err(|_| model_not_found(model))?),
        ),
        None => (model, None),
    };
    let job_id = name.rsplit(':').next().unwrap_or_default();
    let job = s
        .store
        .get_job(job_id)
        .await?
        .filter(|j| {
            crate::worker::fine_tuned_model_name(&j.model, j.suffix.as_deref(), &j.id) == name
        })
        .ok_or_else(|| model_not_found(model))?;
    let key = match step {
        None => {
            if job.status != JobStatus::Succeeded {
                return Err(AppError::not_found(format!(
                    "the model {model:?} is not ready: its job is {}; a checkpoint \
                     ({name}:ckpt-step-N) can be used while it trains",
                    job.status
                ))
                .param("model")
                .code("model_not_found"));
            }
            crate::worker::adapter_key(&s.store, &job.id)
                .await?
                .ok_or_else(|| {
                    AppError::not_found(format!(
                        "the model {model:?} has no adapter: its result files were deleted"
                    ))
                    .param("model")
                    .code("model_not_found")
                })?
        }
        Some(step) => {
            let ckpt = s
                .store
                .list_checkpoints(&job.id, None, i64::MAX)
                .await?
                .into_iter()
                .find(|c| c.step == step)
                .ok_or_else(|| model_not_found(model))?;
            ckpt.path
        }
    };
    // The adapter's two files (a checkpoint's optimizer state is not needed to serve it).
    for file in [
        crate::train::checkpoint::ADAPTER_WEIGHTS,
        crate::train::checkpoint::ADAPTER_CONFIG,
    ] {
        match s.storage.fetch(&format!("{key}/{file}")).await {
            Ok(_) => {}
            Err(crate::storage::StorageError::NotFound(_)) => {
                return Err(AppError::not_found(format!(
                    "the adapter files of {model:?} are gone from the artifact storage"
                ))
                .param("model")
                .code("model_not_found"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let adapter_dir = s.storage.local_path(&key);
    Ok(Resolved {
        base_dir: base_dir(models, &job.model).await?,
        adapter_dir: Some(adapter_dir),
    })
}
