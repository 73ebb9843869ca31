//! Inference-only forward pass with a key/value cache, and LoRA adapters kept beside the frozen
//! base (never merged) so many adapters can share one loaded base model. This file holds the
//! cache, the adapters and the op-by-op pass (any dtype or device); `decode` the f32 CPU pass and
//! `Qwen3::forward_cached`, which picks one of the two.
//!
//! Shapes: T new tokens, P cached positions, H hidden, Hq/Hkv heads, G = Hq/Hkv, D head dim,
//! I/O a projection's in/out features, r LoRA rank, V vocab.

use super::{lora_key, Qwen3, MODULES};
use crate::train::checkpoint::Adapter;
use crate::train::nn::ops::{rms_norm, rope, softmax_last};
use crate::train::nn::Pass;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

/// Keys and values of every position seen so far, per layer.
#[derive(Default)]
pub struct KvCache {
    /// `(Hkv, P, D)` tensors each, grown by concatenation: the op-by-op pass (f16/bf16 weights,
    /// other devices).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Row-major `(P, Hkv·D)` keys and values, written in place: the f32 CPU pass. A position
    /// appends one row, so growth is a vector's amortized doubling.
    pub(super) rows: Vec<(Vec<f32>, Vec<f32>)>,
    /// Positions to reserve room for when the rows are first allocated.
    reserve: usize,
    pub(super) len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache with room for `positions` (prompt plus expected completion) before it must grow.
    pub fn with_capacity(positions: usize) -> Self {
        Self {
            reserve: positions,
            ..Self::default()
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Refuses a cache the other pass has filled: `slices` for the f32 CPU pass's rows, else the
    /// op-by-op pass's tensors (a cache serves one model).
    pub(super) fn check_pass(&self, slices: bool) -> Result<()> {
        let other_filled = if slices {
            !self.layers.is_empty()
        } else {
            !self.rows.is_empty()
        };
        if other_filled {
            bail!("this cache was filled by another model");
        }
        Ok(())
    }

    /// Allocates the per-layer rows of `width` elements per position on first use.
    pub(super) fn reserve_rows(&mut self, layers: usize, width: usize) {
        if self.rows.len() < layers {
            let cap = self.reserve.max(self.len) * width;
            self.rows.resize_with(layers, || {
                (Vec::with_capacity(cap), Vec::with_capacity(cap))
            });
        }
    }

    /// Appends this step's `(Hkv, T, D)` keys and values of layer `i`; returns all of them.
    fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        let kv = match self.layers[i].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
        };
        self.layers[i] = Some(kv.clone());
        Ok(kv)
    }
}

/// Which LoRA weights a cached forward pass applies.
#[derive(Clone, Copy)]
pub enum Tuning<'a> {
    /// None: the frozen base weights alone (any LoRA attached for training is ignored).
    Base,
    /// The model's own attached LoRA, as trained so far (a training model's current adapter).
    Attached,
    /// A PEFT adapter kept beside the frozen base (attached LoRA ignored).
    Adapter(&'a AdapterWeights),
}

impl<'a> From<Option<&'a AdapterWeights>> for Tuning<'a> {
    fn from(a: Option<&'a AdapterWeights>) -> Self {
        a.map_or(Tuning::Base, Tuning::Adapter)
    }
}

/// One LoRA pair as PEFT stores it: `a (r, I)`, `b (O, r)`, contiguous.
pub(super) struct LoraPair {
    pub(super) a: Tensor,
    pub(super) b: Tensor,
}

/// A PEFT adapter prepared for one base model: `ΔW x = scaling · B(A x)` per targeted projection.
pub struct AdapterWeights {
    pub(super) scaling: f64,
    /// Per layer, per projection in [`MODULES`] order.
    pub(super) layers: Vec<Vec<Option<LoraPair>>>,
}

impl AdapterWeights {
    /// Checks every tensor's shape against `model` and lays them out for inference.
    pub fn new(model: &Qwen3, adapter: &Adapter) -> Result<Self> {
        let scaling = if adapter.use_rslora {
            adapter.alpha / (adapter.r as f64).sqrt()
        } else {
            adapter.alpha / adapter.r as f64
        };
        let dtype = crate::train::nn::ops::upcast(model.dtype);
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, layer) in model.layers.iter().enumerate() {
            let mut pairs = Vec::with_capacity(MODULES.len());
            for (m, proj) in MODULES.iter().zip(&layer.proj) {
                if !adapter.target_modules.iter().any(|t| t == m) {
                    pairs.push(None);
                    continue;
                }
                let (out_f, in_f) = proj.weight.dims2()?;
                let get = |ab: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let key = lora_key(i, m, ab);
                    let t = adapter
                        .tensors
                        .get(&key)
                        .with_context(|| format!("the adapter has no tensor {key}"))?;
                    if t.dims() != shape {
                        bail!(
                            "adapter tensor {key} has shape {:?}, but this base model needs {shape:?}",
                            t.dims()
                        );
                    }
                    Ok(t.to_dtype(dtype)?.contiguous()?)
                };
                pairs.push(Some(LoraPair {
                    a: get("A", [adapter.r, in_f])?,
                    b: get("B", [out_f, adapter.r])?,
                }));
            }
            layers.push(pairs);
        }
        Ok(Self { scaling, layers })
    }
}

impl Qwen3 {
    /// [`Qwen3::forward_cached`] op by op on tensors, for any dtype and device.
    pub(super) fn forward_ops(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        tuning: Tuning<'_>,
    ) -> Result<Tensor> {
        let (t, past) = (ids.len(), cache.len);
        let ids = Tensor::from_slice(ids, t, &self.device)?;
        let cos = self.cos.narrow(0, past, t)?;
        let sin = self.sin.narrow(0, past, t)?;
        let mut x = self.embed.index_select(&ids, 0)?; // (T, H)
        for i in 0..self.layers.len() {
            x = self.layer_cached(i, &x, &cos, &sin, cache, tuning, past)?;
        }
        cache.len = past + t;
        let last = self.final_norm(&x.narrow(0, t - 1, 1)?)?;
        let logits = crate::train::nn::frozen_linear(&last, &self.lm_head)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// One decoder layer over the new tokens: `x (T, H) -> (T, H)`.
    #[allow(clippy::too_many_arguments)]
    fn layer_cached(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut KvCache,
        tuning: Tuning<'_>,
        past: usize,
    ) -> Result<Tensor> {
        let l = &self.layers[i];
        let (t, _) = x.dims2()?;
        let d = self.cfg.head_dim();
        let (hq, hkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let g = hq / hkv;
        let eps = self.cfg.rms_norm_eps;
        let lora = match tuning {
            Tuning::Adapter(a) => Some((a.layers[i].as_slice(), a.scaling)),
            Tuning::Base | Tuning::Attached => None,
        };
        let proj = |m: usize, h: &Tensor| -> Result<Tensor> {
            let y = match tuning {
                // No graph, no dropout: detached LoRA weights, as at eval.
                Tuning::Attached => l.proj[m].forward(
                    h,
                    Pass {
                        track: false,
                        dropout_key: None,
                    },
                    0,
                )?,
                Tuning::Base | Tuning::Adapter(_) => l.proj[m].forward_frozen(h)?,
            };
            match lora.and_then(|(p, s)| Some((p[m].as_ref()?, s))) {
                None => Ok(y),
                Some((pair, s)) => {
                    // PEFT: the input in the adapter's dtype, `B(A x) · scaling`, cast back.
                    let xa = h.to_dtype(pair.a.dtype())?;
                    // (T, I) @ (I, r) -> (T, r) @ (r, O) -> (T, O)
                    let delta = (xa.matmul(&pair.a.t()?)?.matmul(&pair.b.t()?)? * s)?;
                    let delta = delta.to_dtype(y.dtype())?;
                    Ok((y + delta)?)
                }
            }
        };
        // 1. Attention over the cached positions and the new ones.
        let h = rms_norm(x, &l.input_norm, eps)?;
        let q = proj(0, &h)?.reshape((t, hq, d))?;
        let k = proj(1, &h)?.reshape((t, hkv, d))?;
        let v = proj(2, &h)?.reshape((t, hkv, d))?;
        let q = rope(&rms_norm(&q, &l.q_norm, eps)?, cos, sin)?;
        let k = rope(&rms_norm(&k, &l.k_norm, eps)?, cos, sin)?;
        let k = k.transpose(0, 1)?.contiguous()?; // (Hkv, T, D)
        let v = v.transpose(0, 1)?.contiguous()?;
        let (k, v) = cache.append(i, k, v)?; // (Hkv, P+T, D)
        let total = past + t;
        // Query head h = kv·G + g shares key/value head kv: (T, Hq, D) -> (Hkv, G·T, D).
        let q = q.transpose(0, 1)?.contiguous()?.reshape((hkv, g * t, d))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?; // (Hkv, G·T, P+T)
        let scores = if t > 1 {
            scores
                .broadcast_add(&causal_mask(t, past, g, &self.device)?.to_dtype(scores.dtype())?)?
        } else {
            scores
        };
        let p = softmax_last(&scores)?.to_dtype(v.dtype())?;
        let o = p.matmul(&v)?; // (Hkv, G·T, D)
        let attn = o
            .reshape((hq, t, d))?
            .transpose(0, 1)?
            .reshape((t, hq * d))?;
        debug_assert_eq!(p.dim(D::Minus1)?, total);
        let x = (x + proj(3, &attn)?)?;
        // 2. SwiGLU MLP.
        let h = rms_norm(&x, &l.post_attn_norm, eps)?;
        let gate = proj(4, &h)?.silu()?;
        let up = proj(5, &h)?;
        let mlp = proj(6, &(gate * up)?)?;
        Ok((x + mlp)?)
    }
}

/// `(G·T, P+T)` additive mask for T new tokens after P cached ones: new token j sees positions
/// `0..=P+j`; rows repeat for each of the G query heads sharing a key/value head.
fn causal_mask(t: usize, past: usize, g: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let total = past + t;
    let row = |j: usize| {
        (0..total).map(move |c| {
            if c <= past + j {
                0f32
            } else {
                f32::NEG_INFINITY
            }
        })
    };
    let data: Vec<f32> = (0..g).flat_map(|_| (0..t).flat_map(row)).collect();
    Ok(Tensor::from_vec(data, (g * t, total), dev)?)
}
