//! A subscriber that stops reading while events pour in falls behind the shared broadcast
//! (capacity 4 here); when it reads again it catches up from the database: every event exactly
//! once, in order, and the other subscriber and the writer were never held up.

mod common;

use serde_json::Value;
use sftd::api::{router, AppState};
use sftd::config::Config;
use sftd::hub::Hub;
use sftd::store::jobs::NewJob;
use sftd::store::{NewEvent, Store};
use sftd::worker::Worker;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_catches_up_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_data_dir(dir.path());
    // An unusable device keeps the worker thread from claiming the job this test drives by hand.
    config.device = "no-such-device".into();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::open_with_capacity(&url, dir.path(), 4)
        .await
        .unwrap();
    let worker = Worker::start(store.clone(), Hub::new(&config), config.device.clone())
        .await
        .unwrap();
    let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let state = AppState {
        config: Arc::new(config),
        store: store.clone(),
        worker,
        sse_clients: Default::default(),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });

    let id = "ftjob-lag";
    store
        .create_job(&NewJob {
            id: id.into(),
            model: "sftd-demo".into(),
            training_file: "file-x".into(),
            validation_file: None,
            spec: "{}".into(),
            config: "{}".into(),
            seed: 0,
            suffix: None,
            metadata: None,
            idempotency_key: None,
        })
        .await
        .unwrap();
    store.mark_queued(id).await.unwrap();
    assert_eq!(store.claim_next_job().await.unwrap().unwrap().id, id);

    let client = reqwest::Client::new();
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

    // 4,000 events of 5 kB (far more than the broadcast and the per-client buffer hold) while `slow`
    // reads nothing. The writer must not wait on it.
    let n = 4000;
    let start = Instant::now();
    for i in 0..n {
        let ev = NewEvent::info(format!("event {i} {}", "x".repeat(5000)));
        assert!(store.append_running_event(id, &ev).await.unwrap().is_some());
    }
    let writing = start.elapsed();
    store.cancel_job(id).await.unwrap();

    let fast = tokio::time::timeout(Duration::from_secs(60), fast)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow = tokio::time::timeout(Duration::from_secs(60), common::read_sse(slow, |_| false))
        .await
        .unwrap();
    // created, queued, running, 4,000 events, cancelled.
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
    assert!(
        writing < Duration::from_secs(30),
        "writer was held up: {writing:?}"
    );
}
