//! Events and queue changes committed by other processes (PostgreSQL only). Every event insert
//! sends `NOTIFY sftd_events '<job> <seq>'` and every transition to `queued` sends
//! `NOTIFY sftd_queue`, both delivered at commit. An API node's feed LISTENs, reads the events
//! it has not published yet from the database and puts them on the store's broadcast, so its
//! SSE relay serves events whichever process committed them; a poll of recent events covers
//! notifications lost while the listening connection was down. Streams skip events they already
//! sent and fill any gap from the database, so publishing an event twice, or late, is harmless.

use super::events::EventRow;
use super::sql::{EVENTS_CHANNEL, QUEUE_CHANNEL};
use super::{Published, Result, Store};
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fall-back poll of the event feed, and the wait before reconnecting a listener.
const FEED_POLL: Duration = Duration::from_secs(1);
/// How far back (seconds) the poll looks for events of jobs the feed has not heard of.
const POLL_WINDOW_S: i64 = 30;

/// The last `seq` this process published per job, and when the job's terminal event went out
/// (entries are dropped a while after that, once the poll can no longer see the job).
#[derive(Clone, Default)]
pub(super) struct Seen(Arc<Mutex<HashMap<String, LastPublished>>>);

/// A job's last published `seq`, and when its terminal event was published.
type LastPublished = (i64, Option<Instant>);

impl Seen {
    pub(super) fn saw(&self, e: &EventRow) {
        let mut last = self.0.lock().expect("feed lock");
        let entry = last.entry(e.job_id.clone()).or_insert((0, None));
        entry.0 = entry.0.max(e.seq);
        if e.is_terminal() {
            entry.1 = Some(Instant::now());
        }
    }

    fn last(&self, job_id: &str) -> Option<i64> {
        self.0.lock().expect("feed lock").get(job_id).map(|e| e.0)
    }

    fn forget_finished(&self) {
        let window = Duration::from_secs(2 * POLL_WINDOW_S as u64);
        self.0
            .lock()
            .expect("feed lock")
            .retain(|_, (_, done)| done.is_none_or(|t| t.elapsed() < window));
    }
}

impl Store {
    /// With a shared database (PostgreSQL), starts the task that publishes here the events
    /// other processes commit. Call once per process, inside the tokio runtime. SQLite has one
    /// process, whose own commits are all there is: nothing to start.
    pub fn follow_other_writers(&self) {
        if self.backend != super::sql::Backend::Postgres {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = store.follow_events().await {
                    tracing::warn!(error = %e, "event feed: reconnecting");
                }
                tokio::time::sleep(FEED_POLL).await;
            }
        });
    }

    /// Calls `wake` whenever another process may have queued a job (PostgreSQL), so an idle
    /// worker claims it at once rather than at its next poll.
    pub fn on_queue_change(&self, wake: impl Fn() + Send + 'static) {
        if self.backend != super::sql::Backend::Postgres {
            return;
        }
        let url = self.database_url.clone();
        tokio::spawn(async move {
            loop {
                match PgListener::connect(&url).await {
                    Ok(mut listener) => {
                        if listener.listen(QUEUE_CHANNEL).await.is_ok() {
                            wake();
                            while let Ok(Some(_)) = listener.try_recv().await {
                                wake();
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "queue listener: reconnecting"),
                }
                tokio::time::sleep(FEED_POLL).await;
            }
        });
    }

    async fn follow_events(&self) -> Result<()> {
        let mut listener = PgListener::connect(&self.database_url).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        // Whatever was committed while no one listened.
        self.poll_recent().await?;
        loop {
            let note = tokio::select! {
                n = listener.try_recv() => n?,
                _ = tokio::time::sleep(FEED_POLL) => {
                    self.poll_recent().await?;
                    continue;
                }
            };
            match note {
                Some(n) => {
                    let mut parts = n.payload().split(' ');
                    let (Some(job), Some(Ok(seq))) =
                        (parts.next(), parts.next().map(str::parse::<i64>))
                    else {
                        continue;
                    };
                    self.catch_up(job, seq).await?;
                }
                // The connection dropped (the listener reconnects on the next call): notifications
                // may have been lost meanwhile.
                None => self.poll_recent().await?,
            }
        }
    }

    /// Publishes `job`'s events up to at least `seq` that this process has not published.
    async fn catch_up(&self, job: &str, seq: i64) -> Result<()> {
        let after = match self.feed.last(job) {
            Some(last) if last >= seq => return Ok(()),
            Some(last) => last,
            // A job this process has not followed: its streams replay the past from the database.
            None => seq - 1,
        };
        let rows = self.list_events(job, after, 1000).await?;
        for row in rows {
            self.feed.saw(&row);
            let _ = self.events_tx.send(Arc::new(Published { row }));
        }
        Ok(())
    }

    /// The fall-back: every job with events in the last [`POLL_WINDOW_S`] seconds newer than
    /// what this process published.
    async fn poll_recent(&self) -> Result<()> {
        let latest: Vec<(String, i64)> = sqlx::query_as(
            "SELECT job_id, MAX(seq) FROM events WHERE created_at >= $1 GROUP BY job_id",
        )
        .bind(super::now() - POLL_WINDOW_S)
        .fetch_all(&self.pool)
        .await?;
        for (job, seq) in latest {
            self.catch_up(&job, seq).await?;
        }
        self.feed.forget_finished();
        Ok(())
    }
}
