//! The generation fixture written by `tools/parity/generate_parity.py` (a tiny Qwen3 with scaled
//! weights so the logits are well apart, a LoRA adapter with non-zero B, and transformers +
//! PEFT's greedy outputs), loaded on any device, and the token-for-token check against it.

use candle_core::Device;
use serde_json::Value;
use sftd::train::checkpoint::load_adapter;
use sftd::train::generate::{generate, BaseModel, FinishReason, Generation, SamplingParams};
use sftd::train::model::qwen3::AdapterWeights;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture model directory with the fixture tokenizer beside its weights.
pub fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("generate/model").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// The fixture model for serving on `dev`, and its adapter kept beside it.
pub fn load_on(dev: &Device) -> (tempfile::TempDir, BaseModel, AdapterWeights) {
    let dir = model_dir();
    let base = BaseModel::load(dir.path(), dev).unwrap();
    let raw = load_adapter(&fixtures().join("generate/adapter"), dev).unwrap();
    let adapter = AdapterWeights::new(&base.model, &raw).unwrap();
    (dir, base, adapter)
}

/// Every case's prompt renders to transformers' ids, and greedy generation on `dev`, without
/// and with the adapter, writes transformers + PEFT's tokens and stops where they stopped.
/// Returns how many tokens were generated.
pub fn assert_greedy_matches_transformers_peft(dev: &Device) -> usize {
    let (_dir, base, adapter) = load_on(dev);
    let mut generated = 0;
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("generate/expected.json")).unwrap(),
    )
    .unwrap();
    let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
    let stop: Vec<u32> = serde_json::from_value(expected["stop_ids"].clone()).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(|t| t.as_slice());
        let text = base
            .format
            .template
            .render_prompt(messages, tools, true, case["enable_thinking"].as_bool())
            .unwrap();
        let ids = base.format.encode(&text).unwrap();
        let want_prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want_prompt, "prompt of {messages:?}");
        for (key, lora) in [("base", None), ("adapter", Some(&adapter))] {
            let mut want: Vec<u32> = serde_json::from_value(case[key]["ids"].clone()).unwrap();
            let ended = want.last().is_some_and(|t| stop.contains(t));
            if ended {
                want.pop();
            }
            let g = greedy(&base, lora, &ids, max_new).unwrap();
            assert_eq!(g.completion_ids, want, "{key} generation of {messages:?}");
            let finish = if ended {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(g.finish, finish, "{key}");
            generated += g.completion_ids.len();
        }
    }
    generated
}

/// Greedy generation of up to `max_new` tokens on `base`, with `adapter` beside it.
pub fn greedy(
    base: &BaseModel,
    adapter: Option<&AdapterWeights>,
    ids: &[u32],
    max_new: usize,
) -> anyhow::Result<Generation> {
    let params = SamplingParams::greedy(max_new);
    generate(
        &base.model,
        adapter.into(),
        &base.format,
        ids,
        &params,
        |_| true,
    )
}
