//! sftd as a cluster on a real PostgreSQL server (started by the test in a temporary directory):
//! API nodes (`sftd serve --no-worker`) and workers (`sftd worker`) as separate processes of the
//! real binary, sharing one database and, in the main test, one bucket of a real S3-compatible
//! server (`s3s-fs`) with a data directory of its own per process (the 200-job test shares one
//! data directory instead). Shows that jobs spread over the
//! workers, that a killed worker's job is taken over after its lease and succeeds, that a
//! frozen worker past its lease writes nothing once it wakes (fencing), that an event stream
//! moves from one API node to another with `Last-Event-ID` and sees every event exactly once,
//! that the API nodes answer chat with a fine-tuned model, and that no job is claimed twice. Leases are short (SFTD_LEASE_MS) so this runs in CI.

mod common;

use common::cluster::{
    api_node, checkpoint_steps, claim_of, cluster_env, metric_steps, wait_until, worker, worker_id,
    LONG,
};
use common::postgres::PgServer;
use common::s3::S3Server;
use common::{example, open_stream, read_sse, tiny_job, Server};
use serde_json::Value;
use sqlx::PgPool;
use std::time::{Duration, Instant};

fn long_job(file: &str) -> Value {
    tiny_job(file, 40, 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_nodes_and_two_workers_survive_a_killed_and_a_frozen_worker() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let s3 = S3Server::start();
    // Nothing shared but the database and the bucket: each process has its own data dir.
    let env = s3.storage_env(cluster_env(&url), "cluster");
    let (a, b) = (api_node(&env.node("api-a")), api_node(&env.node("api-b")));
    let (mut w1, mut w2) = (worker(&env.node("worker-1")), worker(&env.node("worker-2")));
    let mut workers = vec![(worker_id(&mut w1), w1), (worker_id(&mut w2), w2)];
    let db = PgPool::connect(&url).await.unwrap();
    let file = a.upload(&example("text.jsonl")).await;

    // 8 jobs through both API nodes, spread over both workers.
    let mut jobs = Vec::new();
    for i in 0..8 {
        let node = if i % 2 == 0 { &a } else { &b };
        jobs.push(
            node.create_job(&tiny_job(&file, 6, 3)).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The last job is followed through node A until its first step, then through node B.
    let followed = jobs[7].clone();
    let first_part = read_sse(open_stream(&a, &followed, None).await, |e| {
        e.data.contains("\"type\":\"metrics\"")
    })
    .await;
    let last_id: i64 = first_part
        .last()
        .unwrap()
        .id
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    let second_part = read_sse(open_stream(&b, &followed, Some(last_id)).await, |_| false).await;
    let mut fine_tuned = String::new();
    for id in &jobs {
        let j = b.wait_status(id, "succeeded", LONG).await;
        assert_eq!(j["result_files"].as_array().unwrap().len(), 3, "{j}");
        fine_tuned = j["fine_tuned_model"].as_str().unwrap().to_string();
    }
    // Chat with a fine-tuned model on the API nodes, which train nothing: each fetches the
    // adapter from the bucket and generates on its own device, and greedy, both say the same.
    let ask = serde_json::json!({
        "model": fine_tuned,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0,
        "max_completion_tokens": 6,
    });
    let (st, on_a) = a.post_json("/v1/chat/completions", &ask).await;
    assert_eq!(st, 200, "{on_a}");
    let (st, on_b) = b.post_json("/v1/chat/completions", &ask).await;
    assert_eq!(st, 200, "{on_b}");
    assert!(
        on_a["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{on_a}"
    );
    assert_eq!(on_a["choices"][0]["message"], on_b["choices"][0]["message"]);
    let ran_on: std::collections::BTreeSet<String> =
        sqlx::query_scalar("SELECT worker_id FROM jobs WHERE id = ANY($1)")
            .bind(&jobs)
            .fetch_all(&db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(ran_on.len(), 2, "8 jobs ran on {ran_on:?}");

    let ids: Vec<i64> = first_part
        .iter()
        .chain(&second_part)
        .map(|e| e.id.as_ref().unwrap().parse().unwrap())
        .collect();
    let stored = a.all_events(&followed).await;
    assert_eq!(
        ids,
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let streamed_steps: Vec<i64> = first_part
        .iter()
        .chain(&second_part)
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .filter(|v| v["type"] == "metrics")
        .map(|v| v["data"]["step"].as_i64().unwrap())
        .collect();
    assert_eq!(streamed_steps, (1..=6).collect::<Vec<_>>());

    // kill -9 of the worker running a job: another worker takes it over once its lease expires,
    // resumes from the last checkpoint, and it succeeds with every step recorded once.
    let killed_job = a.create_job(&long_job(&file)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ((holder, _, _), _) =
        wait_until(&db, &killed_job, "step 6", |_, steps| steps.len() >= 6).await;
    let holder = holder.unwrap();
    let i = workers.iter().position(|(id, _)| *id == holder).unwrap();
    let (_, mut victim) = workers.remove(i);
    victim.kill9();
    let j = a.wait_status(&killed_job, "succeeded", LONG).await;
    let (taken_by, epoch, attempts) = claim_of(&db, &killed_job).await;
    assert_ne!(taken_by.as_deref(), Some(holder.as_str()));
    assert_eq!((epoch, attempts), (2, 2), "{j}");
    assert_eq!(
        metric_steps(&db, &killed_job).await,
        (1..=40).collect::<Vec<_>>()
    );
    let events = a.all_events(&killed_job).await;
    assert!(events.iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .starts_with("Resuming from checkpoint")));
    // The dead worker is still registered, and shown as lost.
    let (st, listed) = a.get("/v1/workers").await;
    assert_eq!(st, 200, "{listed}");
    let dead = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == holder.as_str())
        .cloned();
    assert_eq!(dead.unwrap()["state"], "lost");
    let mut replacement = worker(&env.node("worker-3"));
    workers.push((worker_id(&mut replacement), replacement));

    // A worker frozen (SIGSTOP) past its lease, then woken (SIGCONT), writes nothing more for
    // the job another worker took over: its steps stay in order, each recorded once.
    let frozen_job = b.create_job(&long_job(&file)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ((holder, _, _), steps) =
        wait_until(&db, &frozen_job, "step 4", |_, steps| steps.len() >= 4).await;
    let holder = holder.unwrap();
    let i = workers.iter().position(|(id, _)| *id == holder).unwrap();
    workers[i].1.signal("STOP");
    let frozen_at = steps.len();
    // Taken over, and two steps beyond where the frozen worker stopped.
    wait_until(&db, &frozen_job, "the take-over", |(_, epoch, _), steps| {
        *epoch == 2 && steps.len() >= frozen_at + 2
    })
    .await;
    workers[i].1.signal("CONT");
    b.wait_status(&frozen_job, "succeeded", LONG).await;
    assert_eq!(
        metric_steps(&db, &frozen_job).await,
        (1..=40).collect::<Vec<_>>()
    );
    let checkpoints = checkpoint_steps(&db, &frozen_job).await;
    assert_eq!(checkpoints, (1..=10).map(|i| 4 * i).collect::<Vec<_>>());
    assert_eq!(claim_of(&db, &frozen_job).await.1, 2);
    // Every committed checkpoint is whole in the bucket, under the keys of the claim that
    // committed it: the frozen worker's (epoch 1) only for steps it reached before it froze,
    // the rest the new holder's (epoch 2). Whatever the woken worker still uploaded went under
    // epoch 1 keys that no row committed after the take-over names (each verifies against its
    // manifest and is the step its row says).
    let keys: Vec<(i64, String)> =
        sqlx::query_as("SELECT step, path FROM checkpoints WHERE job_id = $1 ORDER BY step")
            .bind(&frozen_job)
            .fetch_all(&db)
            .await
            .unwrap();
    for (step, key) in &keys {
        let prefix = format!("jobs/{frozen_job}/checkpoints/epoch-");
        let epoch = key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(&format!("/step-{step}")))
            .unwrap_or_else(|| panic!("{key} is not a per-claim key of step {step}"));
        match epoch {
            "1" => assert!(*step as usize <= frozen_at, "{key} after the freeze"),
            "2" => {}
            _ => panic!("{key}: epoch {epoch}"),
        }
    }
    for (step, key) in keys {
        let stored = s3.object_path(&format!("cluster/{key}"));
        let state = sftd::train::checkpoint::verify(&stored)
            .unwrap_or_else(|e| panic!("stored checkpoint {key}: {e:#}"));
        assert_eq!(state.step as i64, step, "{key}");
    }
    // The woken worker found out through its heartbeat or its first write, and stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !workers[i].1.logged("lease lost") {
        assert!(
            Instant::now() < deadline,
            "the woken worker did not notice its lost lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its steps are each recorded once: no event of the stale run landed.
    let seqs: Vec<i64> = a
        .all_events(&frozen_job)
        .await
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
}

/// 200 tiny jobs on 4 workers: each job is claimed once (one claim, one `running` event,
/// epoch 1) and succeeds. Prints the queue's throughput (not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tiny_jobs_on_four_workers_are_each_claimed_once() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.database().await;
    let env = cluster_env(&url);
    let (a, b) = (api_node(&env), api_node(&env));
    let _workers: Vec<Server> = (0..4).map(|_| worker(&env)).collect();
    let db = PgPool::connect(&url).await.unwrap();
    let file = a.upload(&example("text.jsonl")).await;
    let mut body = tiny_job(&file, 1, 1);
    body["method"]["supervised"]["hyperparameters"]["max_seq_len"] = 32.into();
    body["method"]["supervised"]["hyperparameters"]["batch_size"] = 1.into();

    let start = Instant::now();
    let n = 200;
    let mut jobs = Vec::new();
    for chunk in 0..n / 20 {
        let creates = (0..20).map(|i| {
            let node = if (chunk * 20 + i) % 2 == 0 { &a } else { &b };
            node.create_job(&body)
        });
        for j in futures::future::join_all(creates).await {
            jobs.push(j["id"].as_str().unwrap().to_string());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(280);
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if done == n as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {n} jobs finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = start.elapsed();
    let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, status, epoch, attempts, \
         (SELECT COUNT(*) FROM events e WHERE e.job_id = jobs.id \
          AND e.data::jsonb ->> 'status' = 'running') FROM jobs ORDER BY n",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rows.len(), n);
    for (id, status, epoch, attempts, running_events) in &rows {
        assert_eq!(
            (status.as_str(), *epoch, *attempts, *running_events),
            ("succeeded", 1, 1, 1),
            "{id}"
        );
    }
    let per_worker: Vec<(String, i64)> = sqlx::query_as(
        "SELECT worker_id, COUNT(*) FROM jobs GROUP BY worker_id ORDER BY worker_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    eprintln!(
        "cluster throughput: {n} tiny jobs on 4 workers in {:.1} s = {:.2} jobs/s; per worker {per_worker:?}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
}
