//! The store's behaviour, on SQLite and on a real PostgreSQL server (`on_both_backends!`):
//! guarded transitions, event numbering and broadcast, FIFO claims, leases and fencing.

use super::jobs::{Created, JobError};
use super::testing::{new_job as job, on_both_backends, temp_store};
use super::*;
use std::time::Duration;

fn statuses(events: &[EventRow]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e.status().map(|s| s.to_string()))
        .collect()
}

fn claimant() -> Claimant {
    Claimant::any("wrk-test")
}

/// The next event on the broadcast (published after commit, in this process).
async fn next(live: &mut broadcast::Receiver<Arc<Published>>) -> EventRow {
    tokio::time::timeout(Duration::from_secs(5), live.recv())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .row
        .clone()
}

on_both_backends!(transitions_are_guarded_and_events_numbered, transitions);
async fn transitions(s: Store) {
    let mut live = s.subscribe();
    assert!(matches!(
        s.create_job(&job("ftjob-a", None)).await.unwrap(),
        Created::New(_)
    ));
    // Not queued yet: nothing to claim, and running-only events are refused.
    assert!(s.claim_next_job(&claimant()).await.unwrap().is_none());
    let unclaimed = Lease {
        job_id: "ftjob-a".into(),
        epoch: 0,
    };
    assert!(s
        .append_running_event(&unclaimed, &NewEvent::info("x"))
        .await
        .unwrap()
        .is_none());
    assert!(s.mark_queued("ftjob-a").await.unwrap());
    assert!(!s.mark_queued("ftjob-a").await.unwrap());
    let claimed = s.claim_next_job(&claimant()).await.unwrap().unwrap();
    assert_eq!((claimed.id.as_str(), claimed.attempts), ("ftjob-a", 1));
    let lease = claimed.lease();
    assert!(s
        .append_running_event(&lease, &NewEvent::info("log"))
        .await
        .unwrap()
        .is_some());
    assert!(s.cancel_job("ftjob-a").await.unwrap().is_some());
    // After the terminal event nothing else lands: no events, no success, no failure, no requeue.
    assert!(s
        .append_running_event(&lease, &NewEvent::info("late"))
        .await
        .unwrap()
        .is_none());
    assert!(!s.succeed_job(&lease, 1, "ft", &[]).await.unwrap());
    let err = JobError::new("x", "y", None);
    assert!(!s
        .fail_job("ftjob-a", &[JobStatus::Running], &err)
        .await
        .unwrap());
    assert!(!s.fail_running(&lease, &err).await.unwrap());
    assert!(!s.requeue(&lease, "r").await.unwrap());
    assert!(!s
        .add_checkpoint(&lease, 1, &serde_json::json!({}), "p")
        .await
        .unwrap());
    assert!(s.cancel_job("ftjob-a").await.unwrap().is_none());

    let events = s.list_events("ftjob-a", 0, 100).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        statuses(&events),
        ["validating_files", "queued", "running", "cancelled"]
    );
    assert!(events.last().unwrap().is_terminal());
    // Every committed event was broadcast, in order.
    for e in &events {
        assert_eq!(next(&mut live).await, *e);
    }
    assert!(live.try_recv().is_err());
}

#[tokio::test]
async fn a_second_store_on_the_same_data_dir_is_refused_until_the_first_closes() {
    let (dir, s) = temp_store().await;
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let second = Store::open(&url, dir.path()).await;
    assert!(
        matches!(&second, Err(StoreError::Locked(p)) if p == dir.path()),
        "{:?}",
        second.err()
    );
    drop(s);
    Store::open(&url, dir.path()).await.unwrap();
}

on_both_backends!(
    interruptions_are_counted_from_the_requeue_events,
    interruptions
);
async fn interruptions(s: Store) {
    s.create_job(&job("ftjob-i", None)).await.unwrap();
    s.mark_queued("ftjob-i").await.unwrap();
    // A lease that expires at once: its holder is gone as soon as it is taken.
    let short = Claimant {
        lease: Duration::ZERO,
        ..claimant()
    };
    for n in 1..=2 {
        let lease = s.claim_next_job(&short).await.unwrap().unwrap().lease();
        assert!(s.requeue_interrupted(&lease, "crash").await.unwrap());
        assert_eq!(s.interruptions("ftjob-i").await.unwrap(), n);
    }
    // A requeue for a clean shutdown is not an interruption.
    let lease = s
        .claim_next_job(&claimant())
        .await
        .unwrap()
        .unwrap()
        .lease();
    assert!(s.requeue(&lease, "suspended").await.unwrap());
    assert_eq!(s.interruptions("ftjob-i").await.unwrap(), 2);
}

on_both_backends!(fifo_requeue_and_idempotency_key, fifo);
async fn fifo(s: Store) {
    for id in ["ftjob-1", "ftjob-2"] {
        s.create_job(&job(id, None)).await.unwrap();
    }
    s.mark_queued("ftjob-2").await.unwrap();
    s.mark_queued("ftjob-1").await.unwrap();
    let first = s.claim_next_job(&claimant()).await.unwrap().unwrap();
    assert_eq!(first.id, "ftjob-1");
    assert!(s.requeue(&first.lease(), "suspended").await.unwrap());
    // The requeued job is older, so it goes first again.
    let again = s.claim_next_job(&claimant()).await.unwrap().unwrap();
    assert_eq!((again.id.as_str(), again.attempts), ("ftjob-1", 2));
    let lease = again.lease();
    assert!(s
        .add_checkpoint(&lease, 4, &serde_json::json!({"step": 4}), "p")
        .await
        .unwrap());
    assert!(!s
        .add_checkpoint(&lease, 4, &serde_json::json!({"step": 4}), "p")
        .await
        .unwrap());
    assert_eq!(
        s.list_checkpoints("ftjob-1", None, 10).await.unwrap().len(),
        1
    );

    assert!(matches!(
        s.create_job(&job("ftjob-k", Some("key"))).await.unwrap(),
        Created::New(_)
    ));
    match s.create_job(&job("ftjob-k2", Some("key"))).await.unwrap() {
        Created::Existing(row) => assert_eq!(row.id, "ftjob-k"),
        Created::New(_) => panic!("a reused key must not create a job"),
    }
    assert!(s.get_job("ftjob-k2").await.unwrap().is_none());
}

on_both_backends!(a_lost_lease_can_write_nothing, fencing);
/// Fencing: once a lease expired, or a later claim moved the epoch on, the old holder's
/// events, checkpoints, renewals, success, failure and requeue are all refused.
async fn fencing(s: Store) {
    s.create_job(&job("ftjob-f", None)).await.unwrap();
    s.mark_queued("ftjob-f").await.unwrap();
    let short = Claimant {
        lease: Duration::from_millis(300),
        ..claimant()
    };
    // Fenced claims (what `worker::sweep` may clean up after): none before any claim, none while
    // the first holds the job, all claims of a job that is not running.
    let fenced = |s: Store| async move { s.fenced_epochs().await.unwrap()["ftjob-f"] };
    assert_eq!(fenced(s.clone()).await, 0);
    let first = s.claim_next_job(&short).await.unwrap().unwrap();
    let old = first.lease();
    assert_eq!(first.epoch, 1);
    assert_eq!(fenced(s.clone()).await, 0);
    assert!(s
        .renew_lease(&old, Duration::from_millis(300))
        .await
        .unwrap());
    assert!(s
        .append_running_event(&old, &NewEvent::info("while held"))
        .await
        .unwrap()
        .is_some());
    // Not expired yet: nobody may take it over.
    assert!(s.orphaned_jobs(false).await.unwrap().is_empty());
    assert!(!s.requeue_interrupted(&old, "too early").await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Expired: the holder may not write, nor renew.
    assert!(s
        .append_running_event(&old, &NewEvent::info("expired"))
        .await
        .unwrap()
        .is_none());
    assert!(!s.renew_lease(&old, Duration::from_secs(60)).await.unwrap());
    let orphans = s.orphaned_jobs(false).await.unwrap();
    assert_eq!(
        orphans.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["ftjob-f"]
    );
    assert!(s.requeue_interrupted(&old, "lease expired").await.unwrap());
    assert_eq!(fenced(s.clone()).await, 1);
    let second = s.claim_next_job(&claimant()).await.unwrap().unwrap();
    assert_eq!((second.epoch, second.attempts), (2, 2));
    assert_eq!(fenced(s.clone()).await, 1);
    let new = second.lease();

    let before = s.list_events("ftjob-f", 0, 100).await.unwrap();
    let err = JobError::new("x", "stale", None);
    assert!(s
        .append_running_event(&old, &NewEvent::info("stale"))
        .await
        .unwrap()
        .is_none());
    assert!(!s
        .add_checkpoint(&old, 9, &serde_json::json!({}), "p")
        .await
        .unwrap());
    assert!(!s.renew_lease(&old, Duration::from_secs(60)).await.unwrap());
    assert!(!s.succeed_job(&old, 1, "ft", &[]).await.unwrap());
    assert!(!s.fail_running(&old, &err).await.unwrap());
    assert!(!s.requeue(&old, "stale").await.unwrap());
    assert!(!s.requeue_interrupted(&old, "stale").await.unwrap());
    assert_eq!(s.list_events("ftjob-f", 0, 100).await.unwrap(), before);
    assert!(s
        .list_checkpoints("ftjob-f", None, 10)
        .await
        .unwrap()
        .is_empty());

    // The new holder writes as usual.
    assert!(s.renew_lease(&new, Duration::from_secs(60)).await.unwrap());
    assert!(s
        .add_checkpoint(&new, 2, &serde_json::json!({}), "p")
        .await
        .unwrap());
    // The stale holder cannot point the row at its own objects; the holder saving the step
    // again can (its row then names the new objects, and says so in an event).
    assert!(!s
        .add_checkpoint(&old, 2, &serde_json::json!({}), "stale")
        .await
        .unwrap());
    assert!(s
        .add_checkpoint(&new, 2, &serde_json::json!({}), "q")
        .await
        .unwrap());
    let rows = s.list_checkpoints("ftjob-f", None, 10).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.step, r.path.as_str()))
            .collect::<Vec<_>>(),
        [(2, "q")]
    );
    let saved = s.list_events("ftjob-f", 0, 100).await.unwrap();
    let saved = saved
        .iter()
        .filter(|e| e.message == "Checkpoint saved at step 2")
        .count();
    assert_eq!(saved, 2);
    assert!(s.succeed_job(&new, 10, "ft", &[]).await.unwrap());
    assert_eq!(
        s.get_job("ftjob-f").await.unwrap().unwrap().status,
        JobStatus::Succeeded
    );
    assert_eq!(fenced(s.clone()).await, 2);
    assert_eq!(s.all_checkpoint_paths().await.unwrap(), ["q"]);
}

on_both_backends!(claims_skip_jobs_too_big_for_the_worker, memory_fit);
async fn memory_fit(s: Store) {
    for (id, bytes) in [("ftjob-big", 8 << 30), ("ftjob-small", 1 << 30)] {
        s.create_job(&job(id, None)).await.unwrap();
        s.set_estimated_memory(id, bytes).await.unwrap();
        s.mark_queued(id).await.unwrap();
    }
    let small_worker = Claimant {
        memory_bytes: Some(4 << 30),
        ..claimant()
    };
    let got = s.claim_next_job(&small_worker).await.unwrap().unwrap();
    assert_eq!(got.id, "ftjob-small");
    assert!(s.claim_next_job(&small_worker).await.unwrap().is_none());
    let big = s.claim_next_job(&claimant()).await.unwrap().unwrap();
    assert_eq!(
        (big.id.as_str(), big.worker_id.as_deref()),
        ("ftjob-big", Some("wrk-test"))
    );
}

on_both_backends!(
    queued_jobs_without_an_estimate_get_one_before_the_claim,
    estimate_at_claim
);
async fn estimate_at_claim(s: Store) {
    for id in ["ftjob-unestimated", "ftjob-small"] {
        s.create_job(&job(id, None)).await.unwrap();
        s.mark_queued(id).await.unwrap();
    }
    s.set_estimated_memory("ftjob-small", 1 << 30)
        .await
        .unwrap();
    let ids = |jobs: Vec<JobRow>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let todo = s.queued_without_estimate(8).await.unwrap();
    assert_eq!(ids(todo), ["ftjob-unestimated"]);
    // The first estimate wins; a second worker's is not recorded.
    assert!(s
        .set_queued_estimate("ftjob-unestimated", 8 << 30)
        .await
        .unwrap());
    assert!(!s.set_queued_estimate("ftjob-unestimated", 1).await.unwrap());
    assert!(s.queued_without_estimate(8).await.unwrap().is_empty());
    let small_worker = Claimant {
        memory_bytes: Some(4 << 30),
        ..claimant()
    };
    let got = s.claim_next_job(&small_worker).await.unwrap().unwrap();
    assert_eq!(got.id, "ftjob-small");
    assert!(s.claim_next_job(&small_worker).await.unwrap().is_none());
    // Only a queued job is estimated.
    assert!(!s.set_queued_estimate("ftjob-small", 1).await.unwrap());
    // A job queued after the worker's estimate pass is not claimed unjudged; one the worker
    // tried and could not estimate is.
    s.create_job(&job("ftjob-later", None)).await.unwrap();
    s.mark_queued("ftjob-later").await.unwrap();
    let judging = |ok: &[&str]| Claimant {
        unestimated_ok: Some(ok.iter().map(|id| id.to_string()).collect()),
        ..small_worker.clone()
    };
    assert!(s.claim_next_job(&judging(&[])).await.unwrap().is_none());
    let got = s.claim_next_job(&judging(&["ftjob-later"])).await.unwrap();
    assert_eq!(got.unwrap().id, "ftjob-later");
}

on_both_backends!(
    a_holder_requeueing_for_a_transient_failure_counts_an_interruption,
    held_interruptions
);
async fn held_interruptions(s: Store) {
    s.create_job(&job("ftjob-h", None)).await.unwrap();
    s.mark_queued("ftjob-h").await.unwrap();
    let lease = s
        .claim_next_job(&claimant())
        .await
        .unwrap()
        .unwrap()
        .lease();
    assert!(s
        .requeue_held_interrupted(&lease, "storage down")
        .await
        .unwrap());
    assert_eq!(s.interruptions("ftjob-h").await.unwrap(), 1);
    let job_row = s.get_job("ftjob-h").await.unwrap().unwrap();
    assert_eq!(job_row.status, JobStatus::Queued);
    // A lease already lost cannot requeue.
    let expired = Claimant {
        lease: Duration::ZERO,
        ..claimant()
    };
    let lease = s.claim_next_job(&expired).await.unwrap().unwrap().lease();
    assert!(!s
        .requeue_held_interrupted(&lease, "storage down")
        .await
        .unwrap());
    assert_eq!(s.interruptions("ftjob-h").await.unwrap(), 1);
}

on_both_backends!(workers_register_and_heartbeat, registry);
async fn registry(s: Store) {
    s.register_worker(&workers::NewWorker {
        id: "wrk-1".into(),
        hostname: "gpu-host-1".into(),
        device: "cuda:0".into(),
        memory_total_bytes: Some(16 << 30),
        memory_free_bytes: Some(15 << 30),
    })
    .await
    .unwrap();
    assert!(s
        .worker_heartbeat("wrk-1", Some(7 << 30), Some("ftjob-x"))
        .await
        .unwrap());
    let rows = s.list_workers().await.unwrap();
    assert_eq!(rows.len(), 1);
    let w = &rows[0];
    assert_eq!(
        (
            w.device.as_str(),
            w.memory_free_bytes,
            w.current_job.as_deref()
        ),
        ("cuda:0", Some(7 << 30), Some("ftjob-x"))
    );
    assert!(
        (0..60_000).contains(&w.heartbeat_age_ms),
        "{}",
        w.heartbeat_age_ms
    );
    s.remove_worker("wrk-1").await.unwrap();
    assert!(!s.worker_heartbeat("wrk-1", None, None).await.unwrap());
    assert!(s.list_workers().await.unwrap().is_empty());
}

/// Many claimants at once on one PostgreSQL database, each with its own pool: every job is
/// claimed exactly once. Prints the claim latency it saw (a measurement, not asserted).
#[tokio::test]
async fn concurrent_claims_never_take_a_job_twice_on_postgres() {
    let Some(server) = testing::postgres::PgServer::start() else {
        return;
    };
    let url = server.database().await;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&url, dir.path()).await.unwrap();
    let n = 60;
    for i in 0..n {
        let id = format!("ftjob-{i:03}");
        s.create_job(&job(&id, None)).await.unwrap();
        s.mark_queued(&id).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = Store::open(&url, dir.path()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let me = Claimant::any(&format!("wrk-{w}"));
            let (mut mine, mut took) = (Vec::new(), Vec::new());
            loop {
                let start = std::time::Instant::now();
                let Some(j) = store.claim_next_job(&me).await.unwrap() else {
                    break;
                };
                took.push(start.elapsed());
                mine.push(j.id);
            }
            (mine, took)
        }));
    }
    let (mut all, mut took) = (Vec::new(), Vec::new());
    for t in tasks {
        let (mine, times) = t.await.unwrap();
        all.extend(mine);
        took.extend(times);
    }
    took.sort();
    eprintln!(
        "claim latency, 4 concurrent claimants, {n} jobs: median {:?}, p90 {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() * 9 / 10],
        took[took.len() - 1]
    );
    all.sort();
    let expected: Vec<String> = (0..n).map(|i| format!("ftjob-{i:03}")).collect();
    assert_eq!(all, expected);
}

/// An API process hears about events another process committed (LISTEN/NOTIFY, with the poll
/// behind it) and publishes them on its own broadcast, in order.
#[tokio::test]
async fn events_committed_elsewhere_reach_this_process_on_postgres() {
    let Some(server) = testing::postgres::PgServer::start() else {
        return;
    };
    let url = server.database().await;
    let dir = tempfile::tempdir().unwrap();
    let worker = Store::open(&url, dir.path()).await.unwrap();
    let api = Store::open(&url, dir.path()).await.unwrap();
    let mut live = api.subscribe();
    api.follow_other_writers();
    // Let the listener connect before the commits it must hear.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.create_job(&job("ftjob-n", None)).await.unwrap();
    worker.mark_queued("ftjob-n").await.unwrap();
    let lease = worker
        .claim_next_job(&claimant())
        .await
        .unwrap()
        .unwrap()
        .lease();
    for i in 0..20 {
        let ev = NewEvent::info(format!("step {i}"));
        worker
            .append_running_event(&lease, &ev)
            .await
            .unwrap()
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.last() != Some(&23) {
        let row = next(&mut live).await;
        assert_eq!(row.job_id, "ftjob-n");
        if seen.last().is_none_or(|last| row.seq > *last) {
            seen.push(row.seq);
        }
    }
    // The feed's first sight of the job may begin after its first events (streams replay
    // those from the database); from there on nothing is skipped.
    let first = seen[0];
    assert_eq!(seen, (first..=23).collect::<Vec<_>>());
}

/// A session of this process that stops inside a transaction holding a job's row lock (a worker
/// frozen in the middle of an event write) is ended by the server within seconds, so another
/// process's write to that job goes through instead of waiting for it to wake.
#[tokio::test]
async fn a_transaction_left_open_on_postgres_blocks_other_writers_only_briefly() {
    let Some((_server, dir, frozen)) = testing::pg_store().await else {
        return;
    };
    let other = Store::open(&frozen.database_url, dir.path()).await.unwrap();
    frozen.create_job(&job("ftjob-f", None)).await.unwrap();
    frozen.mark_queued("ftjob-f").await.unwrap();
    let lease = frozen
        .claim_next_job(&claimant())
        .await
        .unwrap()
        .unwrap()
        .lease();
    // An event write's first statement, then nothing: the transaction stays open.
    let mut tx = frozen.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind("ftjob-f")
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let written = tokio::time::timeout(
        Duration::from_secs(60),
        other.append_running_event(&lease, &NewEvent::info("after the freeze")),
    )
    .await
    .expect("the write waited a minute for the open transaction");
    assert!(written.unwrap().is_some());
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
    // The frozen session is gone: its transaction cannot commit.
    assert!(tx.commit().await.is_err());
}
