//! Jobs with their artifacts in S3-compatible storage (a real s3s-fs server), over real
//! sockets: the upload, checkpoints, adapter and metrics land in the bucket and download back
//! intact; a job whose server died resumes on another host, with an empty data dir, from the
//! last checkpoint it finished publishing.

mod common;

use common::jobs::step_numbers;
use common::s3::S3Server;
use common::{example, memory_kib, tiny_job, Env, Server};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(300);
const PREFIX: &str = "team/sftd";

/// The bytes the S3 server holds for `key` (relative to the prefix).
fn object(s3: &S3Server, key: &str) -> Option<Vec<u8>> {
    std::fs::read(s3.object_path(&format!("{PREFIX}/{key}"))).ok()
}

/// Each result file of a succeeded job, by file name, downloaded through the API, checked
/// against the object the bucket holds for it under the keys of the claim `epoch` that
/// finished the job.
async fn results_match_the_bucket(
    s: &Server,
    s3: &S3Server,
    job: &Value,
    epoch: i64,
) -> BTreeMap<String, Vec<u8>> {
    let id = job["id"].as_str().unwrap();
    let mut out = BTreeMap::new();
    for f in job["result_files"].as_array().unwrap() {
        let fid = f.as_str().unwrap();
        let (st, meta) = s.get(&format!("/v1/files/{fid}")).await;
        assert_eq!(st, 200, "{meta}");
        let name = meta["filename"].as_str().unwrap().to_string();
        let key = format!("jobs/{id}/results/epoch-{epoch}/{name}");
        let stored = object(s3, &key).unwrap_or_else(|| panic!("{key} is not in the bucket"));
        let got = s.download(fid).await;
        assert!(
            got == stored,
            "{name}: the download differs from the bucket's object"
        );
        assert_eq!(meta["bytes"].as_u64().unwrap(), got.len() as u64, "{name}");
        out.insert(name, got);
    }
    let names: Vec<&str> = out.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "metrics.csv"
        ]
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_keeps_every_artifact_in_s3_and_serves_it_back_intact() {
    let s3 = S3Server::start();
    let env = s3.storage_env(Env::new(), PREFIX);
    let s = env.start();
    let dataset = std::fs::read(example("text.jsonl")).unwrap();
    let file = s.upload(&example("text.jsonl")).await;

    // The upload is an object in the bucket, not a file in the node's data dir.
    assert!(object(&s3, &format!("files/{file}.jsonl")).unwrap() == dataset);
    assert!(!env.data_dir().join(format!("files/{file}.jsonl")).exists());
    assert!(s.download(&file).await == dataset);

    let id = s.start_job(&tiny_job(&file, 4, 2)).await;
    let job = s.wait_finished(&id, LONG).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(step_numbers(&s.all_events(&id).await), [1, 2, 3, 4]);

    // Each checkpoint is whole in the bucket: every file its manifest lists, with its size.
    for step in [2, 4] {
        // One claim (epoch 1): its checkpoints are under its own keys.
        let dir = format!("jobs/{id}/checkpoints/epoch-1/step-{step}");
        let manifest: Value =
            serde_json::from_slice(&object(&s3, &format!("{dir}/manifest.json")).unwrap()).unwrap();
        let files = manifest["files"].as_object().unwrap();
        assert!(
            files.contains_key("adapter_model.safetensors"),
            "{manifest}"
        );
        assert!(files.contains_key("optimizer.safetensors"), "{manifest}");
        for (name, entry) in files {
            let bytes = object(&s3, &format!("{dir}/{name}"))
                .unwrap_or_else(|| panic!("{dir}/{name} is not in the bucket"));
            assert_eq!(
                bytes.len() as u64,
                entry["bytes"].as_u64().unwrap(),
                "{dir}/{name}"
            );
        }
    }
    results_match_the_bucket(&s, &s3, &job, 1).await;

    // Deleting the dataset deletes its object.
    let r = s
        .client
        .delete(s.url(&format!("/v1/files/{file}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(object(&s3, &format!("files/{file}.jsonl")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_on_another_host_from_the_last_checkpoint_fully_stored_in_s3() {
    let s3 = S3Server::start();
    // Host A dies while writing its third checkpoint (step 6), after publishing steps 2 and 4.
    let env_a = s3
        .storage_env(Env::new(), PREFIX)
        .with("SFTD_FAULT_POINT", "checkpoint_files:3");
    let mut a = env_a.start();
    let file = a.upload(&example("text.jsonl")).await;
    let id = a.start_job(&tiny_job(&file, 8, 2)).await;
    // Host A reaches its fault point and aborts.
    assert!(!a.wait_exit(LONG).success());
    // Host A's claim is epoch 1: its checkpoints are under `epoch-1`.
    let checkpoints = format!("jobs/{id}/checkpoints/epoch-1");
    for step in [2, 4] {
        assert!(object(&s3, &format!("{checkpoints}/step-{step}/manifest.json")).is_some());
    }
    assert!(object(&s3, &format!("{checkpoints}/step-6/manifest.json")).is_none());
    // As if A had died publishing step 4: its files are there, its manifest is not (a
    // committed row naming a damaged checkpoint).
    std::fs::remove_file(s3.object_path(&format!("{PREFIX}/{checkpoints}/step-4/manifest.json")))
        .unwrap();

    // Host B: the same database, the same bucket, an empty data dir of its own.
    let db = format!("sqlite://{}", env_a.data_dir().join("sftd.db").display());
    let env_b = s3
        .storage_env(Env::new(), PREFIX)
        .with("SFTD_DATABASE_URL", &db);
    let b = env_b.start();
    let job = b.wait_finished(&id, LONG).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = b.all_events(&id).await;
    let messages: Vec<String> = events
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m == "Resuming from checkpoint step-2"),
        "{messages:#?}"
    );
    // Every step recorded once, in order, across both hosts.
    assert_eq!(step_numbers(&events), (1..=8).collect::<Vec<_>>());
    // B trained from what it fetched: the dataset and step 2, into its own data dir.
    assert!(env_b
        .data_dir()
        .join(format!("files/{file}.jsonl"))
        .is_file());
    assert!(env_b
        .data_dir()
        .join(format!("{checkpoints}/step-2/manifest.json"))
        .is_file());
    assert!(messages
        .iter()
        .any(|m| m.starts_with("Skipping a damaged checkpoint: committed checkpoint step-4")));
    // Step 4 was published again, whole, by B under its own claim's keys (epoch 2).
    assert!(object(
        &s3,
        &format!("jobs/{id}/checkpoints/epoch-2/step-4/manifest.json")
    )
    .is_some());
    // B's claim (epoch 2) finished the job: the results are under its keys.
    results_match_the_bucket(&b, &s3, &job, 2).await;

    // A third node, with nothing local, answers with the fine-tuned model: it fetches the
    // adapter from the bucket, and its answer is the training node's.
    let env_c = s3
        .storage_env(Env::new(), PREFIX)
        .with("SFTD_DATABASE_URL", &db);
    let model = job["fine_tuned_model"].as_str().unwrap();
    let ask = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0,
        "max_completion_tokens": 6,
    });
    let (st, on_b) = b.post_json("/v1/chat/completions", &ask).await;
    assert_eq!(st, 200, "{on_b}");
    drop(b);
    let c = env_c.start();
    let (st, on_c) = c.post_json("/v1/chat/completions", &ask).await;
    assert_eq!(st, 200, "{on_c}");
    assert_eq!(on_c["choices"][0]["message"], on_b["choices"][0]["message"]);
    assert!(env_c
        .data_dir()
        .join(format!(
            "jobs/{id}/results/epoch-2/adapter_model.safetensors"
        ))
        .is_file());
    drop(a);
}

/// `cargo nextest run --run-ignored only -E 'test(upload_memory_to_s3)' --no-capture`: a 200 MB
/// upload to S3, then two at once; prints the server's peak RSS above its RSS before them and
/// asserts it stays under 96 MiB (each upload holds at most three 8 MiB parts).
#[tokio::test]
#[ignore = "a minute or more and 1.2 GB of disk; run by hand to measure (see docs/cluster.md)"]
async fn upload_memory_to_s3() {
    const MB: usize = 1_000_000;
    let s3 = S3Server::start();
    let env = s3.storage_env(Env::new(), PREFIX);
    let s = env.start();
    s.upload(&example("text.jsonl")).await;
    let (_, before) = memory_kib(s.pid());
    let upload = |size: usize| common::upload_stream(&s, size, MB);
    let r = upload(200 * MB).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let (one, _) = memory_kib(s.pid());
    let (a, b) = tokio::join!(upload(200 * MB), upload(200 * MB));
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
    let (two, _) = memory_kib(s.pid());
    let mib = |kib: u64| kib.saturating_sub(before) as f64 / 1024.0;
    println!(
        "RSS before: {:.1} MiB; peak RSS above it: one 200 MB upload to S3 {:.1} MiB, then two at once {:.1} MiB",
        before as f64 / 1024.0,
        mib(one),
        mib(two)
    );
    let stored: u64 = std::fs::read_dir(s3.object_path(&format!("{PREFIX}/files")))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // Three uploads of 200 MB, less the part of a 1 MB block that does not fit a whole line.
    assert!(stored > 597 * MB as u64, "{stored} bytes in the bucket");
    assert!(
        mib(two) < 96.0,
        "uploads raised the peak RSS by {:.1} MiB",
        mib(two)
    );
}
