//! The training engine on tiny generated Qwen3 models: gradients against finite differences,
//! gradient flow to every LoRA tensor, checkpointing equivalence, PEFT file format, exact resume,
//! weight loading variants, and clear errors for bad data.

mod common;

use candle_core::{DType, Device, Tensor};
use common::grads::{
    assert_lora_gradients_match_finite_differences, f64_model_and_rows, loss_and_grads, random_lora,
};
use common::train::{encoded_examples, run_steps, tiny_model, train_job};
use sftd::train::checkpoint;
use sftd::train::data::encode::Example;
use sftd::train::demo::{write_model, DemoSize};
use sftd::train::events::{Control, Outcome, StepMetrics, TrainEvent};
use sftd::train::model::Qwen3;
use sftd::train::spec::TrainConfig;
use sftd::train::trainer::{self, build_model};
use std::collections::HashMap;

#[test]
fn lora_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, exs) = f64_model_and_rows(tmp.path());
    assert_eq!(
        assert_lora_gradients_match_finite_differences(&model, &exs),
        56
    );
}

#[test]
fn every_lora_tensor_gets_a_gradient_and_checkpointing_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), 7);
    let mut model = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
    random_lora(&mut model, 2, 0.0);
    let exs = encoded_examples(&dir, 3, 64);
    let refs: Vec<&Example> = exs.iter().collect();
    let (l1, g1) = loss_and_grads(&model, &refs, None, true);
    let (l2, g2) = loss_and_grads(&model, &refs, None, false);
    assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");
    assert_eq!(g1.len(), 2 * 7 * 2);
    for (k, g) in &g1 {
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{k} got a zero gradient");
        let diff: f32 = (g - &g2[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff < 1e-5,
            "{k}: checkpointed and full-graph gradients differ by {diff}"
        );
    }
}

#[test]
fn packed_batch_gradient_equals_sum_of_single_sequences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), 7);
    let mut model = Qwen3::load(&dir, DType::F64, &Device::Cpu).unwrap();
    random_lora(&mut model, 3, 0.0);
    let exs = encoded_examples(&dir, 2, 40);
    let (_, both) = loss_and_grads(&model, &[&exs[0], &exs[1]], None, true);
    let n = [exs[0].n_targets() as f64, exs[1].n_targets() as f64];
    let (_, a) = loss_and_grads(&model, &[&exs[0]], None, true);
    let (_, b) = loss_and_grads(&model, &[&exs[1]], None, true);
    for (k, g) in &both {
        // Each single run is normalised by its own count; the batch by the sum.
        let want = ((&a[k] * (n[0] / (n[0] + n[1]))).unwrap()
            + (&b[k] * (n[1] / (n[0] + n[1]))).unwrap())
        .unwrap();
        let diff: f64 = (g - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-10, "{k}: {diff}");
    }
}

#[test]
fn suspended_and_resumed_run_reproduces_the_uninterrupted_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 7);
    let hp = serde_json::json!({
        "n_epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 2, "max_seq_len": 96, "loss_on": "all",
        "learning_rate": 0.01, "save_steps": 4, "lora": {"r": 4, "dropout": 0.1}
    });
    let full = train_job(tmp.path(), &model, "full", 24, 3, hp.clone());
    let (outcome, reference) = run_steps(&full, &Control::new(), None).unwrap();
    assert_eq!(reference.len(), 12, "24 rows / (2 × 2) × 2 epochs");
    assert!(matches!(outcome, Outcome::Completed { steps: 12, .. }));
    // Warmup: step 1 runs at lr 0, as in transformers.
    assert_eq!(reference[0].learning_rate, 0.0);

    let mut split = train_job(tmp.path(), &model, "split", 24, 3, hp);
    let control = Control::new();
    let (outcome, first) = run_steps(&split, &control, Some(5)).unwrap();
    let Outcome::Suspended { checkpoint, step } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(step, 5);
    assert_eq!(
        checkpoint,
        trainer::latest_checkpoint(&split.output_dir).unwrap()
    );
    split.resume_from = Some(checkpoint);
    let (outcome, rest) = run_steps(&split, &Control::new(), None).unwrap();
    assert!(matches!(outcome, Outcome::Completed { steps: 12, .. }));
    let resumed: Vec<&StepMetrics> = first.iter().chain(rest.iter()).collect();
    assert_eq!(
        resumed.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    for (a, b) in reference.iter().zip(resumed) {
        assert!(
            (a.train_loss - b.train_loss).abs() < 1e-6,
            "step {}: {} vs {}",
            a.step,
            a.train_loss,
            b.train_loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm.max(1.0),
            "step {}",
            a.step
        );
        assert_eq!(a.learning_rate, b.learning_rate);
        assert_eq!(a.num_tokens, b.num_tokens);
    }
    // metrics.jsonl holds each step exactly once.
    let text = std::fs::read_to_string(split.output_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    // Training moved the loss down on this tiny set.
    assert!(reference[11].train_loss < reference[0].train_loss);
}

#[test]
fn adapter_files_are_in_peft_format_and_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 7);
    let hp = serde_json::json!({"max_steps": 1, "batch_size": 2, "gradient_accumulation_steps": 1, "max_seq_len": 64, "loss_on": "all",
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}});
    let j = train_job(tmp.path(), &model, "out", 24, 3, hp);
    let (outcome, _) = run_steps(&j, &Control::new(), None).unwrap();
    let Outcome::Completed { adapter_dir, .. } = outcome else {
        panic!()
    };
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(cfg["base_model_name_or_path"], "tiny");
    let t =
        candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(t.len(), 2 * 2 * 3);
    let shape = |k: &str| t[k].dims().to_vec();
    assert_eq!(
        shape("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        [4, 32]
    );
    assert_eq!(
        shape("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
        [32, 4]
    );
    assert_eq!(
        shape("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
        [16, 4]
    );
    assert_eq!(
        shape("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"),
        [4, 64]
    );
    assert!(t.values().all(|x| x.dtype() == DType::F32));
    // init_adapter loads it back bit for bit.
    let lora = TrainConfig::default().lora;
    let (m, eff) = build_model(&model, &Device::Cpu, &lora, Some(&adapter_dir), 0).unwrap();
    assert_eq!((eff.r, eff.alpha), (4, 8.0));
    for (k, v) in m.lora_vars() {
        let d: f32 = (v.as_tensor() - &t[&k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    let loaded = checkpoint::load_adapter(&adapter_dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.target_modules, ["q_proj", "v_proj", "down_proj"]);
}

#[test]
fn bf16_and_sharded_checkpoints_load_like_the_f32_original() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), 7);
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    // bf16 copy, split over two shards with an index, as large HF checkpoints ship.
    let shard = tmp.path().join("sharded");
    std::fs::create_dir_all(&shard).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), shard.join(f)).unwrap();
    }
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let tensors: HashMap<String, Tensor> = part
            .iter()
            .map(|k| (k.to_string(), weights[*k].to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, shard.join(file)).unwrap();
        for k in part {
            map.insert(k.to_string(), file.into());
        }
    }
    std::fs::write(
        shard.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let f32_model = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let bf16_model = Qwen3::load(&shard, DType::F32, &Device::Cpu).unwrap();
    let diff: f32 = (&f32_model.lm_head - &bf16_model.lm_head)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff > 0.0 && diff < 1e-3, "bf16 rounding only: {diff}");
    assert_eq!(bf16_model.lm_head.dtype(), DType::F32);
}

#[test]
fn bad_training_rows_fail_with_their_line_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 7);
    let mut j = train_job(
        tmp.path(),
        &model,
        "out",
        24,
        3,
        serde_json::json!({"max_steps": 1}),
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n{oops\n{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}\n",
    )
    .unwrap();
    j.training_file = bad;
    let err = trainer::run(&j, &Control::new(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 invalid line(s)"), "{err}");
    assert!(
        err.contains("line 2") && err.contains("line 3") && err.contains("unrecognized role"),
        "{err}"
    );
}

#[test]
fn cancel_stops_within_one_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 7);
    let j = train_job(
        tmp.path(),
        &model,
        "out",
        24,
        3,
        serde_json::json!({"batch_size": 1, "gradient_accumulation_steps": 4, "max_seq_len": 48, "loss_on": "all"}),
    );
    let control = Control::new();
    let mut seen = 0;
    let outcome = trainer::run(&j, &control, &mut |ev| {
        if let TrainEvent::Metrics(m) = ev {
            seen = m.step;
            control.cancel();
        }
    })
    .unwrap();
    assert_eq!(outcome, Outcome::Cancelled { step: 1 });
    assert_eq!(seen, 1);
    assert!(!j.output_dir.join("adapter").exists());
}

/// Logits of the whole sequence through the model's own forward pass.
fn forward_logits(model: &Qwen3, ids: &[u32]) -> Tensor {
    model.logits(&model.pack(&[ids]).unwrap()).unwrap()
}

#[test]
fn merged_export_gives_the_adapted_models_logits_untied_head_included() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("untied");
    write_model(
        &dir,
        DemoSize {
            tie_embeddings: false,
            ..DemoSize::TINY
        },
        9,
    )
    .unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(weights.contains_key("lm_head.weight"));
    // Train a few steps so B is non-zero, then merge.
    let j = train_job(
        tmp.path(),
        &dir,
        "out",
        24,
        3,
        serde_json::json!({"max_steps": 2, "batch_size": 2,
        "gradient_accumulation_steps": 1, "max_seq_len": 64, "loss_on": "all", "learning_rate": 0.05,
        "warmup_ratio": 0.0, "lora": {"r": 4, "use_rslora": true}}),
    );
    let (outcome, _) = run_steps(&j, &Control::new(), None).unwrap();
    let Outcome::Completed { adapter_dir, .. } = outcome else {
        panic!()
    };
    let merged = tmp.path().join("merged");
    sftd::cli::merge(sftd::cli::MergeArgs {
        model: dir.clone(),
        adapter: adapter_dir.clone(),
        out: merged.clone(),
    })
    .unwrap();

    let ids = &encoded_examples(&dir, 1, 40)[0].ids;
    let lora = TrainConfig::default().lora;
    let (adapted, eff) = build_model(&dir, &Device::Cpu, &lora, Some(&adapter_dir), 0).unwrap();
    assert!(eff.use_rslora);
    let base = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let plain = Qwen3::load(&merged, DType::F32, &Device::Cpu).unwrap();
    let (a, b, m) = (
        forward_logits(&adapted, ids),
        forward_logits(&base, ids),
        forward_logits(&plain, ids),
    );
    let max = |t: Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
    assert!(
        max((&a - &b).unwrap()) > 1e-4,
        "the adapter changes the logits"
    );
    assert!(
        max((&a - &m).unwrap()) < 1e-4,
        "merged weights reproduce the adapted model"
    );
}
