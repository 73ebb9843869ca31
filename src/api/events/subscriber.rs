//! One subscriber's SSE stream, as the response body itself: the replay from the database, then
//! the relay's shared batches, falling back to the database on a gap, with keep-alives.

use super::relay::{render, Batch};
use crate::store::Store;
use axum::body::{Body, Bytes};
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

/// One subscriber's stream: database replay, then the shared batches, falling back to the
/// database whenever they show a gap (lag, or events committed out of order). It is the response
/// body itself: no task or channel of its own; it ends when it is dropped (the client left).
pub(super) struct Subscriber {
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
    /// A stream of `job_id`'s events after `after`. `live` must be subscribed before the replay
    /// starts; `clients` counts open streams.
    pub(super) fn new(
        store: Store,
        job_id: String,
        after: i64,
        live: broadcast::Receiver<Arc<Batch>>,
        shutdown: watch::Receiver<bool>,
        clients: Arc<AtomicI64>,
    ) -> Self {
        Self {
            store,
            job_id,
            after,
            live,
            shutdown,
            head: Some(Bytes::from(format!("retry: {}\n\n", RETRY.as_millis()))),
            catching_up: true,
            done: false,
            last_write: Instant::now(),
            keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE)),
            _client: ClientGuard::new(clients),
        }
    }

    /// The response body: one chunk per [`Subscriber::next_chunk`].
    pub(super) fn into_body(self) -> Body {
        let chunks = futures::stream::unfold(self, |mut sub| async move {
            let chunk = sub.next_chunk().await?;
            Some((Ok::<_, Infallible>(chunk), sub))
        });
        Body::from_stream(chunks)
    }

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
