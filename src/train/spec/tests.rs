//! Range checks and defaults of the job specification.

use super::*;

fn spec(hp: serde_json::Value) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "model": "m", "training_file": "f",
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}
    }))
    .unwrap()
}

#[test]
fn omitted_knobs_take_the_recipe() {
    let c = spec(serde_json::json!({})).resolve().unwrap();
    assert_eq!(c, TrainConfig::default());
    assert_eq!(c.lora.scaling(), 2.0);
}

#[test]
fn auto_and_multiplier_resolve() {
    let c = spec(serde_json::json!({"n_epochs": "auto", "learning_rate_multiplier": 0.5}))
        .resolve()
        .unwrap();
    assert_eq!(c.n_epochs, 3);
    assert!((c.learning_rate - 1e-4).abs() < 1e-12);
}

#[test]
fn absurd_values_name_the_field() {
    for (hp, field) in [
        (serde_json::json!({"lora": {"r": 0}}), "lora.r"),
        (serde_json::json!({"learning_rate": -1.0}), "learning_rate"),
        (serde_json::json!({"batch_size": 0}), "batch_size"),
        (
            serde_json::json!({"max_seq_len": 1_000_000_000u64}),
            "max_seq_len",
        ),
        (
            serde_json::json!({"lora": {"dropout": 1.5}}),
            "lora.dropout",
        ),
        (serde_json::json!({"warmup_ratio": 2}), "warmup_ratio"),
        (
            serde_json::json!({"tool_eval_max_new_tokens": 0}),
            "tool_eval_max_new_tokens",
        ),
        (
            serde_json::json!({"tool_eval_max_examples": 20_000}),
            "tool_eval_max_examples",
        ),
        (
            serde_json::json!({"lora": {"target_modules": ["lm_head"]}}),
            "lora.target_modules",
        ),
    ] {
        let e = spec(hp).resolve().unwrap_err();
        assert_eq!(e.param, format!("{HP}.{field}"), "{e}");
    }
}

#[test]
fn precision_defaults_to_auto_and_rejects_unknown_names() {
    let c = spec(serde_json::json!({"precision": "f16"}))
        .resolve()
        .unwrap();
    assert_eq!(c.precision, Precision::F16);
    assert_eq!(
        spec(serde_json::json!({})).resolve().unwrap().precision,
        Precision::Auto
    );
    let bad: Result<JobSpec, _> = serde_json::from_value(serde_json::json!({
        "model": "m", "training_file": "f",
        "hyperparameters": {"precision": "fp8"}
    }));
    assert!(bad.is_err());
    // Configs stored before the knob existed read back as `auto`.
    let mut old = serde_json::to_value(TrainConfig::default()).unwrap();
    old.as_object_mut().unwrap().remove("precision");
    let back: TrainConfig = serde_json::from_value(old).unwrap();
    assert_eq!(back, TrainConfig::default());
}

#[test]
fn unknown_fields_are_rejected() {
    let r: Result<JobSpec, _> = serde_json::from_value(serde_json::json!({
        "model": "m", "training_file": "f", "n_epoch": 3
    }));
    assert!(r.unwrap_err().to_string().contains("n_epoch"));
}
