//! `GET /v1/fine_tuning/jobs/{id}/events`: a JSON page, or (with `Accept: text/event-stream`
//! or `?stream=true`) an SSE stream that replays from `Last-Event-ID`/`?after=` out of the
//! database and then follows the shared broadcast, with no gap and no duplicate.

use super::error::{AppError, AppPath, AppQuery};
use super::jobs::no_such_job;
use super::types::{parse_event_cursor, EventObject, EventsQuery, List};
use super::AppState;
use crate::store::{EventRow, Published, Store};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Interval of the `: keep-alive` comments that stop proxies from timing the stream out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// What EventSource waits before reconnecting (sent as `retry:`).
const RETRY: Duration = Duration::from_secs(2);
/// Events read from the database per query while replaying or catching up.
const PAGE: i64 = 500;
/// Events buffered per subscriber between its pump task and its socket.
const CLIENT_BUFFER: usize = 64;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/fine_tuning/jobs/{job_id}/events", get(events))
}

async fn events(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
    AppQuery(q): AppQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let job = s
        .store
        .get_job(&id)
        .await?
        .ok_or_else(|| no_such_job(&id))?;
    let wants_stream = q.stream.unwrap_or(false)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"));
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|_| wants_stream);
    let after = match last_event_id.or(q.after.as_deref()) {
        None => 0,
        Some(a) => parse_event_cursor(a).ok_or_else(|| {
            AppError::bad_request(format!("after must be an event seq or id, got {a:?}"))
                .param("after")
        })?,
    };
    if !wants_stream {
        let limit = super::types::Pagination {
            after: None,
            limit: q.limit,
        }
        .limit(10_000)?;
        let rows = s.store.list_events(&id, after, limit + 1).await?;
        let items = rows.iter().map(EventObject::from).collect();
        return Ok(Json(List::page(items, limit, |e: &EventObject| e.id.clone())).into_response());
    }
    // A finished job with nothing left to send: 204 tells EventSource to stop reconnecting.
    if job.status()?.is_terminal() && s.store.list_events(&id, after, 1).await?.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let pump = Pump {
        store: s.store.clone(),
        job_id: id,
        after,
        tx,
        live: s.store.subscribe(),
        shutdown: s.shutdown.clone(),
        _client: ClientGuard::new(s.sse_clients.clone()),
    };
    tokio::spawn(pump.run());
    let mut resp = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response();
    let h = resp.headers_mut();
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// Feeds one subscriber: database replay, then the broadcast, falling back to the database
/// whenever the broadcast shows a gap (lag, or events committed out of order).
struct Pump {
    store: Store,
    job_id: String,
    /// The last `seq` sent.
    after: i64,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    /// Subscribed before the replay starts, so nothing committed after it can be missed.
    live: broadcast::Receiver<Arc<Published>>,
    shutdown: watch::Receiver<bool>,
    _client: ClientGuard,
}

/// Why sending stopped.
enum Stop {
    /// The terminal event went out.
    Done,
    /// The client went away, the server is shutting down, or the database failed.
    Gone,
}

impl Pump {
    async fn run(mut self) {
        if self
            .tx
            .send(Ok(Event::default().retry(RETRY)))
            .await
            .is_err()
        {
            return;
        }
        if self.catch_up().await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                r = self.live.recv() => r,
                _ = self.shutdown.changed() => return,
                _ = self.tx.closed() => return,
            };
            let step = match next {
                Ok(e) if e.row.job_id != self.job_id || e.row.seq <= self.after => continue,
                Ok(e) if e.row.seq == self.after + 1 => {
                    let body = e.rendered.get_or_init(|| render(&e.row));
                    self.send(&e.row, body).await
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if step.is_err() {
                return;
            }
        }
    }

    /// Sends everything in the database after `self.after`.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let page = match self.store.list_events(&self.job_id, self.after, PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream could not read the database");
                    return Err(Stop::Gone);
                }
            };
            for e in &page {
                self.send(e, &render(e)).await?;
            }
            if (page.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    async fn send(&mut self, e: &EventRow, body: &str) -> Result<(), Stop> {
        let event = Event::default().id(e.seq.to_string()).data(body);
        if self.tx.send(Ok(event)).await.is_err() {
            return Err(Stop::Gone);
        }
        self.after = e.seq;
        if e.is_terminal() {
            return Err(Stop::Done);
        }
        Ok(())
    }
}

/// The `data:` of an event's SSE message: its JSON object.
fn render(e: &EventRow) -> String {
    serde_json::to_string(&EventObject::from(e)).expect("events serialize. This is a bug.")
}

/// Counts open streams for `/metrics`.
struct ClientGuard(Arc<AtomicI64>);

impl ClientGuard {
    fn new(counter: Arc<AtomicI64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
