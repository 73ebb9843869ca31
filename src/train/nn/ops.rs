//! Differentiable forms of the ops whose fused candle kernels silently cut the gradient
//! (rms_norm, softmax, rope): our one-pass kernels from `fused` on the CPU and, through their
//! CUDA kernels, on a GPU; composed tensor ops elsewhere (other dtypes, kernels turned off);
//! causal attention over packed sequences; the LM-head cross-entropy.
//!
//! Shapes: N packed tokens, Hq query heads, Hkv key/value heads, G = Hq/Hkv, D head dim, T one
//! sequence's length.

use super::attention_device::causal_mask;
use super::cuda_kernels::fused_kernels;
use super::fused::{self, Real};
use candle_core::{DType, Result, Tensor, D};

/// The precision reductions run in: f32, or f64 when the model itself is f64 (gradient checks).
pub fn upcast(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last axis, computed in f32: `x / √(mean(x²) + eps) · w`, `w` frozen.
/// `x (..., C)`, `w (C,)` -> `(..., C)` in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_kernels(x) {
        return super::rms_norm::rms_norm(x, w, eps);
    }
    rms_norm_composed(x, w, eps)
}

/// [`rms_norm`] from tensor ops (other devices; the fused kernel's test oracle).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(upcast(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.broadcast_mul(&w.to_dtype(upcast(dtype))?)?
        .to_dtype(dtype)
}

/// Softmax over the last axis in f32. The row max is detached: it cancels mathematically, and
/// leaving it out of the graph saves a backward pass through `max`.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(upcast(x.dtype()))?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary embedding, half-split (GPT-NeoX) layout as in HF Qwen3.
/// `x (N, H, D)`, `cos`/`sin (N, D/2)` gathered at each token's position.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_kernels(x) {
        return fused::rope(x, cos, sin);
    }
    rope_composed(x, cos, sin)
}

/// [`rope`] from tensor ops (other devices; the fused kernel's test oracle).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, d) = x.dims3()?;
    let half = d / 2;
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?; // (N, 1, D/2)
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], 2)
}

/// cos/sin tables `(max_pos, D/2)` for `theta`, in f32.
pub fn rope_tables(
    head_dim: usize,
    max_pos: usize,
    theta: f64,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), dev)?;
    let pos = Tensor::arange(0u32, max_pos as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((max_pos, 1))?;
    let freqs = pos.broadcast_mul(&inv)?; // (max_pos, D/2)
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Causal self-attention run separately on each packed sequence, so no token attends across a
/// sequence boundary and no padding is ever computed.
/// `q (N, Hq, D)`, `k`/`v (N, Hkv, D)`, `segments`: (start, len) per sequence -> `(N, Hq·D)`.
pub fn packed_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
) -> Result<Tensor> {
    if super::attention::packed_attention_usable(q, k, v) {
        return super::attention::packed_attention(q, k, v, segments);
    }
    super::attention_device::packed_attention_device(q, k, v, segments)
}

/// [`packed_causal_attention`] op by op, each with its own autograd node (the test oracle of
/// both the CPU op and the device op).
pub fn packed_causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
) -> Result<Tensor> {
    let (n, hq, d) = q.dims3()?;
    let hkv = k.dim(1)?;
    let g = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = Vec::with_capacity(segments.len());
    for &(start, t) in segments {
        // (T, Hq, D) -> (Hkv, G·T, D): query head h = kv·G + g shares key/value head kv.
        let qs = q
            .narrow(0, start, t)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((hkv, g * t, d))?;
        let ks = k.narrow(0, start, t)?.transpose(0, 1)?.contiguous()?; // (Hkv, T, D)
        let vs = v.narrow(0, start, t)?.transpose(0, 1)?.contiguous()?; // (Hkv, T, D)
                                                                        // (Hkv, G·T, D) @ (Hkv, D, T) -> (Hkv, G·T, T)
        let scores = qs.matmul(&ks.t()?)?.reshape((hkv, g, t, t))?;
        let p = causal_softmax(&scores, scale)?.to_dtype(vs.dtype())?;
        // (Hkv, G·T, T) @ (Hkv, T, D) -> (Hkv, G·T, D) -> (Hq, T, D) -> (T, Hq·D)
        let o = p.reshape((hkv, g * t, t))?.matmul(&vs)?;
        let o = o
            .reshape((hq, t, d))?
            .transpose(0, 1)?
            .reshape((t, hq * d))?;
        outs.push(o);
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one segment")
    } else {
        Tensor::cat(&outs, 0)?
    };
    debug_assert_eq!(out.dim(0)?, n);
    Ok(out)
}

/// Softmax of `scale · scores` over the last axis of `scores (..., T, T)`, row i seeing columns
/// 0..=i only.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_kernels(scores) {
        return fused::causal_softmax(scores, scale);
    }
    causal_softmax_composed(scores, scale)
}

/// [`causal_softmax`] from tensor ops: scale, an additive -inf mask, then [`softmax_last`].
pub fn causal_softmax_composed(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let mask = causal_mask(t, scores.device(), scores.dtype())?;
    softmax_last(&(scores * scale)?.broadcast_add(&mask)?)
}

/// Loss sum and correct-argmax count of one chunk of label positions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct XentStats {
    pub loss_sum: f64,
    pub correct: u64,
}

/// Token cross-entropy fused with its own gradient. `logits (C, V)`, `targets (C,)` u32.
/// Returns the summed loss, the argmax hits and, with `grad_scale = Some(s)`, the gradient of
/// `s · Σ loss` with respect to the logits, `s · (softmax − onehot)`, as a `(C, V)` tensor.
///
/// Why not autograd: the decomposed graph (max, sub, exp, sum, log, gather and their backward)
/// allocates and walks about ten `(C, V)` temporaries per chunk, and at a 151936-token vocabulary
/// those passes cost as much as the LM-head GEMMs. On CPU this walks each row three times in place
/// and the returned gradient is the logits' own buffer.
pub fn softmax_xent(
    logits: Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<(XentStats, Option<Tensor>)> {
    let logits = logits.detach().to_dtype(upcast(logits.dtype()))?;
    if super::cpu_kernels::serve(logits.device()) {
        let op = XentCpu {
            targets: targets.to_vec1::<u32>()?,
            grad_scale,
            stats: std::sync::Mutex::new(XentStats::default()),
        };
        let logits = logits.contiguous()?;
        logits.inplace_op1(&op)?;
        let stats = *op.stats.lock().expect("xent stats");
        return Ok((stats, grad_scale.map(|_| logits)));
    }
    softmax_xent_ops(&logits, targets, grad_scale)
}

/// [`softmax_xent`] from tensor ops, for devices without the fused kernel (and as its test oracle).
pub fn softmax_xent_ops(
    logits: &Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<(XentStats, Option<Tensor>)> {
    let logits = logits.to_dtype(upcast(logits.dtype()))?;
    let (c, v) = logits.dims2()?;
    let m = logits.max_keepdim(D::Minus1)?; // (C, 1)
    let e = logits.broadcast_sub(&m)?.exp()?; // (C, V)
    let sum = e.sum_keepdim(D::Minus1)?; // (C, 1)
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?; // (C, 1)
    let loss = ((sum.log()? + m)? - picked)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let correct = logits
        .argmax(D::Minus1)?
        .eq(targets)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as u64;
    let grad = match grad_scale {
        None => None,
        Some(s) => {
            let onehot = Tensor::zeros((c, v), logits.dtype(), logits.device())?.scatter_add(
                &targets.unsqueeze(1)?,
                &Tensor::ones((c, 1), logits.dtype(), logits.device())?,
                1,
            )?;
            Some(((e.broadcast_div(&sum)? - onehot)? * s)?)
        }
    };
    let stats = XentStats {
        loss_sum: loss,
        correct,
    };
    Ok((stats, grad))
}

struct XentCpu {
    targets: Vec<u32>,
    grad_scale: Option<f64>,
    stats: std::sync::Mutex<XentStats>,
}

impl candle_core::InplaceOp1 for XentCpu {
    fn name(&self) -> &'static str {
        "softmax-xent"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        use candle_core::CpuStorage;
        let (c, v) = l.shape().dims2()?;
        if !l.is_contiguous() || c != self.targets.len() {
            candle_core::bail!("softmax-xent: contiguous (C, V) logits and C targets expected")
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("softmax-xent: target {t} outside the vocabulary of {v}")
        }
        let o = l.start_offset();
        let stats = match s {
            CpuStorage::F32(x) => {
                xent_rows(&mut x[o..o + c * v], v, &self.targets, self.grad_scale)
            }
            CpuStorage::F64(x) => {
                xent_rows(&mut x[o..o + c * v], v, &self.targets, self.grad_scale)
            }
            _ => candle_core::bail!("softmax-xent: f32 or f64 logits expected"),
        };
        *self.stats.lock().expect("xent stats") = stats;
        Ok(())
    }
}

/// Splits the rows `x (C, V)` over candle's CPU threads.
fn xent_rows<T: Real + Send>(
    x: &mut [T],
    v: usize,
    targets: &[u32],
    scale: Option<f64>,
) -> XentStats {
    let threads = super::threads::count().clamp(1, targets.len().max(1));
    let per = targets.len().div_ceil(threads).max(1);
    let part = |(rows, tg): (&mut [T], &[u32])| {
        let mut st = XentStats::default();
        for (row, &t) in rows.chunks_mut(v).zip(tg) {
            let (loss, hit) = xent_row(row, t as usize, scale);
            st.loss_sum += loss;
            st.correct += hit as u64;
        }
        st
    };
    let parts: Vec<XentStats> = std::thread::scope(|sc| {
        let handles: Vec<_> = x
            .chunks_mut(per * v)
            .zip(targets.chunks(per))
            .map(|job| sc.spawn(move || part(job)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("xent worker"))
            .collect()
    });
    parts.iter().fold(XentStats::default(), |a, p| XentStats {
        loss_sum: a.loss_sum + p.loss_sum,
        correct: a.correct + p.correct,
    })
}

/// One row: returns `(lse − x[t], argmax == t)`; with `scale`, rewrites the row as
/// `scale · (softmax − onehot(t))`. A NaN anywhere in the row makes the loss NaN.
fn xent_row<T: Real>(row: &mut [T], t: usize, scale: Option<f64>) -> (f64, bool) {
    let max = T::max_of(row);
    let arg = row.iter().position(|&v| v == max).unwrap_or(0);
    let picked = row[t].to_f64();
    // In place: the logits buffer is ours, and the gradient is built in it.
    let sum = T::exp_shifted(row, max, T::one());
    if let Some(s) = scale {
        let k = T::from_f64(s / sum);
        row.iter_mut().for_each(|x| *x *= k);
        row[t] -= T::from_f64(s);
    }
    (sum.ln() + max.to_f64() - picked, arg == t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_xent_equals_tensor_ops() {
        let dev = Device::Cpu;
        let logits = (Tensor::randn(0f32, 3., (9, 50), &dev).unwrap())
            .contiguous()
            .unwrap();
        let targets = Tensor::new(&[0u32, 49, 3, 3, 17, 25, 8, 1, 40], &dev).unwrap();
        for scale in [None, Some(0.25)] {
            let (want, want_g) = softmax_xent_ops(&logits, &targets, scale).unwrap();
            let (got, got_g) = softmax_xent(logits.copy().unwrap(), &targets, scale).unwrap();
            assert!((want.loss_sum - got.loss_sum).abs() < 1e-4 * want.loss_sum.abs());
            assert_eq!(want.correct, got.correct);
            if let (Some(w), Some(g)) = (want_g, got_g) {
                let diff = (w - g).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
            }
        }
        // The hits: make every row's argmax its target.
        let peaked = candle_nn::encoding::one_hot(targets.clone(), 50, 100f32, 0f32).unwrap();
        let (s, _) = softmax_xent(peaked, &targets, None).unwrap();
        assert_eq!(s.correct, 9);
    }

    #[test]
    fn softmax_matches_candle_and_keeps_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 7), &dev).unwrap()).unwrap();
        let ours = softmax_last(x.as_tensor()).unwrap();
        let theirs = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
        let diff = (ours.clone() - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let w = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
        let g = (ours * w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some());
    }

    #[test]
    fn rope_matches_candle_rope_slow() {
        let dev = Device::Cpu;
        let (cos, sin) = rope_tables(8, 16, 10000.0, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (5, 2, 8), &dev).unwrap(); // (N, H, D)
        let pos = Tensor::new(&[0u32, 1, 2, 3, 4], &dev).unwrap();
        let ours = rope(
            &x,
            &cos.index_select(&pos, 0).unwrap(),
            &sin.index_select(&pos, 0).unwrap(),
        )
        .unwrap();
        // candle's reference takes (B, H, T, D) and (T, D/2) tables.
        let xb = x
            .transpose(0, 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .contiguous()
            .unwrap();
        let theirs = candle_nn::rotary_emb::rope_slow(
            &xb,
            &cos.narrow(0, 0, 5).unwrap(),
            &sin.narrow(0, 0, 5).unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .transpose(0, 1)
        .unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn rms_norm_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (4, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 6, &dev).unwrap();
        let ours = rms_norm(&x, &w, 1e-6).unwrap();
        let theirs = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn cached_causal_mask_is_exact_at_every_length() {
        let dev = Device::Cpu;
        for t in [5usize, 3, 300, 7] {
            let m = causal_mask(t, &dev, DType::F32).unwrap();
            assert_eq!(m.dims(), [t, t]);
            let rows = m.to_vec2::<f32>().unwrap();
            for (i, row) in rows.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    assert_eq!(v == f32::NEG_INFINITY, j > i, "t={t} ({i},{j})");
                    assert!(v == 0.0 || j > i);
                }
            }
        }
        // The composed causal softmax on a view of the cache equals the fused kernel.
        let scores = Tensor::randn(0f32, 1., (2, 3, 9, 9), &dev).unwrap();
        let a = causal_softmax_composed(&scores, 0.5).unwrap();
        let b = fused::causal_softmax(&scores, 0.5).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn packed_attention_equals_separate_sequences() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (7, 4, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (7, 2, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (7, 2, 8), &dev).unwrap();
        let packed = packed_causal_attention(&q, &k, &v, &[(0, 3), (3, 4)]).unwrap();
        let second = packed_causal_attention(
            &q.narrow(0, 3, 4).unwrap(),
            &k.narrow(0, 3, 4).unwrap(),
            &v.narrow(0, 3, 4).unwrap(),
            &[(0, 4)],
        )
        .unwrap();
        let diff = (packed.narrow(0, 3, 4).unwrap() - second)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
