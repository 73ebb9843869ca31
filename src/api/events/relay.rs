//! The fan-out relay: one task renders every committed event to its SSE message once and
//! broadcasts the messages, in batches, as shared bytes to every open stream.

use crate::api::types::EventObject;
use crate::store::{EventRow, Published, Store};
use axum::body::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

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

/// The shared side of the fan-out: a relay task renders every committed event to its SSE message
/// once and re-broadcasts the messages in batches, at most one batch per [`flush_interval`], which
/// every stream shares (`Bytes` are reference-counted, so a thousand streams hold one copy). Cheap to
/// clone.
#[derive(Clone)]
pub struct Fanout {
    tx: broadcast::Sender<Arc<Batch>>,
}

impl Fanout {
    /// Starts the relay on the store's event broadcast, which (with a shared database) the
    /// store's feed fills with the events other processes commit too: it is woken by their
    /// `NOTIFY`, with a poll behind it. Must be called inside the tokio runtime.
    pub fn start(store: &Store) -> Self {
        // A stream further behind than this many batches catches up from the database.
        let (tx, _) = broadcast::channel(store.broadcast_capacity());
        tokio::spawn(relay(store.subscribe(), tx.clone()));
        store.follow_other_writers();
        Self { tx }
    }

    /// A fan-out with no relay, for a process that serves no event streams (`sftd worker`).
    pub fn idle(store: &Store) -> Self {
        let (tx, _) = broadcast::channel(store.broadcast_capacity().max(1));
        Self { tx }
    }

    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.tx.subscribe()
    }
}

/// One SSE message (`id: <seq>\ndata: <json>\n\n`), rendered once for every stream.
pub(super) struct Wire {
    pub(super) job_id: String,
    pub(super) seq: i64,
    pub(super) terminal: bool,
    pub(super) bytes: Bytes,
}

/// What the relay broadcasts: committed events in commit order, and whether it missed some
/// (then every stream checks the database after these).
pub(super) struct Batch {
    pub(super) events: Vec<Wire>,
    pub(super) resync: bool,
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

/// An event's SSE message: its seq as the `id`, its JSON object as the `data` (compact JSON
/// has no line breaks, so one `data:` line).
pub(super) fn render(e: &EventRow) -> Bytes {
    let json =
        serde_json::to_string(&EventObject::from(e)).expect("events serialize. This is a bug.");
    Bytes::from(format!("id: {}\ndata: {json}\n\n", e.seq))
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
        let lease = store
            .claim_next_job(&crate::store::Claimant::any("wrk-test"))
            .await
            .unwrap()
            .unwrap()
            .lease();
        let fanout = Fanout::start(&store);
        let mut streams: Vec<_> = (0..1000).map(|_| fanout.subscribe()).collect();

        let start = Instant::now();
        let n = 40;
        for i in 0..n {
            let ev = NewEvent::info(format!("event {i}"));
            store
                .append_running_event(&lease, &ev)
                .await
                .unwrap()
                .unwrap();
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
