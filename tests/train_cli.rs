//! `sftd train` without a terminal (a container, a pipe, `hf jobs logs`): every event is a line on
//! stdout, a JSON object per line with `SFTD_LOG_FORMAT=json`.

use serde_json::{json, Value};
use std::process::{Command, Output};

/// Runs `sftd train` on the bundled tool-call examples in `dir` with these hyperparameters,
/// stdout and stderr piped.
fn run_train(dir: &std::path::Path, hyperparameters: Value, log_format: &str) -> Output {
    let job = dir.join("job.json");
    let body = json!({
        "model": "sftd-demo",
        "training_file": concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tool_calls.jsonl"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    });
    std::fs::write(&job, body.to_string()).expect("write job");
    Command::new(env!("CARGO_BIN_EXE_sftd"))
        .arg("train")
        .arg(&job)
        .arg("--output")
        .arg(dir.join("out"))
        .env("SFTD_DATA_DIR", dir.join("data"))
        .env("SFTD_DEVICE", "cpu")
        .env("SFTD_LOG_FORMAT", log_format)
        .output()
        .expect("run sftd train")
}

/// Runs a 2-step job on the demo model with stdout and stderr piped; returns stdout.
fn train(log_format: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let hp = json!({"n_epochs": 1, "max_steps": 2, "batch_size": 2, "max_seq_len": 128});
    let out = run_train(dir.path(), hp, log_format);
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

/// A max_seq_len that cuts every row before its first labelled token fails with the length
/// that would keep one, and that length is exact: one less fails, it trains.
#[test]
fn a_max_seq_len_below_every_prompt_names_the_length_that_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hp =
        |len: usize| json!({"n_epochs": 1, "max_steps": 1, "batch_size": 1, "max_seq_len": len});
    let out = run_train(dir.path(), hp(16), "text");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no labelled token within max_seq_len = 16"),
        "{err}"
    );
    let fit: usize = err
        .split("needs max_seq_len >= ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no length named: {err}"));
    let below = run_train(dir.path(), hp(fit - 1), "text");
    assert!(!below.status.success(), "max_seq_len {} trained", fit - 1);
    let at = run_train(dir.path(), hp(fit), "text");
    assert!(
        at.status.success(),
        "max_seq_len {fit}: {}",
        String::from_utf8_lossy(&at.stderr)
    );
}
