//! The slice pass (`decode`) against the op-by-op pass (`cached`): logits at every step of a
//! prefill followed by decode steps, for the base alone, the attached LoRA and an adapter kept
//! beside the base, with grouped-query attention; and the in-place cache's growth.

use super::{lora_key, AdapterWeights, KvCache, Qwen3, Qwen3Config, Tuning, MODULES};
use crate::train::checkpoint::Adapter;
use crate::train::nn::testing::max_diff;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

const HIDDEN: usize = 256;
const INTER: usize = 384;
const HEADS: (usize, usize, usize) = (8, 2, 32);
const VOCAB: usize = 96;
const LAYERS: usize = 2;

/// A random two-layer f32 model, large enough that its products and attention are split over
/// the thread pool (hidden 256, 8 query heads over 2 key/value heads of 32), an untied LM head.
fn model() -> Qwen3 {
    let dev = Device::Cpu;
    let (hq, hkv, d) = HEADS;
    let cfg = Qwen3Config {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTER,
        num_hidden_layers: LAYERS,
        num_attention_heads: hq,
        num_key_value_heads: hkv,
        head_dim: Some(d),
        max_position_embeddings: 256,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        attention_bias: false,
        hidden_act: "silu".into(),
        model_type: Some("qwen3".into()),
    };
    let rnd = |shape: &[usize], mean: f64, std: f64| {
        Tensor::randn(mean, std, shape, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        rnd(&[VOCAB, HIDDEN], 0., 1.),
    );
    t.insert("lm_head.weight".into(), rnd(&[VOCAB, HIDDEN], 0., 0.1));
    t.insert("model.norm.weight".into(), rnd(&[HIDDEN], 1., 0.1));
    for i in 0..LAYERS {
        let l = format!("model.layers.{i}");
        for (name, n) in [
            ("input_layernorm", HIDDEN),
            ("post_attention_layernorm", HIDDEN),
            ("self_attn.q_norm", d),
            ("self_attn.k_norm", d),
        ] {
            t.insert(format!("{l}.{name}.weight"), rnd(&[n], 1., 0.2));
        }
        for (name, shape) in shapes() {
            let std = 1.0 / (shape[1] as f64).sqrt();
            t.insert(format!("{l}.{name}.weight"), rnd(&shape, 0., std));
        }
    }
    let vb = candle_nn::VarBuilder::from_tensors(t, DType::F32, &dev);
    Qwen3::from_vb(cfg, vb, DType::F32, &dev).unwrap()
}

/// Every projection's name and (O, I).
fn shapes() -> [(&'static str, [usize; 2]); 7] {
    let (hq, hkv, d) = HEADS;
    [
        ("self_attn.q_proj", [hq * d, HIDDEN]),
        ("self_attn.k_proj", [hkv * d, HIDDEN]),
        ("self_attn.v_proj", [hkv * d, HIDDEN]),
        ("self_attn.o_proj", [HIDDEN, hq * d]),
        ("mlp.gate_proj", [INTER, HIDDEN]),
        ("mlp.up_proj", [INTER, HIDDEN]),
        ("mlp.down_proj", [HIDDEN, INTER]),
    ]
}

/// Random LoRA pairs (B non-zero) on every projection but `up_proj`, so both kinds run.
fn lora_tensors(r: usize) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    for i in 0..LAYERS {
        for (m, (_, [o, inp])) in MODULES.iter().zip(shapes()) {
            if *m == "up_proj" {
                continue;
            }
            let a = Tensor::randn(0f32, 0.2, (r, inp), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, (o, r), &dev).unwrap();
            t.insert(lora_key(i, m, "A"), a);
            t.insert(lora_key(i, m, "B"), b);
        }
    }
    t
}

fn targets() -> Vec<String> {
    MODULES
        .iter()
        .filter(|&&m| m != "up_proj")
        .map(|m| m.to_string())
        .collect()
}

/// A prompt longer than one block of query rows, then single tokens.
fn tokens() -> Vec<u32> {
    (0..75u32).map(|i| (i * 37 + 11) % VOCAB as u32).collect()
}

/// The logits of a prefill of `prompt[..split]`, of the rest of the prompt as a second chunk,
/// then of `steps` single tokens, each through `run`.
fn trace(
    prompt: &[u32],
    split: usize,
    steps: usize,
    cache: &mut KvCache,
    mut run: impl FnMut(&[u32], &mut KvCache) -> Tensor,
) -> Vec<Tensor> {
    let mut out = vec![run(&prompt[..split], cache), run(&prompt[split..], cache)];
    for s in 0..steps {
        out.push(run(&[(s as u32 * 5 + 3) % VOCAB as u32], cache));
    }
    out
}

fn assert_traces_close(a: &[Tensor], b: &[Tensor], what: &str) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        let scale = y.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let diff = max_diff(x, y);
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{what}, step {step}: max |Δlogit| {diff} (logits up to {scale})"
        );
    }
}

/// The slice pass equals the op-by-op pass under all three tunings: prefill in two chunks (the
/// second one attends to the first through the cache), then decode steps.
#[test]
fn slice_pass_equals_op_by_op_pass_for_every_tuning() {
    let mut m = model();
    let raw = Adapter {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        target_modules: targets(),
        tensors: lora_tensors(4),
    };
    let adapter = AdapterWeights::new(&m, &raw).unwrap();
    let attached = lora_tensors(8);
    m.attach_lora(&targets(), 8, 0.5, 0.1, |key, _| Ok(attached[key].clone()))
        .unwrap();
    let prompt = tokens();
    let mut traces = Vec::new();
    for (name, tuning) in [
        ("base", Tuning::Base),
        ("attached", Tuning::Attached),
        ("adapter", Tuning::Adapter(&adapter)),
    ] {
        let fast = trace(&prompt, 30, 6, &mut KvCache::new(), |ids, c| {
            m.forward_cached(ids, c, tuning).unwrap()
        });
        let ops = trace(&prompt, 30, 6, &mut KvCache::new(), |ids, c| {
            m.forward_ops(ids, c, tuning).unwrap()
        });
        assert_traces_close(&fast, &ops, name);
        traces.push(fast);
    }
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        assert!(
            max_diff(&traces[a][7], &traces[b][7]) > 1e-2,
            "the tunings must differ ({a} vs {b})"
        );
    }
}

/// The in-place cache grows past its reserved room by reallocating, unreserved or reserved,
/// and holds each layer's keys and values row by row; a prompt fed whole or token by token
/// gives the same last logits.
#[test]
fn the_cache_grows_in_place_and_chunking_does_not_matter() {
    let m = model();
    let prompt = tokens();
    let (_, hkv, d) = HEADS;
    let mut reference = None;
    for mut cache in [
        KvCache::new(),
        KvCache::with_capacity(4),
        KvCache::with_capacity(200),
    ] {
        let run = trace(&prompt, 10, 20, &mut cache, |ids, c| {
            m.forward_cached(ids, c, Tuning::Base).unwrap()
        });
        assert_eq!(cache.len(), prompt.len() + 20);
        assert_eq!(cache.rows.len(), LAYERS);
        for (k, v) in &cache.rows {
            assert_eq!(k.len(), cache.len() * hkv * d);
            assert_eq!(v.len(), k.len());
        }
        match &reference {
            None => reference = Some(run),
            Some(r) => assert_traces_close(&run, r, "reserved vs unreserved"),
        }
    }
    let whole = m
        .forward_cached(&prompt, &mut KvCache::new(), Tuning::Base)
        .unwrap();
    let mut cache = KvCache::new();
    let mut last = None;
    for t in &prompt {
        last = Some(m.forward_cached(&[*t], &mut cache, Tuning::Base).unwrap());
    }
    assert_traces_close(&[last.unwrap()], &[whole], "token by token vs whole");
}

/// A cache filled op by op (another model's) is refused by the slice pass, not misread.
#[test]
fn a_cache_from_the_op_by_op_pass_is_refused() {
    let m = model();
    let mut cache = KvCache::new();
    m.forward_ops(&[1, 2, 3], &mut cache, Tuning::Base).unwrap();
    assert!(m.forward_cached(&[4], &mut cache, Tuning::Base).is_err());
}
