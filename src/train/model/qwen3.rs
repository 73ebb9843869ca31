//! A trainable Qwen3 (dense) decoder that loads Hugging Face checkpoints by their tensor names,
//! with frozen base weights and optional LoRA on any of the seven linear projections.
//!
//! Shapes: N packed tokens, H hidden, Hq/Hkv heads, D head dim, F intermediate, V vocab.

use crate::train::nn::layer::{decoder_layer, module_key, GradSink, LayerParams, Output};
use crate::train::nn::ops::{packed_causal_attention, rms_norm, rope, rope_tables, upcast};
use crate::train::nn::swiglu::swiglu;
use crate::train::nn::{Lora, LoraLinear, Pass};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod cached;
mod decode;
#[cfg(test)]
mod decode_tests;
#[cfg(test)]
mod layer_tests;
pub use cached::{AdapterWeights, KvCache, Tuning};

/// The fields of a Qwen3 `config.json` this model uses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_theta() -> f64 {
    1_000_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Qwen3Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let mut cfg: Self = serde_json::from_value(raw.clone())
            .with_context(|| format!("{} is not a Qwen3 config", path.display()))?;
        // transformers 5 writes the rotary base under `rope_parameters` instead of at the top.
        if raw.get("rope_theta").is_none() {
            if let Some(theta) = raw
                .pointer("/rope_parameters/rope_theta")
                .and_then(|v| v.as_f64())
            {
                cfg.rope_theta = theta;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "qwen3" {
                bail!("model_type {t:?} is not supported: sftd trains Qwen3 (dense) models");
            }
        }
        if self.hidden_act != "silu" {
            bail!(
                "hidden_act {:?} is not supported (Qwen3 uses silu)",
                self.hidden_act
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!("num_attention_heads must be a multiple of num_key_value_heads");
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim must be even for rotary embeddings");
        }
        Ok(())
    }

    /// Matmul parameters touched per token (7 projections per layer + LM head), for FLOP counts.
    pub fn linear_params(&self) -> usize {
        let (h, f, d) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let attn = h * self.num_attention_heads * d * 2 + h * self.num_key_value_heads * d * 2;
        self.num_hidden_layers * (attn + 3 * h * f) + h * self.vocab_size
    }
}

/// The safetensors files of a model directory: `model.safetensors` or the shards named by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let map = v["weight_map"]
        .as_object()
        .context("model.safetensors.index.json has no weight_map")?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

pub const MODULES: [&str; 7] = crate::train::spec::ALL_LINEAR;

pub struct Layer {
    input_norm: Tensor,
    post_attn_norm: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    /// q, k, v, o, gate, up, down in [`MODULES`] order.
    pub proj: Vec<LoraLinear>,
}

pub struct Qwen3 {
    pub cfg: Qwen3Config,
    /// (V, H) frozen.
    embed: Tensor,
    /// (V, H) frozen; the embedding itself when tied.
    pub lm_head: Tensor,
    final_norm: Tensor,
    pub layers: Vec<Layer>,
    /// (max_pos, D/2) f32.
    cos: Tensor,
    sin: Tensor,
    /// Dtype of the frozen GEMM weights (embedding, projections, LM head); everything else is
    /// `upcast(dtype)`.
    pub dtype: DType,
    pub device: Device,
    /// LoRA gradients that the one-op decoder layers' backwards leave outside candle's
    /// gradient store; the trainer takes them after each `backward()`.
    pub lora_grads: GradSink,
}

/// A micro-batch of sequences packed end to end without padding.
pub struct Packed {
    /// (N,) u32
    pub ids: Tensor,
    /// (N, D/2) rotary tables at each token's position within its own sequence.
    pub cos: Tensor,
    pub sin: Tensor,
    /// (start, len) of each sequence in the packed axis.
    pub segments: Vec<(usize, usize)>,
}

impl Qwen3 {
    /// Loads base weights from a HF model directory, converting them to `dtype` (f32 on CPU).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = Qwen3Config::from_dir(dir)?;
        let files = weight_files(dir)?;
        let backend = super::weights::SafetensorsFiles::open(&files)?;
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Self::from_vb(cfg, vb, dtype, device)
            .with_context(|| format!("loading weights from {}", dir.display()))
    }

    fn from_vb(cfg: Qwen3Config, vb: VarBuilder, dtype: DType, device: &Device) -> Result<Self> {
        let (h, f, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        // Norm weights and biases join the f32 residual stream; only GEMM weights take `dtype`.
        let act = upcast(dtype);
        let m = vb.pp("model");
        let embed = m.get((cfg.vocab_size, h), "embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get((cfg.vocab_size, h), "lm_head.weight")?
        };
        let shapes = [
            (hq * d, h),
            (hkv * d, h),
            (hkv * d, h),
            (h, hq * d),
            (f, h),
            (f, h),
            (h, f),
        ];
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let mut proj = Vec::with_capacity(7);
            for (name, shape) in MODULES.iter().zip(shapes) {
                let p = l.pp(module_group(name)).pp(*name);
                let bias = if cfg.attention_bias
                    && ["q_proj", "k_proj", "v_proj", "o_proj"].contains(name)
                {
                    Some(p.to_dtype(act).get(shape.0, "bias")?)
                } else {
                    None
                };
                proj.push(LoraLinear {
                    weight: p.get(shape, "weight")?.contiguous()?,
                    bias,
                    lora: None,
                });
            }
            let ln = l.to_dtype(act);
            layers.push(Layer {
                input_norm: ln.get(h, "input_layernorm.weight")?,
                post_attn_norm: ln.get(h, "post_attention_layernorm.weight")?,
                q_norm: ln.get(d, "self_attn.q_norm.weight")?,
                k_norm: ln.get(d, "self_attn.k_norm.weight")?,
                proj,
            });
        }
        let final_norm = m.to_dtype(act).get(h, "norm.weight")?;
        let (cos, sin) = rope_tables(d, cfg.max_position_embeddings, cfg.rope_theta, device)?;
        Ok(Self {
            cfg,
            embed,
            lm_head,
            final_norm,
            layers,
            cos,
            sin,
            dtype,
            device: device.clone(),
            lora_grads: GradSink::default(),
        })
    }

    /// Packs token sequences end to end; positions restart at 0 for each sequence.
    pub fn pack(&self, seqs: &[&[u32]]) -> Result<Packed> {
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut segments = Vec::with_capacity(seqs.len());
        for s in seqs {
            if s.len() > self.cfg.max_position_embeddings {
                bail!(
                    "sequence of {} tokens exceeds max_position_embeddings {}",
                    s.len(),
                    self.cfg.max_position_embeddings
                );
            }
            segments.push((ids.len(), s.len()));
            ids.extend_from_slice(s);
            pos.extend(0..s.len() as u32);
        }
        let n = ids.len();
        let pos = Tensor::from_vec(pos, n, &self.device)?;
        Ok(Packed {
            ids: Tensor::from_vec(ids, n, &self.device)?,
            cos: self.cos.index_select(&pos, 0)?,
            sin: self.sin.index_select(&pos, 0)?,
            segments,
        })
    }

    /// Token embeddings `(N, H)` in the residual stream's dtype (f32 whatever the base weights'
    /// dtype); never part of the autograd graph (the table is frozen).
    pub fn embed(&self, p: &Packed) -> Result<Tensor> {
        Ok(self
            .embed
            .index_select(&p.ids, 0)?
            .to_dtype(upcast(self.dtype))?)
    }

    /// One decoder layer: `x (N, H) -> (N, H)`, as one op where that serves (CPU, f32/f64, see
    /// [`decoder_layer`]), else op by op.
    pub fn layer_forward(&self, i: usize, x: &Tensor, p: &Packed, pass: Pass) -> Result<Tensor> {
        self.layer(i, x, p, pass, Output::Value)
    }

    /// The gradients of `Σ layer_i(x) ⊙ g (N, H)`: a checkpointed layer's backward, its forward
    /// recomputed with a graph. The one-op layer skips the down projection's product there, so
    /// the forward's output never leaves this function.
    pub fn layer_backward(
        &self,
        i: usize,
        x: &Tensor,
        p: &Packed,
        pass: Pass,
        g: &Tensor,
    ) -> Result<GradStore> {
        let out = self.layer(i, x, p, pass, Output::GradientOnly)?;
        weighted_sum_backward(&out, g)
    }

    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        p: &Packed,
        pass: Pass,
        output: Output,
    ) -> Result<Tensor> {
        crate::train::nn::cuda_kernels::set_attention_precision(self.dtype);
        let l = &self.layers[i];
        let params = LayerParams {
            input_norm: &l.input_norm,
            post_attn_norm: &l.post_attn_norm,
            q_norm: &l.q_norm,
            k_norm: &l.k_norm,
            proj: &l.proj,
            eps: self.cfg.rms_norm_eps,
            dims: (
                self.cfg.num_attention_heads,
                self.cfg.num_key_value_heads,
                self.cfg.head_dim(),
            ),
            index: i,
        };
        let sink = &self.lora_grads;
        let rope = (&p.cos, &p.sin);
        if let Some(y) = decoder_layer(x, &params, rope, &p.segments, pass, sink, output)? {
            return Ok(y);
        }
        self.layer_forward_ops(i, x, p, pass)
    }

    /// [`Self::layer_forward`] op by op, each with its own autograd node.
    fn layer_forward_ops(&self, i: usize, x: &Tensor, p: &Packed, pass: Pass) -> Result<Tensor> {
        let l = &self.layers[i];
        let (n, _) = x.dims2()?;
        let d = self.cfg.head_dim();
        let (hq, hkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let eps = self.cfg.rms_norm_eps;
        let key = |m: usize| module_key(i, m);
        // 1. Attention: per-head RMSNorm on q and k, then rotary, then causal attention per sequence.
        let h = rms_norm(x, &l.input_norm, eps)?;
        let q = l.proj[0].forward(&h, pass, key(0))?.reshape((n, hq, d))?;
        let k = l.proj[1].forward(&h, pass, key(1))?.reshape((n, hkv, d))?;
        let v = l.proj[2].forward(&h, pass, key(2))?.reshape((n, hkv, d))?;
        let q = rope(&rms_norm(&q, &l.q_norm, eps)?, &p.cos, &p.sin)?;
        let k = rope(&rms_norm(&k, &l.k_norm, eps)?, &p.cos, &p.sin)?;
        let attn = packed_causal_attention(&q, &k, &v, &p.segments)?; // (N, Hq·D)
        let x = (x + l.proj[3].forward(&attn, pass, key(3))?)?;
        // 2. SwiGLU MLP.
        let h = rms_norm(&x, &l.post_attn_norm, eps)?;
        let gate = l.proj[4].forward(&h, pass, key(4))?;
        let up = l.proj[5].forward(&h, pass, key(5))?;
        let mlp = l.proj[6].forward(&swiglu(&gate, &up)?, pass, key(6))?;
        Ok((x + mlp)?)
    }

    /// Every decoder layer over a packed batch: `(N,)` ids -> `(N, H)` hidden states before the
    /// final norm.
    pub fn forward(&self, p: &Packed, pass: Pass) -> Result<Tensor> {
        let mut h = self.embed(p)?;
        for i in 0..self.layers.len() {
            h = self.layer_forward(i, &h, p, pass)?;
        }
        Ok(h)
    }

    /// Logits at every position, `(N, V)`, without dropout or autograd (inspection, parity checks).
    pub fn logits(&self, p: &Packed) -> Result<Tensor> {
        let pass = Pass {
            track: false,
            dropout_key: None,
        };
        let h = self.final_norm(&self.forward(p, pass)?)?;
        Ok(crate::train::nn::frozen_linear(&h, &self.lm_head)?)
    }

    /// The final RMSNorm, `(N, H) -> (N, H)`.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.final_norm, self.cfg.rms_norm_eps)?)
    }

    /// Attaches rank-`r` LoRA pairs to the targeted projections of every layer.
    /// `init(key, (rows, cols))` supplies each matrix by its PEFT key: A is (r, I), B is (O, r).
    pub fn attach_lora(
        &mut self,
        target_modules: &[String],
        r: usize,
        scaling: f64,
        dropout: f64,
        mut init: impl FnMut(&str, (usize, usize)) -> Result<Tensor>,
    ) -> Result<()> {
        let dtype = self.dtype;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (m, proj) in MODULES.iter().zip(layer.proj.iter_mut()) {
                if !target_modules.iter().any(|t| t == m) {
                    proj.lora = None;
                    continue;
                }
                let (out_f, in_f) = proj.weight.dims2()?;
                let mut load = |ab: &str, shape: (usize, usize)| -> Result<Var> {
                    let key = lora_key(i, m, ab);
                    let t = init(&key, shape)?;
                    if t.dims() != [shape.0, shape.1] {
                        bail!(
                            "{key} has shape {:?}, expected {:?}",
                            t.dims(),
                            [shape.0, shape.1]
                        );
                    }
                    Ok(Var::from_tensor(
                        &t.to_dtype(crate::train::nn::ops::upcast(dtype))?,
                    )?)
                };
                proj.lora = Some(Lora {
                    a: load("A", (r, in_f))?,
                    b: load("B", (out_f, r))?,
                    scaling,
                    dropout,
                });
            }
        }
        Ok(())
    }

    /// Every LoRA tensor with its PEFT key, in a fixed order (layer, module, A then B).
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (m, proj) in MODULES.iter().zip(&layer.proj) {
                if let Some(l) = &proj.lora {
                    out.push((lora_key(i, m, "A"), l.a.clone()));
                    out.push((lora_key(i, m, "B"), l.b.clone()));
                }
            }
        }
        out
    }

    /// LoRA vars of one layer, for per-layer gradient extraction.
    pub fn layer_vars(&self, i: usize) -> Vec<&Var> {
        self.layers[i]
            .proj
            .iter()
            .filter_map(|p| p.lora.as_ref())
            .flat_map(|l| [&l.a, &l.b])
            .collect()
    }
}

/// The gradients of `Σ out ⊙ g`, without summing: candle's backward seeds a non-scalar root with
/// ones, which gives the same gradients, and its CUDA `sum_all` runs as one thread block (0.4 ms
/// over a 2048 × 2048 tensor on an H200, per layer and step).
fn weighted_sum_backward(out: &Tensor, g: &Tensor) -> Result<GradStore> {
    Ok((out * g)?.backward()?)
}

/// The Hugging Face name of the projection behind a `layer_forward` module key, e.g.
/// `model.layers.3.mlp.down_proj`.
pub fn projection_name(module_key: u64) -> String {
    let (layer, m) = (module_key >> 8, (module_key & 0xff) as usize);
    let module = MODULES.get(m).copied().unwrap_or("unknown_proj");
    format!("model.layers.{layer}.{}.{module}", module_group(module))
}

/// PEFT's on-disk key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn lora_key(layer: usize, module: &str, ab: &str) -> String {
    let group = module_group(module);
    format!("base_model.model.model.layers.{layer}.{group}.{module}.lora_{ab}.weight")
}

/// The sub-module a projection lives in (`self_attn` or `mlp`).
fn module_group(module: &str) -> &'static str {
    if ["gate_proj", "up_proj", "down_proj"].contains(&module) {
        "mlp"
    } else {
        "self_attn"
    }
}

#[cfg(test)]
mod tests {
    use super::Qwen3Config;

    #[test]
    fn rope_theta_read_from_rope_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = r#"{"vocab_size":8,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":32,
            "rope_parameters":{"rope_type":"default","rope_theta":10000.0}}"#;
        std::fs::write(dir.path().join("config.json"), cfg).unwrap();
        assert_eq!(
            Qwen3Config::from_dir(dir.path()).unwrap().rope_theta,
            10000.0
        );
    }
}
