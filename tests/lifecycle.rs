//! Real training jobs through the real binary on the demo model: the whole lifecycle to a
//! downloadable adapter, SSE replay, cancel, kill -9 and restart, SIGTERM.

mod common;

use common::jobs::{assert_gap_free, statuses};
use common::{example, open_stream, read_sse, tiny_job, Env};
use serde_json::{json, Value};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn is_terminal(ev: &common::SseEvent) -> bool {
    let v: Value = serde_json::from_str(&ev.data).unwrap();
    matches!(
        v["data"]["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

#[tokio::test]
async fn full_lifecycle_on_the_demo_model_to_a_downloadable_adapter() {
    let env = Env::new();
    let s = env.start();
    let train = s.upload(&example("tool_calls.jsonl")).await;
    let val = s.upload(&example("prompt_completion.jsonl")).await;
    let mut body = tiny_job(&train, 6, 3);
    body["validation_file"] = json!(val);
    body["suffix"] = json!("demo");
    body["method"]["supervised"]["hyperparameters"]["max_seq_len"] = json!(256);
    body["method"]["supervised"]["hyperparameters"]["eval_steps"] = json!(3);
    let job = s.create_job(&body).await;
    let id = job["id"].as_str().unwrap();
    assert!(id.starts_with("ftjob-"));
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "validating_files");
    assert_eq!(job["hyperparameters"]["max_steps"], 6);
    assert_eq!(job["hyperparameters"]["lora"]["r"], 4);
    assert_eq!(job["method"]["type"], "supervised");
    assert_eq!(job["seed"], 7);

    // Follow the stream from the start to the terminal event; it then closes.
    let streamed = read_sse(open_stream(&s, id, None).await, |_| false).await;
    assert!(is_terminal(streamed.last().unwrap()));
    let events = s.all_events(id).await;
    assert_eq!(streamed.len(), events.len());
    for (sse, ev) in streamed.iter().zip(&events) {
        assert_eq!(sse.id.as_deref(), Some(ev["seq"].to_string().as_str()));
        assert_eq!(serde_json::from_str::<Value>(&sse.data).unwrap(), *ev);
    }
    assert_gap_free(&events);
    assert_eq!(
        statuses(&events),
        ["validating_files", "queued", "running", "succeeded"]
    );
    let step1 = events
        .iter()
        .find(|e| e["type"] == "metrics" && e["data"]["step"] == 1)
        .unwrap();
    assert_eq!(step1["object"], "fine_tuning.job.event");
    for key in [
        "step",
        "total_steps",
        "epoch",
        "train_loss",
        "learning_rate",
        "grad_norm",
        "train_mean_token_accuracy",
        "num_tokens",
        "tokens_per_second",
        "elapsed_seconds",
        "eta_seconds",
    ] {
        assert!(step1["data"][key].is_number(), "{key} in {step1}");
    }
    // f32 on the CPU: no loss scaling.
    assert!(step1["data"]["loss_scale"].is_null(), "{step1}");
    assert_eq!(step1["data"]["skipped_steps"], 0, "{step1}");
    assert!(events
        .iter()
        .any(|e| e["type"] == "metrics" && e["data"]["valid_loss"].is_number()));

    let job = s.job(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(job["trained_tokens"].as_i64().unwrap() > 0);
    assert!(job["finished_at"].is_number());
    assert_eq!(job["fine_tuned_model"], format!("ft:sftd-demo:demo:{id}"));
    let results = job["result_files"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{job}");
    let mut names = Vec::new();
    for r in results {
        let (_, f) = s.get(&format!("/v1/files/{}", r.as_str().unwrap())).await;
        assert_eq!(f["purpose"], "fine-tune-results");
        let bytes = s.download(r.as_str().unwrap()).await;
        assert_eq!(bytes.len() as i64, f["bytes"].as_i64().unwrap());
        let name = f["filename"].as_str().unwrap().to_string();
        match name.as_str() {
            "adapter_model.safetensors" => {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
                assert!(header
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|k| k.contains("lora_A")));
            }
            "adapter_config.json" => {
                let c: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(c["r"], 4, "{c}");
            }
            "metrics.csv" => {
                let text = String::from_utf8(bytes).unwrap();
                let mut lines = text.lines();
                assert_eq!(
                    lines.next().unwrap(),
                    "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,learning_rate,grad_norm,num_tokens,\
                     tool_name_accuracy,tool_args_exact,tool_json_valid,no_call_accuracy,tool_args_valid"
                );
                let rows: Vec<&str> = lines.collect();
                assert_eq!(rows.len(), 6, "{text}");
                assert!(
                    rows[2].split(',').nth(3).is_some_and(|v| !v.is_empty()),
                    "valid_loss at step 3: {text}"
                );
            }
            other => panic!("unexpected result file {other}"),
        }
        names.push(name);
    }
    // Checkpoints at the save interval, newest first, with OpenAI's fields.
    let (_, cks) = s
        .get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"))
        .await;
    let steps: Vec<i64> = cks["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [6, 3], "{cks}");
    let ck = &cks["data"][0];
    assert_eq!(ck["object"], "fine_tuning.job.checkpoint");
    assert!(ck["id"].as_str().unwrap().starts_with("ftckpt-"));
    assert!(ck["metrics"]["train_loss"].is_number());
    assert_eq!(
        ck["fine_tuned_model_checkpoint"],
        format!("ft:sftd-demo:demo:{id}:ckpt-step-6")
    );
    // The list shows it; the finished stream answers 204; cancelling a finished job is a no-op.
    let (_, list) = s.get("/v1/fine_tuning/jobs").await;
    assert_eq!(list["data"][0]["id"], id);
    let r = s
        .client
        .get(s.url(&format!(
            "/v1/fine_tuning/jobs/{id}/events?stream=true&after={}",
            events.len()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (st, v) = s
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("succeeded")));

    // A second job continues from the first one's adapter.
    let mut cont = tiny_job(&train, 2, 0);
    cont["init_adapter"] = json!(id);
    let c = s.create_job(&cont).await;
    let c = s.wait_finished(c["id"].as_str().unwrap(), LONG).await;
    assert_eq!(c["status"], "succeeded", "{c}");
}

#[tokio::test]
async fn sse_replay_from_last_event_id_equals_the_uninterrupted_stream() {
    let env = Env::new();
    let s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    let id = s.start_job(&tiny_job(&train, 12, 4)).await;

    let full = tokio::spawn({
        let resp = open_stream(&s, &id, None).await;
        async move { read_sse(resp, |_| false).await }
    });
    // Reconnect repeatedly while the job runs: each piece resumes from the last id seen.
    let mut pieces = Vec::new();
    let mut last: Option<i64> = None;
    loop {
        let resp = open_stream(&s, &id, last).await;
        let mut n = 0;
        let part = read_sse(resp, |_| {
            n += 1;
            n == 3
        })
        .await;
        last = part
            .last()
            .and_then(|e| e.id.as_ref())
            .map(|i| i.parse().unwrap());
        let done = part.last().is_some_and(is_terminal);
        pieces.extend(part);
        if done {
            break;
        }
    }
    let full = full.await.unwrap();
    assert!(is_terminal(full.last().unwrap()));
    assert_eq!(pieces, full);
    // `?after=` replays the same suffix.
    let r = s
        .client
        .get(s.url(&format!(
            "/v1/fine_tuning/jobs/{id}/events?stream=true&after=5"
        )))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    assert!(r.headers().get("content-encoding").is_none());
    let tail = read_sse(r, |_| false).await;
    assert_eq!(tail, full[5..]);
    // The raw stream starts with the reconnect delay.
    let raw = s
        .client
        .get(s.url(&format!("/v1/fine_tuning/jobs/{id}/events?stream=true")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        raw.starts_with("retry: 2000\n\nid: 1\ndata: {"),
        "{}",
        &raw[..80]
    );
    let events = s.all_events(&id).await;
    assert_gap_free(&events);
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_a_queued_one() {
    let env = Env::new();
    let s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    let running = s.start_job(&tiny_job(&train, 100_000, 0)).await;
    let queued = s.start_job(&tiny_job(&train, 2, 0)).await;
    s.wait_train_steps(&running, 2, LONG).await;
    assert_eq!(s.job(&queued).await["status"], "queued");
    let r = s.job(&running).await;
    assert_eq!(r["status"], "running");
    assert!(
        r["estimated_finish"].as_i64().unwrap() >= r["created_at"].as_i64().unwrap(),
        "{r}"
    );
    let (_, m) = s.get("/metrics").await;
    let m = m.as_str().unwrap().to_string();
    for line in [
        "sftd_queue_depth 1",
        "sftd_jobs{status=\"running\"} 1",
        "sftd_worker_busy 1",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }

    // The dataset of an unfinished job cannot be deleted.
    let r = s
        .client
        .delete(s.url(&format!("/v1/files/{train}")))
        .send()
        .await
        .unwrap();
    let (st, v) = common::status_json(r).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("file_in_use")),
        "{v}"
    );

    let stream = open_stream(&s, &running, Some(1)).await;
    let (st, v) = s
        .post_json(&format!("/v1/fine_tuning/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    let (st, v) = s
        .post_json(
            &format!("/v1/fine_tuning/jobs/{running}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // The stream ends with the cancelled event.
    let got = tokio::time::timeout(Duration::from_secs(30), read_sse(stream, |_| false))
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&got.last().unwrap().data).unwrap();
    assert_eq!(last["data"]["status"], "cancelled");
    // Training stopped: the worker lets go of the job (at its next micro-batch), and once it has,
    // no event follows the terminal one and the queued job never ran.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let (_, m) = s.get("/metrics").await;
        if m.as_str().unwrap().contains("sftd_worker_busy 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still busy: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = s.all_events(&running).await;
    assert_eq!(events.last().unwrap()["data"]["status"], "cancelled");
    assert_gap_free(&events);
    let q = s.job(&queued).await;
    assert!(
        q["started_at"].is_null() && q["result_files"] == json!([]),
        "{q}"
    );
    assert_eq!(
        statuses(&s.all_events(&queued).await),
        ["validating_files", "queued", "cancelled"]
    );
    let (st, _) = s
        .post_json("/v1/fine_tuning/jobs/ftjob-nope/cancel", &json!({}))
        .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn kill_9_mid_training_then_restart_finishes_without_gaps() {
    let env = Env::new();
    let mut s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    let id = s.start_job(&tiny_job(&train, 24, 4)).await;
    s.wait_train_steps(&id, 6, LONG).await;
    s.kill9();
    // What the killed claim (epoch 1) might have been storing when it died, with no row naming
    // it: the next start's sweep deletes it (the storage is the data dir by default).
    let data = env.dir.path().join("data");
    let late = [
        data.join(format!(
            "jobs/{id}/checkpoints/epoch-1/step-999/manifest.json"
        )),
        data.join(format!(
            "jobs/{id}/results/epoch-1/adapter_model.safetensors"
        )),
    ];
    for path in &late {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"late").unwrap();
    }

    let s = env.clone().with("SFTD_SWEEP_INTERVAL_MS", "300").start();
    let job = s.wait_finished(&id, LONG).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    // (The sweep runs in the background; it has no reason to take long.)
    let wait_swept = |paths: Vec<std::path::PathBuf>| async move {
        let swept = std::time::Instant::now();
        while paths.iter().any(|p| p.exists()) && swept.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for path in &paths {
            assert!(!path.exists(), "{} was not swept", path.display());
        }
    };
    wait_swept(late.to_vec()).await;
    // Left while the node runs (as by a worker elsewhere that dies now): the next round's.
    let later = [
        data.join(format!(
            "jobs/{id}/checkpoints/epoch-1/step-998/manifest.json"
        )),
        data.join(format!("jobs/{id}/results/epoch-1/adapter_config.json")),
    ];
    for path in &later {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"later").unwrap();
    }
    wait_swept(later.to_vec()).await;
    let events = s.all_events(&id).await;
    assert_gap_free(&events);
    assert_eq!(common::jobs::train_events(&events).len(), 24);
    let messages: Vec<&str> = events
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("interrupted by a server restart")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("Resuming from checkpoint")),
        "{messages:?}"
    );
    assert_eq!(
        statuses(&events),
        [
            "validating_files",
            "queued",
            "running",
            "queued",
            "running",
            "succeeded"
        ]
    );
    // Checkpoint rows are not duplicated by the resumed run.
    let (_, cks) = s
        .get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100"))
        .await;
    let mut steps: Vec<i64> = cks["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step_number"].as_i64().unwrap())
        .collect();
    steps.sort();
    assert_eq!(steps, [4, 8, 12, 16, 20, 24]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_requeues_and_exits_zero() {
    let env = Env::new();
    let mut s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    let id = s.start_job(&tiny_job(&train, 16, 0)).await;
    s.wait_train_steps(&id, 3, LONG).await;
    // A follower is connected when the server goes down; its stream ends, it does not hang the exit.
    let before = tokio::spawn(read_sse(open_stream(&s, &id, None).await, |_| false));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = s.sigterm();
    assert!(status.success(), "{status:?}");
    let before = tokio::time::timeout(Duration::from_secs(10), before)
        .await
        .unwrap()
        .unwrap();
    assert!(!before.is_empty() && !is_terminal(before.last().unwrap()));

    // The suspended step was checkpointed on disk, and the job was left queued.
    let ckpts = env.data_dir().join("jobs").join(&id).join("checkpoints");
    let saved: Vec<_> = std::fs::read_dir(&ckpts).unwrap().collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let s = env.start();
    let events = s.all_events(&id).await;
    let suspended = events
        .iter()
        .find(|e| e["message"].as_str().unwrap().contains("suspended"))
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(suspended["data"]["status"], "queued");
    // It reconnects to the restarted server with Last-Event-ID and misses nothing.
    let last_seen = before.last().unwrap().id.as_ref().unwrap().parse().unwrap();
    let after = read_sse(open_stream(&s, &id, Some(last_seen)).await, |_| false).await;
    let job = s.wait_finished(&id, LONG).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = s.all_events(&id).await;
    assert_gap_free(&events);
    let followed: Vec<Value> = before
        .iter()
        .chain(&after)
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(followed, events);
    assert!(events.iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .starts_with("Resuming from checkpoint")));
    assert_eq!(
        statuses(&events),
        [
            "validating_files",
            "queued",
            "running",
            "queued",
            "running",
            "succeeded"
        ]
    );
}

#[tokio::test]
async fn a_job_the_trainer_rejects_fails_with_a_message_and_the_stream_closes() {
    let env = Env::new();
    let s = env.start();
    let train = s.upload(&example("tool_calls.jsonl")).await;
    // No example fits 8 tokens: the trainer refuses the dataset.
    let mut body = tiny_job(&train, 4, 0);
    body["method"]["supervised"]["hyperparameters"]["max_seq_len"] = json!(8);
    let job = s.create_job(&body).await;
    let id = job["id"].as_str().unwrap();
    let streamed = tokio::time::timeout(LONG, read_sse(open_stream(&s, id, None).await, |_| false))
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&streamed.last().unwrap().data).unwrap();
    assert_eq!(
        (last["data"]["status"].as_str(), last["level"].as_str()),
        (Some("failed"), Some("error"))
    );
    let job = s.job(id).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "training_failed", "{job}");
    // It names the file by its id, not by the server's path.
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&train) && !message.contains("/data/"),
        "{message}"
    );
    assert_gap_free(&s.all_events(id).await);
    assert_eq!(job["result_files"], json!([]));
    // The worker moves on to the next job.
    let ok = s
        .create_job(&tiny_job(&s.upload(&example("text.jsonl")).await, 2, 0))
        .await;
    let ok = s.wait_finished(ok["id"].as_str().unwrap(), LONG).await;
    assert_eq!(ok["status"], "succeeded");
}
