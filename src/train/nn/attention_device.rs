//! Causal attention over packed sequences where sftd's CPU attention does not run (the GPU, and
//! the CPU with its kernels off): one autograd node whose forward is batched matmuls around a
//! causal softmax and whose backward is written out, so each `(heads, T, T)` score tensor is
//! touched by few elementwise passes.
//!
//! Composed op by op, autograd keeps every intermediate and replays about thirty elementwise
//! passes over each score tensor per layer (the scale, the mask, max, subtract, exp, sum, divide,
//! and their gradients, several through candle's slow broadcasting kernels); on an H200 those
//! passes were three quarters of a Qwen3-1.7B-shaped step. Here, where the fused causal softmax
//! serves (sftd's CUDA kernels on a GPU), the forward makes one pass (scale, mask and softmax in
//! one kernel) and the backward one (`s · P ⊙ (dP − rowsum(P ⊙ dP))`); elsewhere the forward
//! makes two (add the mask, candle's softmax) and the backward two (subtract the row term taken
//! as `dOᵢ · Oᵢ`, a product over the head dim, then multiply by P). Either way the node keeps only
//! the probabilities.
//!
//! Shapes: N packed tokens, Hq query heads, Hkv key/value heads, G = Hq/Hkv, D head dim, T one
//! sequence's length. Query head h uses key/value head h / G, as in HF's `repeat_kv`.

use super::attention::{packed_dims, Dims};
use super::cuda_kernels::{attention_gemms, fused_kernels};
use super::fused;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use std::sync::{Arc, Mutex};

/// `q (N, Hq, D)`, `k`/`v (N, Hkv, D)`, `segments`: (start, len) of each sequence, covering N
/// -> `(N, Hq·D)`: per sequence, `softmax(q kᵀ / √D)` with row i seeing keys 0..=i, times v.
pub fn packed_attention_device(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
) -> Result<Tensor> {
    let Dims { hq, hkv, d } = packed_dims(q.shape(), k.shape(), v.shape(), segments)?;
    let heads = Heads {
        hq,
        hkv,
        d,
        scale: 1.0 / (d as f64).sqrt(),
    };
    // The forward on detached inputs: nothing but the op's own node enters the graph.
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let fused = fused_kernels(q);
    let (mut outs, probs) = attention_gemms(q.device(), || {
        segments_forward(&qd, &kd, &vd, segments, heads, fused)
    })?;
    let out = match outs.len() {
        1 => outs.pop().expect("one segment"),
        _ => Tensor::cat(&outs, 0)?,
    };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let op = DeviceAttention {
        segments: segments.to_vec(),
        heads,
        fused,
        out: Mutex::new(Some(out.contiguous()?)),
        probs,
    };
    q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
}

/// Per sequence, the output `(T, Hq·D)` and the probabilities `(Hkv, G·T, T)`.
fn segments_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
    heads: Heads,
    fused: bool,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let (hq, hkv) = (heads.hq, heads.hkv);
    let mut outs = Vec::with_capacity(segments.len());
    let mut probs = Vec::with_capacity(segments.len());
    for &(start, t) in segments {
        let qs = heads.query_major(q, start, t)?; // (Hkv, G·T, D)
        let ks = heads.kv_major(k, start, t)?; // (Hkv, T, D)
        let vs = heads.kv_major(v, start, t)?;
        // (Hkv, G·T, D) @ (Hkv, D, T) -> (Hkv·G, T, T), masked above the diagonal.
        let p = if fused {
            fused::causal_softmax_value(&qs.matmul(&ks.t()?)?, heads.scale)?
        } else {
            let scores = (qs * heads.scale)?
                .matmul(&ks.t()?)?
                .reshape((hq, t, t))?
                .broadcast_add(&causal_mask(t, q.device(), q.dtype())?)?;
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let p = p.reshape((hkv, hq / hkv * t, t))?;
        outs.push(heads.token_major(&p.matmul(&vs)?, t)?); // (T, Hq·D)
        probs.push(p);
    }
    Ok((outs, probs))
}

/// `(T, T)` additive mask: 0 on and below the diagonal, -inf above. Built once per device and
/// dtype at the longest length asked for so far (rounded up to 256), and handed out as a view
/// of its top-left corner, which is the mask of every shorter length: no per-segment, per-layer
/// upload to a GPU.
pub fn causal_mask(t: usize, dev: &candle_core::Device, dtype: DType) -> Result<Tensor> {
    use std::sync::Mutex;
    static CACHE: Mutex<Vec<(candle_core::Device, DType, Tensor)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().expect("causal mask cache");
    let slot = cache
        .iter()
        .position(|(d, dt, _)| d.same_device(dev) && *dt == dtype);
    let cached = slot.and_then(|i| {
        let m = &cache[i].2;
        (m.dim(0).ok()? >= t).then(|| m.clone())
    });
    let mask = match cached {
        Some(m) => m,
        None => {
            let n = t.div_ceil(256) * 256;
            let m: Vec<f32> = (0..n)
                .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let m = Tensor::from_vec(m, (n, n), dev)?.to_dtype(dtype)?;
            match slot {
                Some(i) => cache[i].2 = m.clone(),
                None => cache.push((dev.clone(), dtype, m.clone())),
            }
            m
        }
    };
    mask.narrow(0, 0, t)?.narrow(1, 0, t)
}

/// Head counts, head dim and the score scale `1/√D`.
#[derive(Clone, Copy)]
struct Heads {
    hq: usize,
    hkv: usize,
    d: usize,
    scale: f64,
}

impl Heads {
    /// `(N, Hq, D)` or `(N, Hq·D)` rows `start..start+t` -> `(Hkv, G·T, D)`, contiguous.
    fn query_major(&self, x: &Tensor, start: usize, t: usize) -> Result<Tensor> {
        x.narrow(0, start, t)?
            .reshape((t, self.hq, self.d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.hkv, self.hq / self.hkv * t, self.d))
    }

    /// `(N, Hkv, D)` rows `start..start+t` -> `(Hkv, T, D)`, contiguous.
    fn kv_major(&self, x: &Tensor, start: usize, t: usize) -> Result<Tensor> {
        x.narrow(0, start, t)?.transpose(0, 1)?.contiguous()
    }

    /// `(Hkv, G·T, D)` -> `(T, Hq·D)`, contiguous.
    fn token_major(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        x.reshape((self.hq, t, self.d))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, self.hq * self.d))
    }
}

/// The autograd node of [`packed_attention_device`]: its output and probabilities, computed
/// before the node exists, and the backward.
struct DeviceAttention {
    segments: Vec<(usize, usize)>,
    heads: Heads,
    /// Whether the fused causal softmax made the probabilities (and so makes their gradient).
    fused: bool,
    /// `(N, Hq·D)`, contiguous, until the node copies it as its value; the backward reads that.
    out: Mutex<Option<Tensor>>,
    /// Per sequence, `(Hkv, G·T, T)`.
    probs: Vec<Tensor>,
}

impl DeviceAttention {
    /// The output computed up front, copied as this node's value and then let go, so that it is
    /// not held twice.
    fn value<S: BackendStorage>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let out = self.out.lock().expect("attention output").take();
        let Some(out) = out else {
            candle_core::bail!("packed attention: the node's value was already taken")
        };
        let (storage, layout) = out.storage_and_layout();
        let Some(s) = pick(&storage) else {
            candle_core::bail!("packed attention: output and inputs on different devices")
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("packed attention: output not laid out from its start")
        }
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp3 for DeviceAttention {
    fn name(&self) -> &'static str {
        "packed-attention-device"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    /// Per sequence, with `dO (Hkv, G·T, D)` and `P (Hkv, G·T, T)`:
    /// `dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))`, `dQ = s · dS K`, `dK = s · dSᵀ Q`,
    /// where `s = 1/√D`; the G query heads of a group sum into their key/value head through
    /// the `(G·T)` axis of the products.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
        let (od, grad) = (out.detach(), grad.detach());
        attention_gemms(q.device(), || {
            self.segments_backward(&qd, &kd, &vd, &od, &grad)
        })
    }
}

impl DeviceAttention {
    /// `(dq, dk, dv)` for the output gradient `grad`, sequence by sequence.
    fn segments_backward(
        &self,
        qd: &Tensor,
        kd: &Tensor,
        vd: &Tensor,
        od: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self.heads;
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for (&(start, t), p) in self.segments.iter().zip(&self.probs) {
            let qs = h.query_major(qd, start, t)?;
            let ks = h.kv_major(kd, start, t)?;
            let vs = h.kv_major(vd, start, t)?;
            let gs = h.query_major(grad, start, t)?;
            let dp = gs.matmul(&vs.t()?)?; // (Hkv, G·T, T)
                                           // dq (Hkv, G·T, D), dk (Hkv, T, D); the fused gradient holds the scale already.
            let (dq, dk) = if self.fused {
                let ds = fused::causal_softmax_grad(p, &dp, h.scale)?; // (Hkv, G·T, T)
                (ds.matmul(&ks)?, ds.t()?.matmul(&qs)?)
            } else {
                let os = h.query_major(od, start, t)?;
                let row = (&gs * &os)?.sum_keepdim(D::Minus1)?; // (Hkv, G·T, 1)
                let ds = (dp.broadcast_sub(&row)? * p)?;
                (
                    (ds.matmul(&ks)? * h.scale)?,
                    (ds.t()?.matmul(&qs)? * h.scale)?,
                )
            };
            let dv = p.t()?.matmul(&gs)?; // (Hkv, T, D)
            dqs.push(h.token_major(&dq, t)?.reshape((t, h.hq, h.d))?);
            dks.push(dk.transpose(0, 1)?.contiguous()?);
            dvs.push(dv.transpose(0, 1)?.contiguous()?);
        }
        let cat = |parts: Vec<Tensor>| -> Result<Tensor> {
            match parts.len() {
                1 => Ok(parts.into_iter().next().expect("one segment")),
                _ => Tensor::cat(&parts, 0),
            }
        };
        Ok((Some(cat(dqs)?), Some(cat(dks)?), Some(cat(dvs)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::ops::packed_causal_attention_composed;
    use crate::train::nn::testing::{check_fused_inputs, max_diff};
    use candle_core::{Device, Var};

    const SEGMENTS: [(usize, usize); 3] = [(0, 5), (5, 1), (6, 9)];

    /// q, k, v of a GQA layout (4 query heads on 2 key/value heads, head dim 8), f64, and a
    /// cotangent for the output.
    /// Fixed inputs (seeded), so that a finite difference's rounding is the same every run.
    fn inputs() -> [Tensor; 4] {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rnd = |heads: usize| {
            let data: Vec<f64> = (0..15 * heads * 8)
                .map(|_| rng.random::<f64>() * 4.0 - 2.0)
                .collect();
            Tensor::from_vec(data, (15, heads, 8), &Device::Cpu).unwrap()
        };
        [rnd(4), rnd(2), rnd(2), rnd(4).reshape((15, 32)).unwrap()]
    }

    /// Runs `check` on both of the node's paths: the fused causal softmax (the CPU kernel, as
    /// the GPU runs its CUDA twin) and, with the kernels off, the mask add and candle's softmax.
    fn on_both_paths(check: impl Fn()) {
        check();
        crate::train::nn::cpu_kernels::off_in(check);
    }

    /// Value and the gradients of q, k and v equal the op-by-op composition's (autograd's).
    #[test]
    fn equals_the_composed_attention_and_its_autograd() {
        on_both_paths(equals_the_composed_attention);
    }

    fn equals_the_composed_attention() {
        let [q, k, v, cot] = inputs();
        check_fused_inputs(
            |node, x| {
                if node {
                    packed_attention_device(x[0], x[1], x[2], &SEGMENTS)
                } else {
                    packed_causal_attention_composed(x[0], x[1], x[2], &SEGMENTS)
                }
            },
            &[&q, &k, &v],
            &cot,
            &["output", "dq", "dk", "dv"],
            1e-12,
            "f64",
        );
    }

    /// Central differences of `Σ out ⊙ cot` at a few elements of q, k and v.
    #[test]
    fn gradients_match_finite_differences() {
        on_both_paths(gradients_match_central_differences);
    }

    fn gradients_match_central_differences() {
        let [q, k, v, cot] = inputs();
        let loss = |args: &[Tensor]| -> f64 {
            let out = packed_attention_device(&args[0], &args[1], &args[2], &SEGMENTS).unwrap();
            (out * &cot)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let vars: Vec<Var> = [&q, &k, &v]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let xs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let out = packed_attention_device(xs[0], xs[1], xs[2], &SEGMENTS).unwrap();
        let grads = (out * &cot).unwrap().sum_all().unwrap().backward().unwrap();
        // Central differences in f64: truncation ~eps², rounding ~1e-16·|loss|/eps; both stay
        // far below the 1e-8 that the floor of 1e-2 on the denominator allows.
        let eps = 1e-5;
        for (which, x) in vars.iter().enumerate() {
            let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let analytic: Vec<f64> = grads
                .get(x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in [0, 7, base.len() / 2, base.len() - 1] {
                let shifted = |delta: f64| {
                    let mut data = base.clone();
                    data[i] += delta;
                    let mut args = [q.clone(), k.clone(), v.clone()];
                    args[which] = Tensor::from_vec(data, x.shape(), &Device::Cpu).unwrap();
                    loss(&args)
                };
                let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                let err = (numeric - analytic[i]).abs() / numeric.abs().max(1e-2);
                assert!(
                    err < 1e-6,
                    "input {which} element {i}: {} vs {numeric}",
                    analytic[i]
                );
            }
        }
    }

    /// Without a tracked input the output is the plain value, with no node and no kept
    /// probabilities.
    #[test]
    fn untracked_inputs_make_no_node() {
        let [q, k, v, _] = inputs();
        let out = packed_attention_device(&q, &k, &v, &SEGMENTS).unwrap();
        assert!(!out.track_op());
        let want = packed_causal_attention_composed(&q, &k, &v, &SEGMENTS).unwrap();
        assert!(max_diff(&out, &want) < 1e-12);
    }
}
