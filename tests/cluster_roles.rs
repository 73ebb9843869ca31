//! The cluster's roles and failure paths beyond `tests/cluster.rs`, each on its own real
//! PostgreSQL server (and, where artifacts travel between hosts, the real S3-compatible server
//! `s3s-fs`), every process of the real binary with a data dir of its own:
//! a cancel sent to an API node stops the job on the worker host that runs it (and that
//! worker then drops the job's local copies); SIGTERM of an `sftd worker` checkpoints and
//! requeues its job, which another worker resumes; `sftd serve` (API and worker in one
//! process) runs a job on PostgreSQL and streams it; a job created on an API node is
//! estimated by the worker and left queued when it is too big for it, and failed once it has
//! waited the placement grace; a checkpoint upload that
//! fails because the storage is down requeues the job, which succeeds once the storage is back;
//! `/readyz` answers 503 within its bound while the database hangs, and 200 once it answers; a
//! worker whose checkpoint row or success is refused (its claim taken meanwhile) deletes the
//! checkpoint or the result files it stored.

mod common;

use common::cluster::{
    api_node, checkpoint_steps, claim_of, cluster_env, metric_steps, wait_logged, wait_until,
    worker, worker_id, LONG,
};
use common::postgres::PgServer;
use common::s3::S3Server;
use common::{example, open_stream, read_sse, tiny_job};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until `path` no longer exists (a worker drops its copies after recording the end).
async fn wait_gone(path: &Path) {
    let deadline = Instant::now() + LONG;
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} was never removed",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The local path of an uploaded file's copy in a node's data dir.
async fn file_copy(db: &PgPool, data_dir: &Path, file: &str) -> std::path::PathBuf {
    let key: String = sqlx::query_scalar("SELECT path FROM files WHERE id = $1")
        .bind(file)
        .fetch_one(db)
        .await
        .unwrap();
    data_dir.join(key)
}

fn statuses(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["data"]["status"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_an_api_node_stops_the_job_on_the_worker_host_that_runs_it() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let s3 = S3Server::start();
    let env = s3.storage_env(cluster_env(&url), "cancel");
    let (a, b) = (api_node(&env.node("api-a")), api_node(&env.node("api-b")));
    let worker_env = env.node("worker");
    let mut w = worker(&worker_env);
    let wid = worker_id(&mut w);
    let db = PgPool::connect(&url).await.unwrap();
    let file = a.upload(&example("text.jsonl")).await;

    // A long job, created on node A, running on the worker with a checkpoint stored...
    let job = a.create_job(&tiny_job(&file, 400, 2)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(&db, &job, "step 3", |_, steps| steps.len() >= 3).await;
    let local_checkpoints = worker_env
        .data_dir()
        .join("jobs")
        .join(&job)
        .join("checkpoints");
    assert!(local_checkpoints.is_dir());
    assert!(file_copy(&db, &worker_env.data_dir(), &file)
        .await
        .is_file());
    // ...is cancelled through node B.
    let (st, v) = b
        .post_json(&format!("/v1/fine_tuning/jobs/{job}/cancel"), &json!({}))
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // The worker sees it at its next write or heartbeat and stops the run.
    wait_logged(&mut w, "training cancelled").await;
    assert!(w
        .logs()
        .iter()
        .any(|l| l.contains("training cancelled") && l.contains(&job)));
    let events = a.all_events(&job).await;
    let last = events.last().unwrap();
    assert_eq!(last["data"]["status"], "cancelled", "{last}");
    assert_eq!(
        statuses(&events),
        ["validating_files", "queued", "running", "cancelled"]
    );
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    let steps = metric_steps(&db, &job).await;
    assert!(
        steps.len() < 400,
        "the run was not stopped: {} steps",
        steps.len()
    );
    assert_eq!(steps, (1..=steps.len() as i64).collect::<Vec<_>>());
    // Nothing lands after the cancel: the stream through node A ends with it.
    let streamed = read_sse(open_stream(&a, &job, None).await, |_| false).await;
    assert_eq!(streamed.len(), events.len());
    assert!(streamed.last().unwrap().data.contains("\"cancelled\""));
    assert_eq!(a.all_events(&job).await.len(), events.len());
    // The run's local copies are gone from the worker's data dir.
    wait_gone(&local_checkpoints).await;

    // The worker is free: it runs the next job, and drops that job's copies too (the adapter
    // stays, for chat on this host).
    let next = a.create_job(&tiny_job(&file, 3, 2)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    b.wait_status(&next, "succeeded", LONG).await;
    assert_eq!(claim_of(&db, &next).await.0.as_deref(), Some(wid.as_str()));
    let next_dir = worker_env.data_dir().join("jobs").join(&next);
    wait_gone(&next_dir.join("checkpoints")).await;
    wait_gone(&file_copy(&db, &worker_env.data_dir(), &file).await).await;
    assert!(next_dir
        .join("results/epoch-1/adapter_config.json")
        .is_file());
    assert_eq!(checkpoint_steps(&db, &next).await, [2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_worker_requeues_its_job_and_another_worker_resumes_it() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let s3 = S3Server::start();
    let env = s3.storage_env(cluster_env(&url), "sigterm");
    let a = api_node(&env.node("api"));
    let mut w1 = worker(&env.node("worker-1"));
    let first = worker_id(&mut w1);
    let db = PgPool::connect(&url).await.unwrap();
    let file = a.upload(&example("text.jsonl")).await;
    let job = a.create_job(&tiny_job(&file, 40, 0)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until(&db, &job, "step 5", |_, steps| steps.len() >= 5).await;

    assert!(w1.sigterm().success());
    // Checkpointed where it stopped (no save_steps: only the shutdown saves), and requeued.
    let j = a.job(&job).await;
    assert_eq!(j["status"], "queued", "{j}");
    let saved = checkpoint_steps(&db, &job).await;
    assert_eq!(saved.len(), 1, "{saved:?}");
    let at = saved[0];
    assert!(at >= 5, "{saved:?}");
    assert_eq!(metric_steps(&db, &job).await, (1..=at).collect::<Vec<_>>());
    let events = a.all_events(&job).await;
    assert!(events.iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Job suspended at step {at}"))));
    // It left the registry.
    let (_, listed) = a.get("/v1/workers").await;
    assert_eq!(listed["data"], json!([]), "{listed}");

    // Another worker, with an empty data dir, resumes it from that checkpoint.
    let mut w2 = worker(&env.node("worker-2"));
    let second = worker_id(&mut w2);
    a.wait_status(&job, "succeeded", LONG).await;
    let (holder, epoch, attempts) = claim_of(&db, &job).await;
    assert_eq!(
        (holder.as_deref(), epoch, attempts),
        (Some(second.as_str()), 2, 2)
    );
    assert_ne!(first, second);
    assert_eq!(metric_steps(&db, &job).await, (1..=40).collect::<Vec<_>>());
    // The result files are the finishing claim's (epoch 2), under its own keys.
    let results: Vec<String> = sqlx::query_scalar("SELECT path FROM files WHERE job_id = $1")
        .bind(&job)
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(results.len(), 3, "{results:?}");
    let epoch_2 = format!("jobs/{job}/results/epoch-2/");
    assert!(
        results.iter().all(|p| p.starts_with(&epoch_2)),
        "{results:?}"
    );
    let resumed = format!("Resuming from checkpoint step-{at}");
    assert!(a
        .all_events(&job)
        .await
        .iter()
        .any(|e| e["message"] == resumed.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgresql_runs_a_job_and_streams_its_events() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let s3 = S3Server::start();
    let env = s3.storage_env(cluster_env(&url), "serve");
    let s = env.node("serve").start();
    let file = s.upload(&example("text.jsonl")).await;
    let job = s.create_job(&tiny_job(&file, 6, 3)).await;
    // `serve` estimates at creation: it has the device.
    assert!(
        job["estimated_peak_memory_bytes"].as_u64().is_some(),
        "{job}"
    );
    let id = job["id"].as_str().unwrap();
    let streamed = read_sse(open_stream(&s, id, None).await, |_| false).await;
    let ids: Vec<i64> = streamed
        .iter()
        .map(|e| e.id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>());
    let parsed: Vec<Value> = streamed
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(
        statuses(&parsed),
        ["validating_files", "queued", "running", "succeeded"]
    );
    let steps: Vec<i64> = parsed
        .iter()
        .filter(|v| v["type"] == "metrics")
        .map(|v| v["data"]["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    let j = s.job(id).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["result_files"].as_array().unwrap().len(), 3, "{j}");
    // The process is its own worker, registered like any other.
    let (_, listed) = s.get("/v1/workers").await;
    let workers = listed["data"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{listed}");
    assert_eq!(workers[0]["state"], "active");
    // The adapter is in the bucket.
    assert!(s3
        .object_path(&format!(
            "serve/jobs/{id}/results/epoch-1/adapter_model.safetensors"
        ))
        .is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_from_an_api_node_is_estimated_by_the_worker_and_left_queued_when_too_big() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    // One data dir for both processes (no object storage): the shared mount of a cluster.
    let env = cluster_env(&url);
    let a = api_node(&env);
    let file = a.upload(&example("text.jsonl")).await;
    // Far beyond this machine's memory (the single-node test of the same recipe is refused).
    let mut big = tiny_job(&file, 2, 0);
    big["method"]["supervised"]["hyperparameters"]["max_seq_len"] = json!(131072);
    big["method"]["supervised"]["hyperparameters"]["batch_size"] = json!(4);
    let big = a.create_job(&big).await;
    let big_id = big["id"].as_str().unwrap().to_string();
    // The API node has no device: no estimate, nothing refused.
    assert_eq!(big["estimated_peak_memory_bytes"], Value::Null, "{big}");
    a.wait_status(&big_id, "queued", LONG).await;

    // (An hour's placement grace: however slow this machine, the worker does not fail it yet.)
    let _w = worker(&env.clone().with("SFTD_PLACEMENT_GRACE_MS", "3600000"));
    let small = a.create_job(&tiny_job(&file, 2, 0)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The younger job that fits runs; the older one that does not stays queued, never claimed.
    a.wait_status(&small, "succeeded", LONG).await;
    let j = a.job(&big_id).await;
    assert_eq!(j["status"], "queued", "{j}");
    assert_eq!(claim_of(&db_of(&url).await, &big_id).await, (None, 0, 0));
    let estimate = j["estimated_peak_memory_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("the worker did not estimate {j}"));
    let (_, listed) = a.get("/v1/workers").await;
    let memory = listed["data"][0]["memory_total_bytes"].as_u64().unwrap();
    assert!(estimate > memory, "{estimate} fits in {memory}");
    // The small job was estimated by the worker too.
    assert!(a.job(&small).await["estimated_peak_memory_bytes"]
        .as_u64()
        .is_some());
    let (st, v) = a
        .post_json(&format!("/v1/fine_tuning/jobs/{big_id}/cancel"), &json!({}))
        .await;
    assert_eq!(st, 200, "{v}");

    // With a short placement grace (a second worker's), such a job does not wait forever: it
    // fails with `insufficient_memory` naming its estimate and the largest live worker's memory,
    // and its event stream through the API node ends with that failure.
    let mut big = tiny_job(&file, 2, 0);
    big["method"]["supervised"]["hyperparameters"]["max_seq_len"] = json!(131072);
    big["method"]["supervised"]["hyperparameters"]["batch_size"] = json!(4);
    let doomed = a.create_job(&big).await["id"].as_str().unwrap().to_string();
    let _impatient = worker(&env.clone().with("SFTD_PLACEMENT_GRACE_MS", "1"));
    let streamed = read_sse(open_stream(&a, &doomed, None).await, |_| false).await;
    let last: Value = serde_json::from_str(&streamed.last().unwrap().data).unwrap();
    assert_eq!(last["data"]["status"], "failed", "{last}");
    let j = a.wait_status(&doomed, "failed", LONG).await;
    assert_eq!(j["error"]["code"], "insufficient_memory", "{j}");
    let message = j["error"]["message"].as_str().unwrap();
    let estimate = j["estimated_peak_memory_bytes"].as_u64().unwrap();
    assert!(
        message.contains(&format!("({estimate} bytes)")),
        "{message}"
    );
    assert!(message.contains(&format!("({memory} bytes)")), "{message}");
    assert_eq!(claim_of(&db_of(&url).await, &doomed).await, (None, 0, 0));
}

async fn db_of(url: &str) -> PgPool {
    PgPool::connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_upload_while_storage_is_down_requeues_the_job_which_succeeds_later() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let mut s3 = S3Server::start();
    let env = s3
        .storage_env(cluster_env(&url), "outage")
        .with("SFTD_MAX_ATTEMPTS", "20");
    let a = api_node(&env.node("api"));
    let _w = worker(&env.node("worker"));
    let db = PgPool::connect(&url).await.unwrap();
    let file = a.upload(&example("text.jsonl")).await;
    let job = a.create_job(&tiny_job(&file, 40, 4)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Checkpoint 4 is stored, then the storage goes away before the next one.
    let deadline = Instant::now() + LONG;
    while checkpoint_steps(&db, &job).await.is_empty() {
        assert!(Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s3.stop();
    // The upload of the next checkpoint fails (after its retries): requeued, not failed.
    let deadline = Instant::now() + LONG;
    let requeued = loop {
        let events = a.all_events(&job).await;
        if let Some(e) = events.iter().find(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("The artifact storage is unavailable")
        }) {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "never requeued: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(requeued["data"]["status"], "queued", "{requeued}");
    assert_eq!(requeued["data"]["interrupted"], true, "{requeued}");
    s3.restart();
    let j = a.wait_status(&job, "succeeded", LONG).await;
    assert!(j["error"].is_null(), "{j}");
    assert!(claim_of(&db, &job).await.2 >= 2);
    // Resumed from the stored checkpoint; every step recorded once.
    assert_eq!(metric_steps(&db, &job).await, (1..=40).collect::<Vec<_>>());
    let events = a.all_events(&job).await;
    let stored = checkpoint_steps(&db, &job).await;
    assert!(events.iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .starts_with("Resuming from checkpoint step-")));
    assert_eq!(stored, (1..=10).map(|i| 4 * i).collect::<Vec<_>>());
    assert!(!statuses(&events).contains(&"failed".to_string()));
}

/// A TCP proxy on a free loopback port to `target`, passing bytes both ways until the returned
/// flag is set; then it holds every connection open and passes nothing, as a database host that
/// has stalled (or a partition that drops packets) looks to its clients, until it is cleared.
async fn stallable_proxy(target: u16) -> (u16, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", target))
                .await
                .unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)] {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    (port, stalled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_in_time_while_the_database_hangs() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let (proxy_port, stalled) = stallable_proxy(pg.port).await;
    let via_proxy = url.replace(&format!(":{}/", pg.port), &format!(":{proxy_port}/"));
    assert_ne!(via_proxy, url, "the database URL names the server's port");
    let node = api_node(&cluster_env(&via_proxy));
    let (st, body) = node.get("/readyz").await;
    assert_eq!((st, &body["database"]), (200, &json!(true)), "{body}");

    stalled.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    let (st, body) = node.get("/readyz").await;
    let took = asked.elapsed();
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["database"], json!(false), "{body}");
    assert!(took < Duration::from_secs(5), "/readyz took {took:?}");

    stalled.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, body) = node.get("/readyz").await;
        if st == 200 {
            assert_eq!(body["database"], json!(true), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `sftd serve` on PostgreSQL and S3 (bucket prefix `withdraw`) running one job, held at the
/// fault point `pause` (`SFTD_FAULT_PAUSE`) for three seconds, with a lease of a minute so that
/// no other claim (and no prune) comes while a test looks.
struct Held {
    _pg: PgServer,
    s3: S3Server,
    serve: common::Server,
    db: PgPool,
    job: String,
    /// The held claim's epoch.
    epoch: i64,
}

impl Held {
    async fn start(pause: &str, max_steps: u32, save_steps: u32) -> Option<Held> {
        let pg = PgServer::start()?;
        let url = pg.database().await;
        let s3 = S3Server::start();
        let env = s3
            .storage_env(cluster_env(&url), "withdraw")
            .with("SFTD_LEASE_MS", "60000")
            .with("SFTD_FAULT_PAUSE", pause)
            .with("SFTD_FAULT_PAUSE_MS", "3000");
        let mut serve = env.node("serve").start();
        let db = PgPool::connect(&url).await.unwrap();
        let file = serve.upload(&example("text.jsonl")).await;
        let job = serve
            .create_job(&tiny_job(&file, max_steps, save_steps))
            .await["id"]
            .as_str()
            .unwrap()
            .to_string();
        wait_logged(&mut serve, &format!("SFTD_FAULT_PAUSE {pause} reached")).await;
        let (_, epoch, _) = claim_of(&db, &job).await;
        Some(Held {
            _pg: pg,
            s3,
            serve,
            db,
            job,
            epoch,
        })
    }

    /// The path in the bucket of the key `jobs/<job>/<rest>`.
    fn stored(&self, rest: &str) -> std::path::PathBuf {
        self.s3
            .object_path(&format!("withdraw/jobs/{}/{rest}", self.job))
    }

    /// Another claim takes the job, as far as the store's fencing is concerned.
    async fn take_over(&self) {
        sqlx::query("UPDATE jobs SET epoch = epoch + 1 WHERE id = $1")
            .bind(&self.job)
            .execute(&self.db)
            .await
            .unwrap();
    }
}

/// A worker whose checkpoint row is refused because its claim was taken between publishing the
/// checkpoint and writing the row deletes what it published: no row will ever name those objects,
/// and the job's later prunes may not come (the stale worker's upload can land after the final
/// one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_row_is_refused_is_deleted_by_the_worker_that_published_it() {
    // Held with the second checkpoint (step 4) published and its row not yet written.
    let Some(mut h) = Held::start("checkpoint_published:2", 40, 2).await else {
        return;
    };
    let epoch = h.epoch;
    let published = h.stored(&format!("checkpoints/epoch-{epoch}/step-4/manifest.json"));
    assert!(published.is_file());
    h.take_over().await;
    wait_logged(
        &mut h.serve,
        "checkpoint row refused (lease lost): its objects deleted",
    )
    .await;
    assert!(
        !published.exists(),
        "{} is still stored",
        published.display()
    );
    // The first checkpoint, whose row committed, stays.
    assert_eq!(checkpoint_steps(&h.db, &h.job).await, [2]);
    assert!(h
        .stored(&format!("checkpoints/epoch-{epoch}/step-2/manifest.json"))
        .is_file());
}

/// The same for a run's result files: a worker whose success is refused (its claim taken after
/// it stored the adapter and metrics under its own epoch's keys) deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_files_whose_success_is_refused_are_deleted_by_the_worker_that_stored_them() {
    let Some(mut h) = Held::start("results_published:1", 4, 2).await else {
        return;
    };
    let names = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.csv",
    ];
    let results = format!("results/epoch-{}", h.epoch);
    let stored = |h: &Held, name: &str| h.stored(&format!("{results}/{name}")).is_file();
    assert!(names.iter().all(|n| stored(&h, n)));
    h.take_over().await;
    wait_logged(&mut h.serve, "success refused (lease lost)").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while names.iter().any(|n| stored(&h, n)) {
        assert!(Instant::now() < deadline, "result files still stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status: String = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
        .bind(&h.job)
        .fetch_one(&h.db)
        .await
        .unwrap();
    assert_eq!(
        status, "running",
        "the job is the new claim's, not succeeded"
    );
}
