//! Greedy generation matches transformers + PEFT `generate` token for token (fixture written by
//! `tools/parity/generate_parity.py`: a tiny Qwen3 with scaled weights so the logits are well
//! apart, and a LoRA adapter with non-zero B), and the KV-cache path agrees with a full forward.

mod common;

use candle_core::{DType, Device, Tensor};
use common::generate_fixture::{self, fixtures, greedy};
use sftd::train::checkpoint::load_adapter;
use sftd::train::generate::BaseModel;
use sftd::train::model::qwen3::{AdapterWeights, KvCache, Tuning};
use sftd::train::model::Qwen3;

fn load() -> (tempfile::TempDir, BaseModel, AdapterWeights) {
    generate_fixture::load_on(&Device::Cpu)
}

#[test]
fn greedy_output_is_token_identical_to_transformers_peft() {
    generate_fixture::assert_greedy_matches_transformers_peft(&Device::Cpu);
}

/// The same with sftd's CPU kernels off: the uncached prefill and cached decode a GPU runs.
#[test]
fn greedy_output_on_the_gpu_graph_is_token_identical_too() {
    sftd::train::nn::cpu_kernels::off_in(|| {
        generate_fixture::assert_greedy_matches_transformers_peft(&Device::Cpu);
    });
}

#[test]
fn the_adapter_changes_the_output() {
    let (_dir, base, adapter) = load();
    let ids = base
        .format
        .encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let plain = greedy(&base, None, &ids, 8).unwrap();
    let tuned = greedy(&base, Some(&adapter), &ids, 8).unwrap();
    assert_ne!(plain.completion_ids, tuned.completion_ids);
}

/// Logits from the cache, fed one token or several at a time, equal a full forward's.
#[test]
fn cached_steps_match_a_full_forward() {
    assert_cached_steps_match_a_full_forward();
}

#[test]
fn cached_steps_on_the_gpu_graph_match_a_full_forward() {
    sftd::train::nn::cpu_kernels::off_in(assert_cached_steps_match_a_full_forward);
}

fn assert_cached_steps_match_a_full_forward() {
    let (_dir, base, adapter) = load();
    let ids: Vec<u32> = base
        .format
        .encode("<|im_start|>user\nWhat is the weather?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let m = &base.model;
    // Full forward without an adapter: logits at every position.
    let full = m.logits(&m.pack(&[ids.as_slice()]).unwrap()).unwrap();
    let mut cache = KvCache::new();
    let split = ids.len() / 2;
    let first = m.forward_cached(&ids[..split], &mut cache, None).unwrap();
    assert_close(&first, &full.get(split - 1).unwrap());
    let rest = m
        .forward_cached(&ids[split..ids.len() - 1], &mut cache, None)
        .unwrap();
    assert_close(&rest, &full.get(ids.len() - 2).unwrap());
    let last = m
        .forward_cached(&ids[ids.len() - 1..], &mut cache, None)
        .unwrap();
    assert_close(&last, &full.get(ids.len() - 1).unwrap());
    assert_eq!(cache.len(), ids.len());
    // With the adapter, one step at a time against a single prefill.
    let mut a = KvCache::new();
    let whole = m.forward_cached(&ids, &mut a, Some(&adapter)).unwrap();
    let mut b = KvCache::new();
    let mut step = None;
    for t in &ids {
        step = Some(m.forward_cached(&[*t], &mut b, Some(&adapter)).unwrap());
    }
    assert_close(&whole, &step.unwrap());
    let plain = m.forward_cached(&ids, &mut KvCache::new(), None).unwrap();
    assert!(
        max_diff(&plain, &whole) > 1e-2,
        "the adapter must move the logits"
    );
}

/// A model being trained serves requests between its micro-batches: with its own LoRA attached
/// (as the trainer holds it) the cached pass equals the same adapter kept beside the base, and
/// `Tuning::Base` / `Tuning::Adapter` ignore the attached LoRA entirely.
#[test]
fn a_training_model_serves_its_base_and_any_adapter() {
    let (dir, base, adapter) = load();
    let raw = load_adapter(&fixtures().join("generate/adapter"), &Device::Cpu).unwrap();
    let mut trained = Qwen3::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let scaling = raw.alpha / raw.r as f64;
    assert!(!raw.use_rslora);
    trained
        .attach_lora(&raw.target_modules, raw.r, scaling, 0.1, |key, _| {
            Ok(raw.tensors[key].clone())
        })
        .unwrap();
    let ids: Vec<u32> = base
        .format
        .encode("<|im_start|>user\nWhat is the weather?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let run = |m: &Qwen3, t: Tuning<'_>| m.forward_cached(&ids, &mut KvCache::new(), t).unwrap();
    let served = run(&base.model, Tuning::Adapter(&adapter));
    assert_close(&run(&trained, Tuning::Attached), &served);
    assert_close(&run(&trained, Tuning::Adapter(&adapter)), &served);
    let plain = run(&base.model, Tuning::Base);
    assert_close(&run(&trained, Tuning::Base), &plain);
    assert!(
        max_diff(&plain, &served) > 1e-2,
        "the LoRA must move the logits"
    );
}

#[test]
fn a_prompt_beyond_the_context_is_refused() {
    let (_dir, base, _) = load();
    let n = base.format.context_len;
    let ids = vec![5u32; n];
    let err = greedy(&base, None, &ids, 1).unwrap_err();
    assert!(err
        .downcast_ref::<sftd::train::generate::ContextExceeded>()
        .is_some());
    let err = greedy(&base, None, &ids[..n - 4], 8).unwrap_err();
    assert!(err.to_string().contains("exceed"), "{err}");
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn assert_close(a: &Tensor, b: &Tensor) {
    let worst = max_diff(a, b);
    assert!(worst < 1e-4, "max |Δlogit| = {worst}");
}
