//! Probes and metrics: `/healthz` (the process answers), `/readyz` (the database answers within
//! two seconds and the worker thread runs and still comes round to the queue), `/metrics`
//! (Prometheus text: queue depth, jobs by status, tokens trained, SSE clients, and every
//! registered worker's state, free memory and heartbeat age).

use super::AppState;
use crate::store::JobStatus;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The probes, public so orchestrators need no key.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// `/metrics`, behind the API key like `/v1` (it describes the workload).
pub fn metrics_routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// How long `/readyz` waits for the database: a server that hangs (a stalled host, a network
/// partition that drops packets) would otherwise hold the probe open until the orchestrator's own
/// timeout, which reports no reason.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let db = matches!(
        tokio::time::timeout(READY_DB_TIMEOUT, s.store.ping()).await,
        Ok(Ok(()))
    );
    let worker_state = if !s.worker.is_alive() {
        "stopped"
    } else if s.worker.is_stalled() {
        "stalled"
    } else {
        "running"
    };
    let worker = worker_state == "running";
    let status = if db && worker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "unavailable" },
        "database": db,
        "worker": worker,
        "worker_state": worker_state,
    });
    (status, Json(body))
}

async fn metrics(State(s): State<AppState>) -> Result<impl IntoResponse, super::error::AppError> {
    let counts = s.store.job_counts().await?;
    let workers: Vec<super::workers::WorkerObject> = s
        .store
        .list_workers()
        .await?
        .into_iter()
        .map(|w| super::workers::WorkerObject::from(w).judged(s.config.lease_ms))
        .collect();
    let tokens = s.store.trained_tokens_total().await?;
    let count = |st: JobStatus| {
        counts
            .iter()
            .find(|(status, _)| *status == st)
            .map_or(0, |(_, n)| *n)
    };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, i64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "sftd_queue_depth",
        "gauge",
        "Jobs waiting for the worker.",
        vec![(String::new(), count(JobStatus::Queued))],
    );
    metric(
        "sftd_jobs",
        "gauge",
        "Jobs by status.",
        JobStatus::ALL
            .iter()
            .map(|st| (format!("{{status=\"{st}\"}}"), count(*st)))
            .collect(),
    );
    metric(
        "sftd_trained_tokens_total",
        "counter",
        "Tokens trained by succeeded jobs.",
        vec![(String::new(), tokens)],
    );
    metric(
        "sftd_sse_clients",
        "gauge",
        "Open event streams.",
        vec![(String::new(), s.sse_clients.load(Ordering::Relaxed))],
    );
    metric(
        "sftd_worker_busy",
        "gauge",
        "1 while the worker trains a job.",
        vec![(String::new(), i64::from(s.worker.running_job().is_some()))],
    );
    metric(
        "sftd_workers",
        "gauge",
        "Registered workers by state (active: heartbeats within a lease).",
        ["active", "lost"]
            .iter()
            .map(|st| {
                let n = workers.iter().filter(|w| w.state == *st).count();
                (format!("{{state=\"{st}\"}}"), n as i64)
            })
            .collect(),
    );
    let label = |w: &super::workers::WorkerObject| {
        format!("{{worker=\"{}\",device=\"{}\"}}", w.id, w.device)
    };
    metric(
        "sftd_worker_memory_free_bytes",
        "gauge",
        "Free memory of each registered worker's device at its last heartbeat.",
        workers
            .iter()
            .filter_map(|w| Some((label(w), w.memory_free_bytes?)))
            .collect(),
    );
    metric(
        "sftd_worker_heartbeat_age_milliseconds",
        "gauge",
        "Time since each registered worker's last heartbeat.",
        workers
            .iter()
            .map(|w| (label(w), (w.heartbeat_age_seconds * 1000.0).round() as i64))
            .collect(),
    );
    metric(
        "sftd_worker_running",
        "gauge",
        "1 while a registered worker runs a job.",
        workers
            .iter()
            .map(|w| (label(w), i64::from(w.current_job.is_some())))
            .collect(),
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}

/// `sftd healthcheck`: whether `GET /healthz` at `addr` answers 200 within 5 s. An unspecified
/// address (0.0.0.0, ::) is probed on loopback.
pub fn probe(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write as _};
    use std::time::Duration;
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(5);
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let _ = conn.set_write_timeout(Some(timeout));
    let request = format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}
