//! Restartable training: `sftd train` stopped by SIGTERM checkpoints and exits 75, and
//! `--resume` reproduces the uninterrupted run's steps and losses exactly; resume skips a torn
//! or damaged checkpoint for the previous good one; `save_total_limit` and the epoch-end
//! checkpoint cadence.

mod common;

use common::BIN;
use serde_json::{json, Value};
use sftd::train::checkpoint::{self, latest_checkpoint, latest_verified_checkpoint};
use sftd::train::events::{Control, Outcome, StepMetrics};
use sftd::train::trainer::TrainJob;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A 12-step job on the demo model as `sftd train` reads it.
fn job_file(dir: &Path) -> PathBuf {
    let job = dir.join("job.json");
    let body = json!({
        "model": "sftd-demo",
        "training_file": concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tool_calls.jsonl"),
        "seed": 5,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "max_steps": 12, "batch_size": 2, "gradient_accumulation_steps": 2,
            "max_seq_len": 128, "learning_rate": 0.003, "lora": {"r": 4, "dropout": 0.1}}}}
    });
    std::fs::write(&job, body.to_string()).unwrap();
    job
}

fn sftd_train(dir: &Path, out: &str, resume: bool) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("train")
        .arg(job_file(dir))
        .arg("--output")
        .arg(dir.join(out))
        .env("SFTD_DATA_DIR", dir.join("data"))
        .env("SFTD_DEVICE", "cpu")
        .env("SFTD_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

/// The `metrics` records of `metrics.jsonl`, one per step.
fn metrics_records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["train_loss"].is_number())
        .collect()
}

/// What must not change when a run is interrupted and resumed.
fn numbers(r: &Value) -> (u64, f64, f64, f64, u64) {
    (
        r["step"].as_u64().unwrap(),
        r["train_loss"].as_f64().unwrap(),
        r["learning_rate"].as_f64().unwrap(),
        r["grad_norm"].as_f64().unwrap(),
        r["num_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn sigterm_checkpoints_exits_75_and_resume_repeats_the_uninterrupted_losses_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let full = sftd_train(dir, "full", false).output().unwrap();
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    let reference: Vec<_> = metrics_records(&dir.join("full"))
        .iter()
        .map(numbers)
        .collect();
    assert_eq!(reference.len(), 12);

    // Interrupted once step 4 is printed: it checkpoints at the next micro-batch and exits 75.
    let mut child = sftd_train(dir, "split", false).spawn().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines().map_while(Result::ok);
    for line in lines.by_ref() {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "metrics" && v["step"] == 4 {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "{rest:?}");
    let done: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    let message = done["message"].as_str().unwrap();
    assert!(message.starts_with("suspended at step"), "{message}");
    assert!(message.contains("--resume"), "{message}");
    let saved = latest_checkpoint(&dir.join("split")).expect("a checkpoint was written");
    let stopped_at = checkpoint::verify(&saved).unwrap().step;
    assert!((4..12).contains(&stopped_at), "{stopped_at}");

    let resumed = sftd_train(dir, "split", true).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let printed: Vec<u64> = String::from_utf8_lossy(&resumed.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "metrics")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(printed, ((stopped_at + 1)..=12).collect::<Vec<_>>());
    let split: Vec<_> = metrics_records(&dir.join("split"))
        .iter()
        .map(numbers)
        .collect();
    assert_eq!(split, reference, "resumed at step {stopped_at}");
    let adapter =
        |out: &str| std::fs::read(dir.join(out).join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter("split"), adapter("full"));
}

/// A job of `hp` on a tiny model (made once in `dir`) and 20 rows of the tool-call dataset.
fn tiny_job(dir: &Path, out: &str, hp: Value) -> TrainJob {
    let model = dir.join("model");
    if !model.exists() {
        common::train::tiny_model(dir, 7);
    }
    common::train::train_job(dir, &model, out, 20, 3, hp)
}

/// Runs `job` to completion; every step's metrics.
fn run(job: &TrainJob) -> Vec<StepMetrics> {
    let (outcome, steps) = common::train::run_steps(job, &Control::new(), None).unwrap();
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    steps
}

fn saved_steps(out: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .map(|n| n.strip_prefix("step-").unwrap().parse().unwrap())
        .collect();
    steps.sort();
    steps
}

#[test]
fn resume_skips_a_torn_checkpoint_for_the_previous_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let hp = json!({"n_epochs": 1, "max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 1,
        "max_seq_len": 96, "loss_on": "all", "learning_rate": 0.01, "save_steps": 2,
        "lora": {"r": 4, "dropout": 0.1}});
    let mut job = tiny_job(tmp.path(), "out", hp);
    let reference = run(&job);
    let out = job.output_dir.clone();
    assert_eq!(saved_steps(&out), [2, 4, 6]);
    let step = |n: u64| checkpoint::checkpoint_dir(&out, n);
    assert_eq!(latest_checkpoint(&out), Some(step(6)));

    // A truncated file in the newest: the one before it is used, and the reason is given.
    let optimizer = step(6).join("optimizer.safetensors");
    let len = std::fs::metadata(&optimizer).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&optimizer)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (found, torn) = latest_verified_checkpoint(&out);
    assert_eq!(found, Some(step(4)));
    assert_eq!(torn.len(), 1);
    assert!(torn[0].contains("optimizer.safetensors"), "{torn:?}");
    // A deleted file, and a checkpoint without its manifest (cut off before it was written).
    std::fs::remove_file(step(4).join("adapter_config.json")).unwrap();
    assert_eq!(latest_checkpoint(&out), Some(step(2)));
    std::fs::remove_file(step(2).join("manifest.json")).unwrap();
    assert_eq!(latest_checkpoint(&out), None);

    // Same bytes, one flipped: the hash catches what the size cannot.
    std::fs::remove_dir_all(&out).unwrap();
    run(&job);
    let weights = step(6).join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    assert_eq!(latest_checkpoint(&out), Some(step(4)));

    // Resuming from the fallback reproduces the uninterrupted run's remaining steps.
    job.resume_from = latest_checkpoint(&out);
    let rest = run(&job);
    assert_eq!(rest.iter().map(|m| m.step).collect::<Vec<_>>(), [5, 6]);
    for (a, b) in reference[4..].iter().zip(&rest) {
        assert_eq!((a.train_loss, a.grad_norm), (b.train_loss, b.grad_norm));
    }
    assert_eq!(latest_checkpoint(&out), Some(step(6)));
}

#[test]
fn save_total_limit_keeps_the_newest_and_epochs_end_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let hp = json!({"n_epochs": 1, "max_steps": 5, "batch_size": 2, "gradient_accumulation_steps": 1,
        "max_seq_len": 64, "loss_on": "all", "save_steps": 1, "save_total_limit": 2, "lora": {"r": 2}});
    let job = tiny_job(tmp.path(), "limited", hp);
    run(&job);
    assert_eq!(saved_steps(&job.output_dir), [4, 5]);

    // No step cadence on an epoch-based run: a checkpoint at each epoch's end (20 rows, 2 per
    // micro-batch, 2 per step: 5 steps an epoch).
    let hp = json!({"n_epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 2,
        "max_seq_len": 64, "loss_on": "all", "lora": {"r": 2}});
    let job = tiny_job(tmp.path(), "epochs", hp);
    assert_eq!(job.config.save_steps, 0);
    assert_eq!(job.config.save_interval_seconds, 600);
    run(&job);
    assert_eq!(saved_steps(&job.output_dir), [5, 10]);
}
