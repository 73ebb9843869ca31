//! The HTTP side of `GET /v1/fine_tuning/jobs/{id}/events`: a JSON page, or (with
//! `Accept: text/event-stream` or `?stream=true`) an SSE response from `Last-Event-ID`/`?after=`
//! whose body is a [`Subscriber`] (`events/subscriber.rs`) following the shared [`Fanout`]
//! (`events/relay.rs`).

mod relay;
mod subscriber;

pub use relay::Fanout;

use super::error::{AppError, AppPath, AppQuery};
use super::jobs::no_such_job;
use super::types::{parse_event_cursor, EventObject, EventsQuery, List};
use super::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use subscriber::Subscriber;

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
        let limit = super::types::page_limit(q.limit, 10_000)?;
        let rows = s.store.list_events(&id, after, limit + 1).await?;
        let items = rows.iter().map(EventObject::from).collect();
        return Ok(Json(List::page(items, limit, |e: &EventObject| e.id.clone())).into_response());
    }
    // A finished job with nothing left to send: 204 tells EventSource to stop reconnecting.
    if job.status.is_terminal() && s.store.list_events(&id, after, 1).await?.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let body = Subscriber::new(
        s.store.clone(),
        id,
        after,
        s.fanout.subscribe(),
        s.shutdown.clone(),
        s.sse_clients.clone(),
    )
    .into_body();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response())
}
