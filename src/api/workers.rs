//! `GET /v1/workers` (admin): the registered workers with their device, free memory, current
//! job and last heartbeat, for whoever runs the cluster.

use super::error::AppError;
use super::types::List;
use super::AppState;
use crate::store::workers::WorkerRow;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/workers", get(list))
}

/// A worker as the API shows it.
#[derive(Serialize)]
pub struct WorkerObject {
    pub object: &'static str,
    pub id: String,
    pub hostname: String,
    pub device: String,
    pub memory_total_bytes: Option<i64>,
    pub memory_free_bytes: Option<i64>,
    pub current_job: Option<String>,
    pub started_at: i64,
    /// Unix seconds (with milliseconds) of the last heartbeat.
    pub last_heartbeat_at: f64,
    pub heartbeat_age_seconds: f64,
    /// `active` while its heartbeats come within a lease, else `lost` (crashed, frozen or cut
    /// off; its job is taken over once the lease expires).
    pub state: &'static str,
}

impl From<WorkerRow> for WorkerObject {
    /// The row as shown, `active` until [`WorkerObject::judged`] compares its heartbeat's age
    /// with the lease.
    fn from(w: WorkerRow) -> Self {
        Self {
            object: "worker",
            id: w.id,
            hostname: w.hostname,
            device: w.device,
            memory_total_bytes: w.memory_total_bytes,
            memory_free_bytes: w.memory_free_bytes,
            current_job: w.current_job,
            started_at: w.started_at,
            last_heartbeat_at: w.heartbeat_at as f64 / 1000.0,
            heartbeat_age_seconds: w.heartbeat_age_ms as f64 / 1000.0,
            state: "active",
        }
    }
}

impl WorkerObject {
    /// `lost` when no heartbeat came within a lease of `lease_ms`.
    pub fn judged(mut self, lease_ms: u64) -> Self {
        if self.heartbeat_age_seconds * 1000.0 > lease_ms as f64 {
            self.state = "lost";
        }
        self
    }
}

async fn list(State(s): State<AppState>) -> Result<Json<List<WorkerObject>>, AppError> {
    let rows = s.store.list_workers().await?;
    let data: Vec<WorkerObject> = rows
        .into_iter()
        .map(|w| WorkerObject::from(w).judged(s.config.lease_ms))
        .collect();
    let n = data.len() as i64;
    Ok(Json(List::page(data, n, |w| w.id.clone())))
}
