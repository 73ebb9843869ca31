//! `GET /v1/fine_tuning/jobs/{id}/events`: a JSON page, or (with `Accept: text/event-stream`
//! or `?stream=true`) an SSE stream that replays from `Last-Event-ID`/`?after=` out of the
//! database and then follows the shared fan-out ([`Fanout`]), with no gap and no duplicate.

use super::error::{AppError, AppPath, AppQuery};
use super::jobs::no_such_job;
use super::types::{parse_event_cursor, EventObject, EventsQuery, List};
use super::AppState;
use crate::store::{EventRow, Published, Store};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Sleep};

/// Interval of the `: keep-alive` comments that stop proxies from timing the stream out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// What EventSource waits before reconnecting (sent as `retry:`).
const RETRY: Duration = Duration::from_secs(2);
/// Events read from the database per query while replaying or catching up.
const PAGE: i64 = 500;
/// The fan-out's budget of socket writes per second, all streams together: batches go out at
/// most every `subscribers / WRITES_PER_SECOND`, so its cost stays near 4 % of one core (on the
/// 2-core CI machine, where a write to a loopback socket costs ~10 µs) however many clients
/// follow and however fast events come. With a handful of clients that is no delay at all.
const WRITES_PER_SECOND: u32 = 4000;
/// The longest a committed event waits for its batch, whatever the number of subscribers.
const MAX_FLUSH: Duration = Duration::from_millis(250);

/// The shortest interval between two batches with `subscribers` streams open. An event after a
/// quiet spell that long goes out at once; events that come faster share the next batch.
fn flush_interval(subscribers: usize) -> Duration {
    let subscribers = u32::try_from(subscribers).unwrap_or(u32::MAX);
    (Duration::from_secs(1) / WRITES_PER_SECOND)
        .saturating_mul(subscribers)
        .min(MAX_FLUSH)
}

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
    let sub = Subscriber {
        store: s.store.clone(),
        job_id: id,
        after,
        live: s.fanout.subscribe(),
        shutdown: s.shutdown.clone(),
        head: Some(Bytes::from(format!("retry: {}\n\n", RETRY.as_millis()))),
        catching_up: true,
        done: false,
        last_write: Instant::now(),
        keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE)),
        _client: ClientGuard::new(s.sse_clients.clone()),
    };
    let chunks = futures::stream::unfold(sub, |mut sub| async move {
        let chunk = sub.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), sub))
    });
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
        Body::from_stream(chunks),
    )
        .into_response())
}

/// The shared side of the fan-out: a relay task renders every committed event to its SSE message
/// once and re-broadcasts the messages in batches, at most one batch per [`flush_interval`], which
/// every stream shares (`Bytes` are reference-counted, so a thousand streams hold one copy). Cheap to
/// clone.
#[derive(Clone)]
pub struct Fanout {
    tx: broadcast::Sender<Arc<Batch>>,
}

impl Fanout {
    /// Starts the relay on the store's event broadcast. Must be called inside the tokio runtime.
    pub fn start(store: &Store) -> Self {
        // A stream further behind than this many batches catches up from the database.
        let (tx, _) = broadcast::channel(store.broadcast_capacity());
        tokio::spawn(relay(store.subscribe(), tx.clone()));
        Self { tx }
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.tx.subscribe()
    }
}

/// One SSE message (`id: <seq>\ndata: <json>\n\n`), rendered once for every stream.
struct Wire {
    job_id: String,
    seq: i64,
    terminal: bool,
    bytes: Bytes,
}

/// What the relay broadcasts: committed events in commit order, and whether it missed some
/// (then every stream checks the database after these).
struct Batch {
    events: Vec<Wire>,
    resync: bool,
}

/// Moves committed events from the store's broadcast to the streams' one. The training thread
/// that commits an event thus wakes one task, not one per subscriber; and however fast events
/// come, a subscriber is woken (and its socket written) at most once per [`flush_interval`].
async fn relay(mut events: broadcast::Receiver<Arc<Published>>, tx: broadcast::Sender<Arc<Batch>>) {
    let mut last_flush: Option<Instant> = None;
    loop {
        let mut rows = Vec::new();
        let mut resync = false;
        match events.recv().await {
            Ok(e) => rows.push(e),
            Err(broadcast::error::RecvError::Lagged(_)) => resync = true,
            Err(broadcast::error::RecvError::Closed) => return,
        }
        // The first event after a quiet spell goes out at once; later ones wait for the next
        // slot and share it.
        if let Some(last) = last_flush {
            let next = last + flush_interval(tx.receiver_count());
            if next > Instant::now() {
                tokio::time::sleep_until(next).await;
            }
        }
        loop {
            match events.try_recv() {
                Ok(e) => rows.push(e),
                Err(broadcast::error::TryRecvError::Lagged(_)) => resync = true,
                Err(_) => break,
            }
        }
        last_flush = Some(Instant::now());
        // Nobody listening: nothing to render. A stream that subscribes later reads these
        // events from the database (they were committed before it subscribed).
        if tx.receiver_count() == 0 {
            continue;
        }
        let events = rows
            .iter()
            .map(|e| Wire {
                job_id: e.row.job_id.clone(),
                seq: e.row.seq,
                terminal: e.row.is_terminal(),
                bytes: render(&e.row),
            })
            .collect();
        let _ = tx.send(Arc::new(Batch { events, resync }));
    }
}

/// One subscriber's stream: database replay, then the shared batches, falling back to the
/// database whenever they show a gap (lag, or events committed out of order). It is the response
/// body itself: no task or channel of its own; it ends when it is dropped (the client left).
struct Subscriber {
    store: Store,
    job_id: String,
    /// The last `seq` sent.
    after: i64,
    /// Subscribed before the replay starts, so nothing committed after it can be missed.
    live: broadcast::Receiver<Arc<Batch>>,
    shutdown: watch::Receiver<bool>,
    /// Goes out in front of the first chunk (`retry:`).
    head: Option<Bytes>,
    /// The next chunk comes from the database.
    catching_up: bool,
    /// The terminal event went out (or the stream failed): end the body.
    done: bool,
    last_write: Instant,
    keep_alive: Pin<Box<Sleep>>,
    _client: ClientGuard,
}

impl Subscriber {
    /// The next piece of the body: every event this client can have now, as one write.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            if self.catching_up {
                match self.page().await {
                    Some(chunk) => return Some(self.sent(chunk)),
                    // Nothing stored to replay: the `retry:` still goes out now.
                    None if self.head.is_some() && !self.done => {
                        return Some(self.sent(Bytes::new()))
                    }
                    None => continue,
                }
            }
            let next = tokio::select! {
                biased;
                _ = self.shutdown.changed() => return None,
                r = self.live.recv() => r,
                _ = &mut self.keep_alive => {
                    let due = self.last_write + KEEP_ALIVE;
                    if Instant::now() >= due {
                        return Some(self.sent(Bytes::from_static(b": keep-alive\n\n")));
                    }
                    self.keep_alive.as_mut().reset(due);
                    continue;
                }
            };
            match next {
                Ok(batch) => {
                    if let Some(chunk) = self.take(&batch) {
                        return Some(self.sent(chunk));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next page from the database (`None`: nothing to send). Clears `catching_up` at the
    /// end of what is stored.
    async fn page(&mut self) -> Option<Bytes> {
        let rows = match self.store.list_events(&self.job_id, self.after, PAGE).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "event stream could not read the database");
                self.done = true;
                return None;
            }
        };
        if (rows.len() as i64) < PAGE {
            self.catching_up = false;
        }
        let mut out = Chunk::default();
        for e in &rows {
            out.push(&render(e));
            self.after = e.seq;
            if e.is_terminal() {
                self.done = true;
                break;
            }
        }
        out.finish()
    }

    /// This client's part of a batch: the events right after `after`, up to a gap.
    fn take(&mut self, batch: &Batch) -> Option<Bytes> {
        let mut out = Chunk::default();
        for w in &batch.events {
            if w.job_id != self.job_id || w.seq <= self.after {
                continue;
            }
            if w.seq != self.after + 1 {
                self.catching_up = true;
                break;
            }
            out.push(&w.bytes);
            self.after = w.seq;
            if w.terminal {
                self.done = true;
                break;
            }
        }
        if batch.resync {
            self.catching_up = true;
        }
        out.finish()
    }

    /// `chunk` with the head in front, noting the write for the keep-alive timer.
    fn sent(&mut self, chunk: Bytes) -> Bytes {
        self.last_write = Instant::now();
        match self.head.take() {
            None => chunk,
            Some(head) => {
                let mut out = Chunk::default();
                out.push(&head);
                out.push(&chunk);
                out.finish().unwrap_or_default()
            }
        }
    }
}

/// Messages gathered into one write: the shared bytes themselves when there is one.
#[derive(Default)]
struct Chunk {
    one: Option<Bytes>,
    many: Option<Vec<u8>>,
}

impl Chunk {
    fn push(&mut self, b: &Bytes) {
        if let Some(many) = &mut self.many {
            many.extend_from_slice(b);
        } else if let Some(one) = self.one.take() {
            let mut many = Vec::with_capacity(one.len() + b.len());
            many.extend_from_slice(&one);
            many.extend_from_slice(b);
            self.many = Some(many);
        } else {
            self.one = Some(b.clone());
        }
    }

    fn finish(self) -> Option<Bytes> {
        match self.many {
            Some(many) => Some(Bytes::from(many)),
            None => self.one,
        }
    }
}

/// An event's SSE message: its seq as the `id`, its JSON object as the `data` (compact JSON
/// has no line breaks, so one `data:` line).
fn render(e: &EventRow) -> Bytes {
    let json =
        serde_json::to_string(&EventObject::from(e)).expect("events serialize. This is a bug.");
    Bytes::from(format!("id: {}\ndata: {json}\n\n", e.seq))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{new_job, temp_store};
    use crate::store::NewEvent;

    #[test]
    fn the_flush_interval_spends_a_fixed_write_budget_up_to_a_cap() {
        assert_eq!(flush_interval(0), Duration::ZERO);
        assert_eq!(flush_interval(1), Duration::from_micros(250));
        assert_eq!(flush_interval(100), Duration::from_millis(25));
        assert_eq!(flush_interval(1000), MAX_FLUSH);
        assert_eq!(flush_interval(usize::MAX), MAX_FLUSH);
    }

    /// With 1,000 streams open, a burst of events reaches them in one batch per 250 ms (not one
    /// wake-up and write per event), in order, and every stream gets the same rendered bytes.
    #[tokio::test]
    async fn a_burst_reaches_every_stream_in_few_shared_batches() {
        let (_dir, store) = temp_store().await;
        let id = "ftjob-burst";
        store.create_job(&new_job(id, None)).await.unwrap();
        store.mark_queued(id).await.unwrap();
        store.claim_next_job().await.unwrap().unwrap();
        let fanout = Fanout::start(&store);
        let mut streams: Vec<_> = (0..1000).map(|_| fanout.subscribe()).collect();

        let start = Instant::now();
        let n = 40;
        for i in 0..n {
            let ev = NewEvent::info(format!("event {i}"));
            store.append_running_event(id, &ev).await.unwrap().unwrap();
        }
        let appended = start.elapsed();
        // created, queued and running came before the streams subscribed.
        let last = 3 + n;
        let (mut seqs, mut batches) = (Vec::new(), Vec::new());
        while seqs.last() != Some(&last) {
            let batch = streams[0].recv().await.unwrap();
            assert!(!batch.resync);
            seqs.extend(batch.events.iter().map(|w| w.seq));
            batches.push(batch);
        }
        assert_eq!(seqs, (4..=last).collect::<Vec<_>>());
        let slots = (appended.as_secs_f64() / MAX_FLUSH.as_secs_f64()).ceil() as usize + 1;
        assert!(
            batches.len() <= slots,
            "{} batches for {n} events appended in {appended:?}",
            batches.len()
        );
        for s in &mut streams[1..] {
            for b in &batches {
                let theirs = s.recv().await.unwrap();
                assert!(Arc::ptr_eq(&theirs, b));
            }
        }
        assert_eq!(
            &batches[0].events[0].bytes[..],
            format!(
                "id: 4\ndata: {}\n\n",
                serde_json::to_string(&EventObject::from(
                    &store.list_events(id, 3, 1).await.unwrap()[0]
                ))
                .unwrap()
            )
            .as_bytes()
        );
    }
}
