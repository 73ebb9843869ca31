//! The event stream on an in-process server whose worker never runs (its device cannot be
//! opened), so the test drives the job's events by hand: a lagging subscriber catches up from
//! the database; an idle stream gets keep-alive comments.

mod common;

use common::jobs::queued_store_job;
use serde_json::Value;
use sftd::api::{router, AppState};
use sftd::config::Config;
use sftd::hub::Hub;
use sftd::store::{Claimant, Lease, NewEvent, Store};
use sftd::worker::Worker;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves the API on 127.0.0.1 with a broadcast of `capacity`; returns the base URL, the store
/// and the shutdown switch (streams end when it flips or is dropped).
async fn server(dir: &std::path::Path, capacity: usize) -> (String, Store, Shutdown) {
    let mut config = Config::for_data_dir(dir);
    // An unusable device keeps the worker thread from claiming the job this test drives by hand.
    config.device = "no-such-device".into();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let store = Store::open_with_capacity(&url, dir, capacity)
        .await
        .unwrap();
    let storage = sftd::storage::Storage::open(None, dir).unwrap();
    let worker = Worker::start(
        store.clone(),
        storage.clone(),
        Hub::new(&config),
        config.device.clone(),
        config.max_attempts,
    )
    .await
    .unwrap();
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let state = AppState {
        config: Arc::new(config),
        store: store.clone(),
        storage,
        worker,
        sse_clients: Default::default(),
        fanout: sftd::api::events::Fanout::start(&store),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    (base, store, shutdown_tx)
}

type Shutdown = tokio::sync::watch::Sender<bool>;

/// Creates a job and moves it to `running` (3 events); returns the claim's lease.
async fn running_job(store: &Store, id: &str) -> Lease {
    queued_store_job(store, id).await;
    let claimed = store
        .claim_next_job(&Claimant::any("wrk-test"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, id);
    claimed.lease()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_catches_up_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (base, store, _shutdown) = server(dir.path(), 4).await;
    let id = "ftjob-lag";
    let lease = running_job(&store, id).await;

    let client = reqwest::Client::new();
    // The worker could not open its device: not ready.
    let r = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r: Value = r.json().await.unwrap();
    assert_eq!(
        (r["database"].as_bool(), r["worker"].as_bool()),
        (Some(true), Some(false))
    );
    let open = || {
        client
            .get(format!(
                "{base}/v1/fine_tuning/jobs/{id}/events?stream=true"
            ))
            .send()
    };
    let slow = open().await.unwrap();
    let fast = tokio::spawn(common::read_sse(open().await.unwrap(), |_| false));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 20 MB in 600 events of 34 kB while `slow` reads nothing: far more than the broadcast (4
    // batches), the socket buffers and one 500-event page of the catch-up hold. The writer must
    // not wait on `slow`: `slow` is read only after this loop, so a writer held up by it would
    // never finish. (Few large events rather than many small ones: each append is a commit with
    // an fsync, and it is the commits, not the bytes, that cost.)
    let n = 600;
    for i in 0..n {
        let ev = NewEvent::info(format!("event {i} {}", "x".repeat(34_000)));
        assert!(store
            .append_running_event(&lease, &ev)
            .await
            .unwrap()
            .is_some());
    }
    store.cancel_job(id).await.unwrap();

    let fast = tokio::time::timeout(Duration::from_secs(60), fast)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow = tokio::time::timeout(Duration::from_secs(60), common::read_sse(slow, |_| false))
        .await
        .unwrap();
    // created, queued, running, 600 events, cancelled.
    let total = n + 4;
    for (name, got) in [("fast", &fast), ("slow", &slow)] {
        let ids: Vec<i64> = got
            .iter()
            .map(|e| e.id.as_ref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids, (1..=total as i64).collect::<Vec<_>>(), "{name}");
        let last: Value = serde_json::from_str(&got.last().unwrap().data).unwrap();
        assert_eq!(last["data"]["status"], "cancelled", "{name}");
    }
}

/// Nothing happens for 15 s: the stream carries a `: keep-alive` comment (and stays open).
#[tokio::test]
async fn an_idle_stream_gets_keep_alive_comments() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let (base, store, _shutdown) = server(dir.path(), 16).await;
    running_job(&store, "ftjob-idle").await;
    let r = reqwest::Client::new()
        .get(format!(
            "{base}/v1/fine_tuning/jobs/ftjob-idle/events?stream=true&after=3"
        ))
        .send()
        .await
        .unwrap();
    let start = Instant::now();
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains(": keep-alive") {
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
            .await
            .expect("no keep-alive within 20 s")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(
        start.elapsed() >= Duration::from_secs(14),
        "{:?}",
        start.elapsed()
    );
    assert!(!text.contains("data:"), "{text}");
}
