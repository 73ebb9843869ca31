//! Differentiable forms of the ops whose fused candle kernels silently cut the gradient
//! (rms_norm, softmax_last_dim, rope), and causal attention over packed sequences.
//!
//! Shapes: N packed tokens, Hq query heads, Hkv key/value heads, G = Hq/Hkv, D head dim, T one
//! sequence's length.

use candle_core::{DType, Result, Tensor, D};

/// The precision reductions run in: f32, or f64 when the model itself is f64 (gradient checks).
pub fn upcast(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last axis, computed in f32: `x / √(mean(x²) + eps) · w`.
/// `x (..., C)`, `w (C,)` -> `(..., C)` in x's dtype.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
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
        let scores = (qs.matmul(&ks.t()?)? * scale)?;
        let scores = scores
            .reshape((hkv, g, t, t))?
            .broadcast_add(&causal_mask(t, q.device())?.to_dtype(scores.dtype())?)?;
        let p = softmax_last(&scores)?.to_dtype(vs.dtype())?;
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

/// `(T, T)` additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// Sum of token cross-entropies and count of correct argmaxes for one chunk.
/// `logits (C, V)` f32, `targets (C,)` u32 -> (scalar loss sum, correct count).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, u64)> {
    let logits = logits.to_dtype(upcast(logits.dtype()))?;
    let m = logits.max_keepdim(D::Minus1)?.detach(); // (C, 1)
    let lse = logits
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)?; // (C, 1)
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?; // (C, 1)
    let loss = (lse - picked)?.sum_all()?.to_dtype(DType::F64)?;
    let correct = logits
        .detach()
        .argmax(D::Minus1)?
        .eq(targets)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as u64;
    Ok((loss, correct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
