//! Peak-memory estimate of a training job, from the model's `config.json` and the recipe, as
//! sftd's engine actually allocates it (see docs/memory.md for the derivation and calibration).
//!
//! Shapes: L layers, N = batch · T tokens of a worst-case micro-batch (every sequence
//! `max_seq_len` long, every position labelled), H hidden, F intermediate, A = Hq·D query width,
//! K = Hkv·D key/value width, V vocab, r LoRA rank, C loss-chunk rows.

use crate::train::model::Qwen3Config;
use crate::train::spec::{TrainConfig, ALL_LINEAR};
use crate::train::trainer::loss_chunk_rows;
use candle_core::DType;
use serde::Serialize;
use std::path::Path;

/// Bytes of one activation element: the residual stream, norms, softmax and LoRA run in f32
/// whatever the base weights' dtype.
const ACT: u64 = 4;
/// Fraction of the device's memory a job may be estimated to use (the rest is the margin for
/// the estimator's error, allocator fragmentation and other tenants).
pub const USABLE_FRACTION: f64 = 0.90;

/// What the estimate needs to know about the model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelDims {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Bytes per element of the checkpoint files (`torch_dtype`; 2 for bf16, 4 for f32).
    pub file_dtype_bytes: usize,
}

impl ModelDims {
    pub fn from_config(cfg: &Qwen3Config, file_dtype_bytes: usize) -> Self {
        Self {
            layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            vocab: cfg.vocab_size,
            tied_embeddings: cfg.tie_word_embeddings,
            max_position_embeddings: cfg.max_position_embeddings,
            file_dtype_bytes,
        }
    }

    /// Reads `dir/config.json` (only that file: the weights need not be there yet).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let cfg = Qwen3Config::from_dir(dir)?;
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let dtype = v["torch_dtype"].as_str().or(v["dtype"].as_str());
        let bytes = match dtype {
            Some("float32") => 4,
            Some("float64") => 8,
            Some(_) => 2,
            None => 4,
        };
        Ok(Self::from_config(&cfg, bytes))
    }

    /// (in, out) features of each of the seven projections, in [`ALL_LINEAR`] order.
    fn projections(&self) -> [(usize, usize); 7] {
        let (h, f) = (self.hidden, self.intermediate);
        let (a, k) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [(h, a), (h, k), (h, k), (a, h), (h, f), (h, f), (f, h)]
    }
}

/// The knobs of a recipe that decide memory.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recipe {
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub lora_r: usize,
    /// Which of the seven projections carry LoRA, in [`ALL_LINEAR`] order.
    pub lora_targets: [bool; 7],
    pub lora_dropout: bool,
    pub gradient_checkpointing: bool,
}

impl Recipe {
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let mut lora_targets = [false; 7];
        for (i, m) in ALL_LINEAR.iter().enumerate() {
            lora_targets[i] = cfg.lora.target_modules.iter().any(|t| t == m);
        }
        Self {
            batch_size: cfg.batch_size as usize,
            max_seq_len: cfg.max_seq_len as usize,
            lora_r: cfg.lora.r as usize,
            lora_targets,
            lora_dropout: cfg.lora.dropout > 0.0,
            gradient_checkpointing: cfg.gradient_checkpointing,
        }
    }
}

/// Where the job runs, as far as memory goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// CUDA (composed ops, a CUDA context) rather than the CPU (fused kernels, a process).
    pub cuda: bool,
    /// The frozen base weights' dtype.
    pub weight_dtype: DType,
}

/// Bytes per component. Persistent parts are held for the whole run; the transient parts
/// (`saved_activations` onwards) are the largest moment of a micro-batch.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Breakdown {
    /// Frozen embedding, projections, norms and (untied) LM head, in the base-weight dtype.
    pub base_weights: u64,
    /// Rotary cos/sin tables for every position (f32).
    pub rotary_tables: u64,
    /// LoRA A and B (f32).
    pub lora_weights: u64,
    /// Accumulated LoRA gradients plus one micro-batch's copy (f32).
    pub lora_gradients: u64,
    /// AdamW's two moments (f32).
    pub optimizer_state: u64,
    /// With checkpointing, every layer's input; without, every layer's autograd graph.
    pub saved_activations: u64,
    /// One layer's recomputed graph and its backward's buffers (checkpointing), or the
    /// backward's buffers across all layers (no checkpointing), attention scores excluded.
    pub layer_activations: u64,
    /// Attention scores and probabilities, `Hq × T × T` per sequence, kept and differentiated.
    pub attention_scores: u64,
    /// One chunk of LM-head logits and its gradient, plus the selected hidden states.
    pub lm_head_chunk: u64,
    /// Reading the largest checkpoint tensor at load time (raw bytes and the converted copy).
    pub load_transient: u64,
    /// Process baseline on the CPU (binary, tokenizer, dataset); CUDA context on a GPU.
    pub runtime_overhead: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemoryEstimate {
    pub estimated_peak_memory_bytes: u64,
    /// `load`, `layer_backward` or `lm_head`: the moment the peak is reached.
    pub peak_phase: &'static str,
    pub breakdown: Breakdown,
}

/// Estimates the peak memory of training `model` with `recipe` on `target`.
pub fn estimate(model: &ModelDims, recipe: &Recipe, target: Target) -> MemoryEstimate {
    let m = model;
    let w = target.weight_dtype.size_in_bytes() as u64;
    let (l, h, f) = (m.layers as u64, m.hidden as u64, m.intermediate as u64);
    let d = m.head_dim as u64;
    let (a, k) = (m.heads as u64 * d, m.kv_heads as u64 * d);
    let (b, t) = (recipe.batch_size as u64, recipe.max_seq_len as u64);
    let n = b * t;
    let r = recipe.lora_r as u64;
    let v = m.vocab as u64;

    // Persistent state.
    let per_layer_weights = 2 * a * h + 2 * k * h + 3 * h * f + 2 * h + 2 * d;
    let head_rows = if m.tied_embeddings { 1 } else { 2 };
    let base_weights = (l * per_layer_weights + head_rows * v * h + h) * w;
    let rotary_tables = 2 * m.max_position_embeddings as u64 * (d / 2) * 4;
    let targets: Vec<(u64, u64)> = m
        .projections()
        .iter()
        .zip(recipe.lora_targets)
        .filter(|(_, on)| *on)
        .map(|(&(i, o), _)| (i as u64, o as u64))
        .collect();
    let lora_elems: u64 = l * targets.iter().map(|(i, o)| r * (i + o)).sum::<u64>();
    let lora_weights = lora_elems * 4;
    let lora_gradients = 2 * lora_elems * 4;
    let optimizer_state = 2 * lora_elems * 4;

    // One layer's autograd graph in elements (the inventory is in docs/memory.md).
    let composed = target.cuda;
    // On the CPU a decoder layer is one op (`nn/layer.rs`) that keeps exactly the activations
    // its hand-written backward reads.
    let one_op = !composed && !targets.is_empty();
    // The one-op layer keeps: its output (the next layer's input), the normed input, the mid
    // residual and its norm (4 N×H); q before and after norm and rotary, the attention output
    // (3 N×A); k before and after, v (3 N×K); gate, up, their product (3 N×F); x·Aᵀ (N×r) per
    // LoRA projection.
    let one_op_graph = n * (4 * h + 3 * a + 3 * k + 3 * f + r * targets.len() as u64);
    // The per-op path (a GPU's: RMSNorm, rotary and SwiGLU are one node each there, through
    // sftd's CUDA kernels): every projection keeps its output; a LoRA one also keeps A·x and its
    // scaled copy, B's product and the sum, and with dropout the mask and the masked input.
    let lora_graph: u64 = targets
        .iter()
        .map(|(i, o)| 2 * n * o + 2 * n * r + if recipe.lora_dropout { 2 * n * i } else { 0 })
        .sum();
    let base_graph = n * h * 6 // 2 norms, o_proj, residual, down_proj, output
        + n * a * (6 + u64::from(b > 1)) // q, norm, rope, 3 head-major copies, cat
        + n * k * 6 // k, v, norm, rope, 2 head-major copies
        + n * f * 3; // gate, up, product
                     // With dropout it also keeps each LoRA projection's mask, one bit per input element.
    let mask_bits: u64 = if recipe.lora_dropout {
        targets.iter().map(|(i, _)| (n * i).div_ceil(8)).sum()
    } else {
        0
    };
    // On a GPU its backward holds about 18 widest activations at once, as measured on an H200
    // with Qwen3-1.7B's layers (docs/memory.md).
    let layer_graph = if one_op {
        one_op_graph * ACT + mask_bits
    } else {
        (base_graph + lora_graph) * ACT
    };
    // Backward: candle also computes the gradient of every dropout mask (kept until the
    // backward returns) and holds about three in-flight gradients of the widest activation.
    let mask_grads: u64 = if recipe.lora_dropout && !one_op {
        targets.iter().map(|(i, _)| n * i).sum::<u64>() * ACT
    } else {
        0
    };
    // The one-op backward frees each gradient buffer once consumed: its widest moment is the
    // SwiGLU backward (dz, dgate, dup: 3 N×F) or the attention backward (d(attention output),
    // dq, dk, dv, then dq before norm and rotary: about 3 N×A + 2 N×K), beside the incoming and
    // outgoing N×H gradients.
    // With dropout, a projection's backward also holds its masked input and the adapter's
    // masked input gradient (2 N×I).
    let widest_input = targets.iter().map(|&(i, _)| i).max().unwrap_or(0);
    let masked = if recipe.lora_dropout {
        2 * n * widest_input
    } else {
        0
    };
    let in_flight = if one_op {
        n * ((3 * f).max(3 * a + 2 * k) + 2 * h) * ACT + masked * ACT
    } else {
        (if composed { 18 } else { 3 }) * n * f.max(a).max(h) * ACT
    };
    // Attention keeps the probabilities of every sequence. The one-op layer's backward works
    // through them one block of query rows at a time (a 64×T buffer per thread, not counted);
    // the GPU's attention node (`nn/attention_device.rs`) holds two T×T buffers of one sequence
    // while it is differentiated (dP, then dS from the fused softmax gradient), as its forward
    // holds two (scores, probabilities); the CPU's per-op path keeps scores and probabilities.
    let hq = m.heads as u64;
    let score_buffers = if composed || one_op { 1 } else { 2 };
    let attention_graph = score_buffers * hq * b * t * t * ACT;
    let attention_backward = match (one_op, composed) {
        (true, _) => 0,
        (false, true) => 2 * hq * t * t * ACT,
        (false, false) => 4 * hq * t * t * ACT,
    };

    // `kept`: alive through the whole backward; `backward`: the largest moment within it.
    let (saved_activations, kept_scores, layer_activations) = if recipe.gradient_checkpointing {
        // Layer inputs and the final hidden state; the recomputed layer is alive only during
        // its own backward, and its input is copied into a Var.
        let saved = (l + 1) * n * h * ACT;
        (saved, 0, n * h * ACT + layer_graph + mask_grads + in_flight)
    } else {
        // The first layer's input is not differentiated, so its LoRA projections also leave
        // behind the gradients of their frozen output and of A's input (per-op path only: the
        // one-op layer skips its input gradient).
        let first_layer: u64 = if one_op {
            0
        } else {
            m.projections()
                .iter()
                .zip(recipe.lora_targets)
                .enumerate()
                .filter(|(j, (_, on))| *on && ![3, 6].contains(j))
                .map(|(_, (&(i, o), _))| n * (i + o) as u64)
                .sum::<u64>()
                * ACT
        };
        let saved = l * layer_graph + n * h * ACT;
        (
            saved,
            l * attention_graph,
            l * mask_grads + first_layer + in_flight,
        )
    };
    let backward_scores = if recipe.gradient_checkpointing {
        attention_graph + attention_backward
    } else {
        attention_backward
    };
    let attention_scores = kept_scores + backward_scores;

    // LM head: C rows of logits, overwritten in place by their gradient on the CPU; the
    // composed loss on a GPU holds about six (C, V) f32 buffers plus the half-precision logits.
    let chunk_rows = loss_chunk_rows(m.vocab, n as usize) as u64;
    let logits = chunk_rows * v;
    let logit_buffers = if composed {
        6 * logits * 4 + logits * w
    } else {
        logits * 4
    };
    let lm_head_chunk = logit_buffers + 5 * n * h * ACT;

    // Loading: the raw bytes of the largest tensor, its copy as read and its conversion.
    let largest = (v * h).max(f * h);
    let file = m.file_dtype_bytes as u64;
    let load_transient =
        (largest * (2 * file + if file != w { w } else { 0 })).saturating_sub(largest * w);

    let runtime_overhead = if target.cuda {
        CUDA_CONTEXT_BYTES
    } else {
        CPU_PROCESS_BYTES
    };

    let backward = layer_activations + backward_scores;
    let step = saved_activations + kept_scores + backward.max(lm_head_chunk);
    let training = lora_weights + lora_gradients + optimizer_state + step;
    let (transient, peak_phase) = if load_transient > training {
        (load_transient, "load")
    } else if lm_head_chunk > backward {
        (training, "lm_head")
    } else {
        (training, "layer_backward")
    };
    let total = base_weights + rotary_tables + runtime_overhead + transient;
    MemoryEstimate {
        estimated_peak_memory_bytes: total,
        peak_phase,
        breakdown: Breakdown {
            base_weights,
            rotary_tables,
            lora_weights,
            lora_gradients,
            optimizer_state,
            saved_activations,
            layer_activations,
            attention_scores,
            lm_head_chunk,
            load_transient,
            runtime_overhead,
        },
    }
}

/// Resident memory of an idle `sftd` process with a tokenizer and a dataset loaded.
pub const CPU_PROCESS_BYTES: u64 = 40 << 20;
/// A CUDA context with cuBLAS handles and candle's kernels loaded (not measured here).
pub const CUDA_CONTEXT_BYTES: u64 = 512 << 20;

/// A job that does not fit, with the single-knob changes that would make it fit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.message())]
pub struct InsufficientMemory {
    pub estimated_peak_memory_bytes: u64,
    pub device: String,
    pub device_memory_bytes: u64,
    /// e.g. `enable gradient_checkpointing`, `batch_size 2`, `max_seq_len 1024`.
    pub suggestions: Vec<String>,
}

impl InsufficientMemory {
    pub fn message(&self) -> String {
        let knobs = if self.suggestions.is_empty() {
            "no single change of gradient_checkpointing, batch_size or max_seq_len makes it fit; \
             use a smaller model or a device with more memory"
                .to_string()
        } else {
            format!("to fit, {}", self.suggestions.join(", or "))
        };
        format!(
            "this job needs an estimated {} of memory at its peak, but {} has {} available \
             (jobs may use {:.0}% of it); {knobs}",
            gib(self.estimated_peak_memory_bytes),
            self.device,
            gib(self.device_memory_bytes),
            USABLE_FRACTION * 100.0
        )
    }
}

/// `12.3 GiB`.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Whether an estimate fits in `device_memory_bytes` with the margin.
pub fn fits(estimate: u64, device_memory_bytes: u64) -> bool {
    estimate as f64 <= device_memory_bytes as f64 * USABLE_FRACTION
}

/// Estimates the job and checks it against the device's memory.
pub fn check(
    model: &ModelDims,
    recipe: &Recipe,
    target: Target,
    device: &str,
    device_memory_bytes: u64,
) -> Result<MemoryEstimate, InsufficientMemory> {
    let e = estimate(model, recipe, target);
    if fits(e.estimated_peak_memory_bytes, device_memory_bytes) {
        return Ok(e);
    }
    Err(InsufficientMemory {
        estimated_peak_memory_bytes: e.estimated_peak_memory_bytes,
        device: device.to_string(),
        device_memory_bytes,
        suggestions: suggestions(model, recipe, target, device_memory_bytes),
    })
}

/// The single-knob changes that fit: checkpointing on, the largest smaller batch, the largest
/// shorter `max_seq_len` (a multiple of 64 when that large).
pub fn suggestions(
    model: &ModelDims,
    recipe: &Recipe,
    target: Target,
    device_memory_bytes: u64,
) -> Vec<String> {
    let ok = |r: &Recipe| {
        fits(
            estimate(model, r, target).estimated_peak_memory_bytes,
            device_memory_bytes,
        )
    };
    let mut out = Vec::new();
    if !recipe.gradient_checkpointing {
        let on = Recipe {
            gradient_checkpointing: true,
            ..recipe.clone()
        };
        if ok(&on) {
            out.push("enable gradient_checkpointing".to_string());
        }
    }
    let batch = largest_fitting(1, recipe.batch_size - 1, |b| {
        ok(&Recipe {
            batch_size: b,
            ..recipe.clone()
        })
    });
    if let Some(b) = batch {
        out.push(format!("batch_size {b}"));
    }
    let seq = largest_fitting(8, recipe.max_seq_len - 1, |s| {
        ok(&Recipe {
            max_seq_len: s,
            ..recipe.clone()
        })
    });
    if let Some(s) = seq {
        let s = if s >= 64 { s / 64 * 64 } else { s };
        out.push(format!("max_seq_len {s}"));
    }
    out
}

/// The largest `x` in `lo..=hi` with `fits(x)`, for a `fits` that holds below some threshold.
fn largest_fitting(lo: usize, hi: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if hi < lo || !fits(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3-1.7B (28 layers, hidden 2048, intermediate 6144, 16/8 heads of 128, tied).
    fn qwen3_1_7b() -> ModelDims {
        ModelDims {
            layers: 28,
            hidden: 2048,
            intermediate: 6144,
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            vocab: 151936,
            tied_embeddings: true,
            max_position_embeddings: 40960,
            file_dtype_bytes: 2,
        }
    }

    /// The demo model's shape (`DemoSize::DEMO` with its 2057-token vocabulary).
    fn demo() -> ModelDims {
        ModelDims {
            layers: 4,
            hidden: 256,
            intermediate: 768,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            vocab: 2057,
            tied_embeddings: true,
            max_position_embeddings: 4096,
            file_dtype_bytes: 4,
        }
    }

    fn seed_recipe() -> Recipe {
        Recipe::from_config(&TrainConfig::default())
    }

    const T4_F16: Target = Target {
        cuda: true,
        weight_dtype: DType::F16,
    };
    const CPU: Target = Target {
        cuda: false,
        weight_dtype: DType::F32,
    };

    #[test]
    fn checkpointing_and_shorter_batches_need_less() {
        let m = qwen3_1_7b();
        let on = estimate(&m, &seed_recipe(), T4_F16).estimated_peak_memory_bytes;
        let off = Recipe {
            gradient_checkpointing: false,
            ..seed_recipe()
        };
        assert!(estimate(&m, &off, T4_F16).estimated_peak_memory_bytes > 2 * on);
        let half = Recipe {
            batch_size: 2,
            ..seed_recipe()
        };
        assert!(estimate(&m, &half, T4_F16).estimated_peak_memory_bytes < on);
    }

    #[test]
    fn every_suggestion_fits_and_the_next_step_up_does_not() {
        let (m, r) = (qwen3_1_7b(), seed_recipe());
        let device = 16_000_000_000;
        let err = check(&m, &r, T4_F16, "t4", device).unwrap_err();
        assert!(!err.suggestions.is_empty(), "{err}");
        for s in &err.suggestions {
            let (knob, value) = s.rsplit_once(' ').unwrap();
            let value: usize = value.parse().unwrap();
            let (fit, above) = match knob {
                "batch_size" => (
                    Recipe {
                        batch_size: value,
                        ..r.clone()
                    },
                    Recipe {
                        batch_size: value + 1,
                        ..r.clone()
                    },
                ),
                "max_seq_len" => (
                    Recipe {
                        max_seq_len: value,
                        ..r.clone()
                    },
                    Recipe {
                        max_seq_len: value + 64,
                        ..r.clone()
                    },
                ),
                other => panic!("unexpected knob {other}"),
            };
            assert!(check(&m, &fit, T4_F16, "t4", device).is_ok(), "{s}");
            assert!(check(&m, &above, T4_F16, "t4", device).is_err(), "{s}");
        }
        let msg = err.to_string();
        assert!(
            msg.contains("GiB") && msg.contains("t4") && msg.contains("to fit, "),
            "{msg}"
        );
    }

    #[test]
    fn a_fitting_job_passes_the_check() {
        let e = check(&demo(), &seed_recipe(), CPU, "cpu", 24 << 30).unwrap();
        assert!(e.estimated_peak_memory_bytes < 4 << 30);
    }

    #[test]
    fn largest_fitting_finds_the_threshold() {
        assert_eq!(largest_fitting(1, 100, |x| x <= 37), Some(37));
        assert_eq!(largest_fitting(1, 100, |x| x <= 1000), Some(100));
        assert_eq!(largest_fitting(1, 100, |_| false), None);
        assert_eq!(largest_fitting(5, 4, |_| true), None);
    }
}
