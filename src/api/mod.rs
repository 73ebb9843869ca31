//! The HTTP layer: the router (one sub-router per resource, `/v1` behind auth), shared state,
//! and the two servers: `serve` (the API, with or without a worker) and `serve_worker` (a
//! worker with only its probes and metrics), each running until SIGTERM/ctrl-c.

pub mod auth;
pub mod chat;
pub mod error;
pub mod events;
pub mod files;
pub mod health;
pub mod jobs;
pub mod logging;
pub mod models;
pub mod presets;
pub mod types;
pub mod ui;
mod upload;
pub mod workers;

use crate::config::Config;
use crate::hub::Hub;
use crate::storage::Storage;
use crate::store::Store;
use crate::worker::{Role, Worker, WorkerOptions};
use axum::Router;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use tokio::sync::watch;
use tower_http::trace::TraceLayer;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    /// Where uploads, checkpoints, adapters and result files live.
    pub storage: Storage,
    pub worker: Worker,
    /// Open SSE streams (for `/metrics`).
    pub sse_clients: Arc<AtomicI64>,
    /// The live side of every SSE stream (one relay for all of them).
    pub fanout: events::Fanout,
    /// Flips to `true` when the server shuts down; open streams end on it.
    pub shutdown: watch::Receiver<bool>,
}

/// The whole API. Public: the dashboard, `/healthz`, `/readyz`; `/metrics` and everything under
/// `/v1` need the API key when one is configured.
pub fn router(state: AppState) -> Router {
    let models = models::Models::new(&state.config);
    let protected = Router::new()
        .merge(chat::routes(models.clone()))
        .merge(models::routes(models))
        .merge(health::metrics_routes())
        .merge(files::routes())
        .merge(jobs::routes())
        .merge(presets::routes())
        .merge(events::routes())
        .merge(workers::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .merge(health::routes())
        .merge(ui::routes())
        .merge(protected)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(TraceLayer::new_for_http().make_span_with(logging::request_span))
        .with_state(state)
}

/// The routes of `sftd worker`: the probes, and `/metrics` behind the API key.
fn worker_router(state: AppState) -> Router {
    let protected = Router::new().merge(health::metrics_routes()).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), auth::require_key),
    );
    Router::new()
        .merge(health::routes())
        .merge(protected)
        .fallback(error::not_found)
        .layer(TraceLayer::new_for_http().make_span_with(logging::request_span))
        .with_state(state)
}

/// Runs `sftd serve`: opens the store, starts the worker (unless `--no-worker`), serves until
/// SIGTERM or ctrl-c, then suspends the running job (checkpointed and left queued) and returns.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let role = if config.no_worker {
        Role::Api
    } else {
        Role::All
    };
    run(config, role).await
}

/// Runs `sftd worker`: claims and trains jobs from the shared database, serving only
/// `/healthz`, `/readyz` and `/metrics` on `SFTD_ADDR`; SIGTERM suspends the running job.
pub async fn serve_worker(config: Config) -> anyhow::Result<()> {
    run(config, Role::Trainer).await
}

async fn run(mut config: Config, role: Role) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    config.data_dir = config.data_dir.canonicalize()?;
    tracing::info!(config = ?config, ?role, "starting sftd");
    let (lease, heartbeat) = config.lease_timing()?;
    // A device that cannot be opened is a configuration error: fail now, not in a silent
    // worker. An API node needs one too: it generates chat answers on it.
    crate::train::device_from_str(&config.device)
        .map_err(|e| anyhow::anyhow!("SFTD_DEVICE={:?} cannot be used: {e:#}", config.device))?;
    let store = Store::open(&config.database_url(), &config.data_dir).await?;
    let storage = Storage::open(config.storage_url.as_deref(), &config.data_dir)?;
    tracing::info!(storage = storage.location(), "artifact storage");
    if store.is_exclusive() {
        // A shared data dir's leftovers may be another node's uploads in progress.
        remove_orphans(&store, &storage).await?;
    }
    let hub = Hub::new(&config);
    let opts = WorkerOptions {
        role,
        device: config.device.clone(),
        max_attempts: config.max_attempts,
        lease,
        heartbeat,
        placement_grace: std::time::Duration::from_millis(config.placement_grace_ms),
    };
    let worker = Worker::start_with(store.clone(), storage.clone(), hub, opts).await?;
    if role != Role::Api {
        // Uploads of claims that lost their jobs, left by a worker that died before it could
        // delete them (this start may be its replacement). Safe at any time; left to the nodes
        // that train, so that an autoscaled API node does not list the storage at every start.
        let every = (config.sweep_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(config.sweep_interval_ms));
        crate::worker::sweep::spawn_sweeps(store.clone(), storage.clone(), every);
    }
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    match (config.api_key(), addr.ip().is_loopback()) {
        (Some(_), _) => tracing::info!("API key required on /v1"),
        (None, true) => {
            tracing::info!("no SFTD_API_KEY: the API is open, so it listens on loopback only")
        }
        (None, false) => tracing::warn!(
            %addr,
            "no SFTD_API_KEY while listening beyond loopback: anyone who can reach this address can run jobs"
        ),
    }
    // Tests and scripts read this line to find an ephemeral port.
    tracing::info!(%addr, "listening on http://{addr}");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let fanout = if role == Role::Trainer {
        events::Fanout::idle(&store)
    } else {
        events::Fanout::start(&store)
    };
    let state = AppState {
        config: Arc::new(config),
        fanout,
        store,
        storage,
        worker: worker.clone(),
        sse_clients: Default::default(),
        shutdown: shutdown_rx.clone(),
    };
    // The worker starts suspending as soon as the signal arrives, while HTTP drains.
    let mut signalled = shutdown_rx;
    let stopper = tokio::spawn(async move {
        let _ = signalled.wait_for(|s| *s).await;
        tokio::task::spawn_blocking(move || worker.shutdown()).await
    });
    let app = if role == Role::Trainer {
        worker_router(state)
    } else {
        router(state)
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: suspending the running job");
            let _ = shutdown_tx.send(true);
        })
        .await?;
    stopper.await??;
    tracing::info!("shutdown complete");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Deletes upload leftovers: temporary files, and stored uploads no row refers to (a crash
/// between storing a file and inserting its row). Shared storage is written by other nodes
/// too, so there only uploads older than [`ORPHAN_AGE`] count: one that young may belong to a
/// request another node is still finishing.
async fn remove_orphans(store: &Store, storage: &Storage) -> anyhow::Result<()> {
    let tmp = store.data_dir().join("tmp");
    for entry in std::fs::read_dir(&tmp)? {
        let _ = std::fs::remove_file(entry?.path());
    }
    let known: std::collections::HashSet<String> =
        store.all_file_paths().await?.into_iter().collect();
    let cutoff = if storage.is_in_place() {
        i64::MAX
    } else {
        chrono::Utc::now().timestamp() - ORPHAN_AGE.as_secs() as i64
    };
    let uploads = match storage.list("files").await {
        Ok(objects) => objects,
        // Start anyway: the API can still answer, and the next start tries again.
        Err(e) => {
            tracing::warn!(error = %e, "could not list the stored uploads to remove orphans");
            return Ok(());
        }
    };
    for o in uploads {
        if !known.contains(&o.key) && o.modified < cutoff {
            tracing::info!(key = %o.key, "removing an orphaned upload");
            let _ = storage.delete(&o.key).await;
        }
    }
    Ok(())
}

/// How old an unregistered upload in shared storage must be to count as an orphan.
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

pub use logging::init_tracing;
