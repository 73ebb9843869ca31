//! Fixtures for the tests that drive the trainer directly, without a server: a tiny generated
//! Qwen3, rows of the repository's tool-call dataset encoded for it, a `TrainJob` on them, and a
//! run that collects every step's metrics.

use sftd::train::data::encode::{Encoder, Example};
use sftd::train::data::parse_jsonl;
use sftd::train::data::template::ChatTemplate;
use sftd::train::demo::{write_model, DemoSize};
use sftd::train::events::{Control, Outcome, StepMetrics, TrainEvent};
use sftd::train::spec::{JobSpec, LossOn};
use sftd::train::trainer::{self, TrainJob};
use std::path::{Path, PathBuf};

const TOOL_CALLS: &str = include_str!("../../examples/tool_calls.jsonl");

/// A tiny Qwen3 with weights drawn from `seed`, written to `dir/model`.
pub fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    let m = dir.join("model");
    write_model(&m, DemoSize::TINY, seed).unwrap();
    m
}

/// The first `n` rows of the tool-call dataset encoded for the model in `model_dir`, cut to
/// `max_len` tokens with the loss on every token (a short window of a long row then still has
/// targets).
pub fn encoded_examples(model_dir: &Path, n: usize, max_len: usize) -> Vec<Example> {
    let tok = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    let tmpl = ChatTemplate::from_model_dir(model_dir).unwrap();
    let rows = parse_jsonl(TOOL_CALLS.as_bytes()).unwrap();
    let enc = Encoder {
        tokenizer: &tok,
        template: &tmpl,
        loss_on: LossOn::All,
        max_seq_len: max_len,
    };
    rows[..n]
        .iter()
        .map(|(l, r)| enc.encode(*l, r).unwrap())
        .collect()
}

/// A CPU job of `hp` with `seed` on `model`, training on the first `rows` rows of the tool-call
/// dataset (written once to `dir/train.jsonl`) into `dir/out`.
pub fn train_job(
    dir: &Path,
    model: &Path,
    out: &str,
    rows: usize,
    seed: u64,
    hp: serde_json::Value,
) -> TrainJob {
    let data = dir.join("train.jsonl");
    if !data.exists() {
        let lines: Vec<&str> = TOOL_CALLS.lines().take(rows).collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
    }
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "model": "tiny", "training_file": "x", "seed": seed,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}
    }))
    .unwrap();
    TrainJob {
        model_dir: model.to_path_buf(),
        base_model_name: "tiny".into(),
        training_file: data,
        validation_file: None,
        tool_eval_file: None,
        init_adapter: None,
        config: spec.resolve().unwrap(),
        output_dir: dir.join(out),
        resume_from: None,
        device: candle_core::Device::Cpu,
    }
}

/// Runs `job` under `control` to its outcome with every step's metrics, asking it to suspend
/// once step `suspend_after` (if any) is reported.
pub fn run_steps(
    job: &TrainJob,
    control: &Control,
    suspend_after: Option<u64>,
) -> anyhow::Result<(Outcome, Vec<StepMetrics>)> {
    let mut steps = Vec::new();
    let outcome = trainer::run(job, control, &mut |ev| {
        if let TrainEvent::Metrics(m) = ev {
            if Some(m.step) == suspend_after {
                control.suspend();
            }
            steps.push(m);
        }
    })?;
    Ok((outcome, steps))
}
