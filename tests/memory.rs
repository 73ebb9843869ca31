//! The memory estimate over HTTP (shown on the job, an impossible job refused with 400
//! `insufficient_memory`) and through `sftd estimate` (the same number; named GPUs).

mod common;

use common::{example, tiny_job, Env, BIN};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Runs `sftd estimate` and parses its one JSON object.
fn estimate(job: &Path, device: &str, data_dir: &Path) -> Value {
    let out = Command::new(BIN)
        .args(["estimate", job.to_str().unwrap(), "--device", device])
        .env("SFTD_DATA_DIR", data_dir)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("run sftd estimate");
    assert!(
        out.status.success(),
        "sftd estimate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[tokio::test]
async fn a_created_job_carries_the_estimate_the_cli_prints() {
    let env = Env::new();
    let s = env.start();
    let file = s.upload(&example("tool_calls.jsonl")).await;
    let job = s.create_job(&tiny_job(&file, 2, 0)).await;
    let bytes = job["estimated_peak_memory_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no estimate on {job}"));
    // Retrieval shows the same persisted value.
    let again = s.job(job["id"].as_str().unwrap()).await;
    assert_eq!(again["estimated_peak_memory_bytes"].as_u64(), Some(bytes));

    // The same recipe as a CLI job file, on this machine's CPU: the same estimate.
    let mut body = tiny_job(example("tool_calls.jsonl").to_str().unwrap(), 2, 0);
    body["seed"] = json!(7);
    let path = env.path().join("job.json");
    std::fs::write(&path, body.to_string()).unwrap();
    let cli = estimate(&path, "cpu", &env.data_dir());
    assert_eq!(
        cli["estimated_peak_memory_bytes"].as_u64(),
        Some(bytes),
        "{cli}"
    );
    assert_eq!(cli["fits"], json!(true));
    assert!(cli["device_memory_bytes"].as_u64().unwrap() > bytes);
    // The rows that keep a labelled token within max_seq_len 128; batch 2, capped at 2 steps.
    let examples = cli["examples"].as_u64().unwrap();
    assert!((1..=400).contains(&examples), "{cli}");
    assert_eq!(cli["total_steps"], json!(2));
    assert!(
        cli["tokens"]
            .as_u64()
            .is_some_and(|t| t > examples && t <= examples * 128),
        "{cli}"
    );
}

#[tokio::test]
async fn a_job_that_cannot_fit_is_refused_with_the_knobs_that_would_fit() {
    let env = Env::new();
    let s = env.start();
    let file = s.upload(&example("tool_calls.jsonl")).await;
    let mut body = tiny_job(&file, 2, 0);
    let hp = &mut body["method"]["supervised"]["hyperparameters"];
    hp["max_seq_len"] = json!(131072);
    hp["batch_size"] = json!(4);
    let (status, v) = s.post_json("/v1/fine_tuning/jobs", &body).await;
    assert_eq!(status, 400, "{v}");
    let err = &v["error"];
    assert_eq!(err["code"], json!("insufficient_memory"), "{v}");
    assert_eq!(err["param"], json!("method.supervised.hyperparameters"));
    let message = err["message"].as_str().unwrap();
    // "this job needs an estimated N GiB … but cpu has M GiB available …; to fit, … max_seq_len K"
    assert!(message.contains("needs an estimated"), "{message}");
    assert!(message.contains("GiB available"), "{message}");
    assert!(message.contains("to fit, "), "{message}");
    let seq: u64 = message
        .split("max_seq_len ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no max_seq_len suggestion in {message}"));
    assert!((8..131072).contains(&seq), "{message}");
    // Nothing was stored.
    let (_, list) = s.get("/v1/fine_tuning/jobs").await;
    assert_eq!(list["data"], json!([]));

    // The suggested max_seq_len is accepted.
    body["method"]["supervised"]["hyperparameters"]["max_seq_len"] = json!(seq);
    let job = s.create_job(&body).await;
    assert!(job["estimated_peak_memory_bytes"].as_u64().is_some());
}

/// Qwen3-1.7B's config.json fields the estimate reads.
fn qwen3_1_7b(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn named_gpus_are_answered_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("qwen3-1.7b");
    qwen3_1_7b(&model);
    let job = tmp.path().join("job.json");
    let body = json!({"model": model, "training_file": "absent.jsonl"});
    std::fs::write(&job, body.to_string()).unwrap();

    // The seed recipe (batch 4 × 2048, checkpointing) on a T4 in fp16.
    let t4 = estimate(&job, "t4", tmp.path());
    assert_eq!(t4["device_memory_bytes"], json!(16_000_000_000u64));
    assert_eq!(t4["weight_dtype"], json!("f16"));
    assert_eq!(t4["tokens"], Value::Null);
    let fits = t4["fits"].as_bool().unwrap();
    let peak = t4["estimated_peak_memory_bytes"].as_u64().unwrap();
    assert_eq!(fits, peak as f64 <= 0.9 * 16e9, "{t4}");
    if !fits {
        assert!(!t4["suggestions"].as_array().unwrap().is_empty(), "{t4}");
    }
    let a100 = estimate(&job, "a100-80gb", tmp.path());
    assert_eq!(a100["weight_dtype"], json!("bf16"));
    assert_eq!(a100["fits"], json!(true), "{a100}");
}

/// The GPU estimate against peak device memory measured on an H200 (bf16, LoRA r 16
/// all-linear, dropout 0, every sequence 2048 tokens; docs/memory.md's GPU calibration, median
/// of the runs there): within 5% on each shape.
#[test]
fn the_gpu_estimate_stays_within_five_percent_of_the_h200_measurements() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("qwen3-1.7b");
    qwen3_1_7b(&full);
    // Four of those layers with a 4096-token vocabulary (`sftd bench --shape layers-1.7b`).
    let layers = tmp.path().join("layers-1.7b");
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(full.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = json!(4);
    config["vocab_size"] = json!(4096);
    std::fs::create_dir_all(&layers).unwrap();
    std::fs::write(layers.join("config.json"), config.to_string()).unwrap();
    for (model, batch, checkpointing, measured_gb) in [
        (&layers, 4, true, 9.41),
        (&layers, 4, false, 22.36),
        (&layers, 1, true, 3.64),
        (&full, 4, true, 15.02),
    ] {
        let body = json!({"model": model, "training_file": "absent.jsonl", "method": {
            "type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": batch, "max_seq_len": 2048,
                "gradient_checkpointing": checkpointing, "lora": {"r": 16, "dropout": 0.0}}}}});
        let job = tmp.path().join("job.json");
        std::fs::write(&job, body.to_string()).unwrap();
        let h100 = estimate(&job, "h100", tmp.path());
        let gb = h100["estimated_peak_memory_bytes"].as_u64().unwrap() as f64 / 1e9;
        let error = gb / measured_gb - 1.0;
        assert!(
            error.abs() < 0.05,
            "batch {batch}, checkpointing {checkpointing}, {}: estimate {gb:.2} GB, measured \
             {measured_gb} GB ({:+.1}%)",
            model.display(),
            100.0 * error
        );
    }
}
