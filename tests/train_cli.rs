//! `sftd train` without a terminal (a container, a pipe, `hf jobs logs`): every event is a line on
//! stdout, a JSON object per line with `SFTD_LOG_FORMAT=json`.

use serde_json::{json, Value};
use std::process::Command;

/// Runs a 2-step job on the demo model with stdout and stderr piped; returns stdout.
fn train(log_format: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.json");
    let body = json!({
        "model": "sftd-demo",
        "training_file": concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tool_calls.jsonl"),
        "method": {"type": "supervised", "supervised": {"hyperparameters":
            {"n_epochs": 1, "max_steps": 2, "batch_size": 2, "max_seq_len": 128}}}
    });
    std::fs::write(&job, body.to_string()).expect("write job");
    let out = Command::new(env!("CARGO_BIN_EXE_sftd"))
        .arg("train")
        .arg(&job)
        .arg("--output")
        .arg(dir.path().join("out"))
        .env("SFTD_DATA_DIR", dir.path().join("data"))
        .env("SFTD_DEVICE", "cpu")
        .env("SFTD_LOG_FORMAT", log_format)
        .output()
        .expect("run sftd train");
    assert!(
        out.status.success(),
        "sftd train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir
        .path()
        .join("out/adapter/adapter_model.safetensors")
        .exists());
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

#[test]
fn json_logs_are_one_event_object_per_line() {
    let stdout = train("json");
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, [1, 2], "{stdout}");
    let last = events.last().expect("some output");
    assert_eq!(last["type"], "done", "{stdout}");
    assert!(last["message"]
        .as_str()
        .unwrap()
        .starts_with("done: 2 steps"));
}

#[test]
fn text_logs_print_every_step_without_a_terminal() {
    let stdout = train("text");
    assert!(stdout.contains("step 1/2: loss "), "{stdout}");
    assert!(stdout.contains("step 2/2: loss "), "{stdout}");
    assert!(
        stdout.lines().last().unwrap().starts_with("done: 2 steps"),
        "{stdout}"
    );
}
