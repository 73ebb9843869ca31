//! The tool-call evaluation of a real job over a real socket: its events (step 0 and every
//! evaluation), the ETA that counts the evaluations still to come, the checkpoints' metrics,
//! metrics.csv, a `tool_eval_file` without a validation file, and the 400s for bad knobs; and,
//! on the engine, that evaluating leaves training untouched.

mod common;

use common::{example, tiny_job, Env, Server};
use serde_json::{json, Value};
use sftd::train::events::{Control, TrainEvent};
use sftd::train::spec::JobSpec;
use sftd::train::trainer::{self, TrainJob};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(600);

/// Call turns among the first `n` assistant turns of a conversational JSONL file.
fn call_turns(path: &std::path::Path, n: usize) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    let mut turns = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line).unwrap();
        for m in row["messages"].as_array().unwrap().iter().skip(1) {
            if m["role"] == "assistant" {
                turns.push(m["tool_calls"].as_array().is_some_and(|c| !c.is_empty()));
            }
        }
    }
    turns.iter().take(n).filter(|&&c| c).count() as u64
}

fn hp(body: &mut Value) -> &mut Value {
    &mut body["method"]["supervised"]["hyperparameters"]
}

async fn finished(s: &Server, body: &Value) -> (String, Vec<Value>) {
    let id = s.start_job(body).await;
    let done = s.wait_finished(&id, LONG).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events = s.all_events(&id).await;
    (id, events)
}

fn tool_evals(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["tool_eval_examples"].is_number())
        .map(|e| &e["data"])
        .collect()
}

fn rate(v: &Value) -> Option<f64> {
    let r = v.as_f64()?;
    assert!((0.0..=1.0).contains(&r), "{v}");
    Some(r)
}

#[tokio::test]
async fn a_job_with_a_validation_file_reports_tool_call_accuracy() {
    let env = Env::new();
    let s = env.start();
    let val_path = example("tool_calls_val.jsonl");
    let train = s.upload(&example("tool_calls.jsonl")).await;
    let val = s.upload(&val_path).await;
    let mut body = tiny_job(&train, 4, 2);
    body["validation_file"] = json!(val);
    hp(&mut body)["eval_steps"] = json!(2);
    hp(&mut body)["tool_eval_max_examples"] = json!(6);
    hp(&mut body)["tool_eval_max_new_tokens"] = json!(12);
    let (id, events) = finished(&s, &body).await;

    // Step 0 (the starting model), then at each evaluation, after valid_loss.
    let tools = tool_evals(&events);
    let steps: Vec<u64> = tools.iter().map(|t| t["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 2, 4], "{tools:?}");
    let calls = call_turns(&val_path, 6);
    assert!(
        calls > 0 && calls < 6,
        "the first 6 turns mix calls and answers"
    );
    for t in &tools {
        assert_eq!(t["tool_eval_examples"], 6, "{t}");
        assert_eq!(t["tool_call_examples"], calls, "{t}");
        let json_valid = rate(&t["tool_json_valid"]).unwrap();
        let name = rate(&t["tool_name_accuracy"]).unwrap();
        let args = rate(&t["tool_args_exact"]).unwrap();
        assert!(args <= name && name <= json_valid, "{t}");
        let valid = rate(&t["tool_args_valid"]).unwrap();
        assert!(valid <= json_valid, "{t}");
        rate(&t["no_call_accuracy"]).unwrap();
        // Every rate is a count of call turns over their number.
        let count = name * calls as f64;
        assert!((count - count.round()).abs() < 1e-9, "{t}");
        assert!(t["tool_eval_seconds"].as_f64().unwrap() > 0.0);
    }
    let seq_of = |pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .find(|e| pred(&e["data"]))
            .map(|e| e["seq"].as_i64().unwrap())
            .unwrap()
    };
    assert!(
        seq_of(&|d| d["valid_loss"].is_number() && d["step"] == 2)
            < seq_of(&|d| d["tool_eval_examples"].is_number() && d["step"] == 2)
    );
    let summary = events
        .iter()
        .find(|e| e["data"]["tool_eval_examples"].is_number())
        .unwrap();
    assert!(
        summary["message"]
            .as_str()
            .unwrap()
            .contains("Step 0: tool calls over 6 held-out turns"),
        "{summary}"
    );

    // The ETA counts the evaluations still to come at what the last one took: the baseline
    // before step 1 (two to come: steps 2 and 4), and after the last step the final evaluation
    // is all that is left, so its ETA is at least the previous evaluation's time.
    let mut last_tool_seconds = 0.0;
    for e in &events {
        let d = &e["data"];
        if let Some(sec) = d["tool_eval_seconds"].as_f64() {
            last_tool_seconds = sec;
        }
        if d["train_loss"].is_number() {
            let step = d["step"].as_u64().unwrap();
            let evals_left = [2u64, 4].iter().filter(|&&s| s >= step).count() as f64;
            let eta = d["eta_seconds"].as_f64().unwrap();
            assert!(
                eta >= evals_left * last_tool_seconds,
                "step {step}: eta {eta} < {evals_left} × {last_tool_seconds}"
            );
            if step == 4 {
                assert!(eta > 0.0, "the final evaluation is still to come: {d}");
            }
        }
    }

    // Checkpoints carry the rates of the last evaluation at or before their step.
    let (_, page) = s
        .get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"))
        .await;
    let ckpts = page["data"].as_array().unwrap();
    assert!(!ckpts.is_empty(), "{page}");
    for c in ckpts {
        let m = &c["metrics"];
        let step = m["step"].as_u64().unwrap();
        let at = tools
            .iter()
            .rfind(|t| t["step"].as_u64().unwrap() <= step)
            .unwrap();
        for key in [
            "tool_name_accuracy",
            "tool_args_exact",
            "tool_json_valid",
            "no_call_accuracy",
            "tool_args_valid",
        ] {
            assert_eq!(m[key], at[key], "{key} of checkpoint {c}");
        }
    }

    // metrics.csv: the five columns, filled on the evaluated steps (step 0 its own row).
    let job = s.job(&id).await;
    let csv = s
        .result_file(&job, "metrics.csv")
        .await
        .expect("metrics.csv is a result file");
    let csv = String::from_utf8(csv).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5, "steps 0-4: {csv}");
    for row in &rows {
        let step: u64 = row[0].parse().unwrap();
        let filled = !row[col("tool_name_accuracy")].is_empty();
        assert_eq!(filled, step.is_multiple_of(2), "step {step}: {csv}");
        if filled {
            let t = tools.iter().find(|t| t["step"] == step).unwrap();
            for key in ["tool_json_valid", "tool_args_valid"] {
                let v: f64 = row[col(key)].parse().unwrap();
                assert_eq!(Some(v), t[key].as_f64(), "{key}");
            }
        }
    }
}

#[tokio::test]
async fn a_tool_eval_file_is_evaluated_without_a_validation_file_and_bad_knobs_are_400() {
    let env = Env::new();
    let s = env.start();
    let train = s.upload(&example("tool_calls.jsonl")).await;
    let tool = s.upload(&example("tool_calls_val.jsonl")).await;
    let plain = s.upload(&example("prompt_completion.jsonl")).await;

    for (field, value, param) in [
        (
            "tool_eval_max_new_tokens",
            json!(0),
            "method.supervised.hyperparameters.tool_eval_max_new_tokens",
        ),
        (
            "tool_eval_max_examples",
            json!(-1),
            "method.supervised.hyperparameters.tool_eval_max_examples",
        ),
        (
            "tool_eval_max_examples",
            json!(100_000),
            "method.supervised.hyperparameters.tool_eval_max_examples",
        ),
    ] {
        let mut body = tiny_job(&train, 2, 0);
        hp(&mut body)[field] = value.clone();
        let (st, v) = s.post_json("/v1/fine_tuning/jobs", &body).await;
        assert_eq!(st, 400, "{field}={value}: {v}");
        if value.as_i64() != Some(-1) {
            // (-1 is not a u32: the JSON body itself is rejected.)
            assert_eq!(v["error"]["param"], param, "{v}");
        }
    }
    let mut body = tiny_job(&train, 2, 0);
    body["tool_eval_file"] = json!("file-doesnotexist");
    let (st, v) = s.post_json("/v1/fine_tuning/jobs", &body).await;
    assert_eq!(
        (st, v["error"]["param"].clone()),
        (400, json!("tool_eval_file")),
        "{v}"
    );

    // A plain validation file is not tool-evaluated; an explicit tool_eval_file is.
    let mut body = tiny_job(&train, 2, 0);
    body["validation_file"] = json!(plain);
    let (_, events) = finished(&s, &body).await;
    assert!(tool_evals(&events).is_empty());
    assert!(events.iter().any(|e| e["message"]
        .as_str()
        .unwrap()
        .contains("tool-call evaluation off")));

    let mut body = tiny_job(&train, 2, 0);
    body["tool_eval_file"] = json!(tool);
    hp(&mut body)["tool_eval_max_examples"] = json!(3);
    hp(&mut body)["tool_eval_max_new_tokens"] = json!(8);
    let (id, events) = finished(&s, &body).await;
    let steps: Vec<u64> = tool_evals(&events)
        .iter()
        .map(|t| t["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 2]);
    assert!(!events.iter().any(|e| e["data"]["valid_loss"].is_number()));
    assert_eq!(s.job(&id).await["tool_eval_file"], json!(tool));
    // The file is in use by no running job any more: it can be deleted.
    let r = s
        .client
        .delete(s.url(&format!("/v1/files/{tool}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Generating with the model between steps must not change what it learns: the same job with and
/// without the evaluation has bit-identical losses and adapter.
#[test]
fn evaluating_tool_calls_leaves_training_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    sftd::train::demo::write_model(&model, sftd::train::demo::DemoSize::TINY, 7).unwrap();
    let run = |out: &str, max_examples: u32| {
        let spec: JobSpec = serde_json::from_value(json!({
            "model": "tiny", "training_file": "x", "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 4,
                "eval_steps": 2, "max_seq_len": 96, "lora": {"r": 4, "dropout": 0.1},
                "tool_eval_max_examples": max_examples, "tool_eval_max_new_tokens": 6
            }}}
        }))
        .unwrap();
        let job = TrainJob {
            model_dir: model.clone(),
            base_model_name: "tiny".into(),
            training_file: example("tool_calls.jsonl"),
            validation_file: Some(example("tool_calls_val.jsonl")),
            tool_eval_file: None,
            init_adapter: None,
            config: spec.resolve().unwrap(),
            output_dir: dir.path().join(out),
            resume_from: None,
            device: candle_core::Device::Cpu,
        };
        let (mut losses, mut tool_evals) = (Vec::new(), 0);
        trainer::run(&job, &Control::new(), &mut |ev| match ev {
            TrainEvent::Metrics(m) => losses.push(m.train_loss),
            TrainEvent::ToolEval(_) => tool_evals += 1,
            _ => {}
        })
        .unwrap();
        let adapter =
            std::fs::read(job.output_dir.join("adapter/adapter_model.safetensors")).unwrap();
        (losses, tool_evals, adapter)
    };
    let (with_losses, with_evals, with_adapter) = run("with", 3);
    let (without_losses, without_evals, without_adapter) = run("without", 0);
    assert_eq!((with_evals, without_evals), (3, 0), "steps 0, 2 and 4");
    assert_eq!(with_losses, without_losses);
    assert!(with_adapter == without_adapter, "the adapters differ");
}
