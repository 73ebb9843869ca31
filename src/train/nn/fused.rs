//! CPU kernels for the per-row ops of the decoder (rotary embedding, causal softmax; RMSNorm in
//! `rms_norm`), each one pass over memory with a hand-written backward, and the row-parallel
//! helpers they share.
//!
//! candle's own fused kernels for these cut the gradient, and composing them from tensor ops
//! costs a dozen passes and fresh buffers per call; a checkpointed step runs every one three
//! times (forward, recompute, backward). The callers in `ops` fall back to the composed form on
//! other devices, and the tests below hold each kernel to it, values and gradients.
//!
//! Shapes: rows of C elements; N tokens, H heads, D head dim, T sequence length.

pub(crate) use super::real::Real;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use std::mem::MaybeUninit;

/// The contiguous elements of a storage under its layout.
pub(super) fn elems<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("fused kernel: contiguous input expected"),
    }
}

/// Fills `out` block by block of whole rows, `f(first_row, block)`, one block per CPU thread when
/// there is enough work to pay for starting them.
pub(super) fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let threads = super::threads::count().min(rows).max(1);
    if threads == 1 || out.len() < 1 << 15 {
        return f(0, out);
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let mut blocks = out.chunks_mut(per * row_len).enumerate();
        let first = blocks.next();
        for (i, block) in blocks {
            let f = &f;
            scope.spawn(move || f(i * per, block));
        }
        if let Some((_, block)) = first {
            f(0, block);
        }
    });
}

/// A vector of `len` elements written by [`par_rows`] over its uninitialized buffer: the kernels
/// write every output element, so zero-filling the buffer first (a pass over megabytes per call)
/// would be wasted.
///
/// # Safety
/// `f(first_row, block)` writes every element of `block`.
pub(super) unsafe fn par_rows_written<T: Send>(
    len: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    par_rows(&mut out.spare_capacity_mut()[..len], row_len, f);
    // SAFETY: `f` wrote all `len` elements (the caller's promise).
    unsafe { out.set_len(len) };
    out
}

/// Runs `$f::<T>` for the f32 or f64 storage `$s`, passing the remaining arguments through.
macro_rules! by_dtype {
    ($name:expr, $s:expr, $f:ident($($arg:expr),*)) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("{}: f32 or f64 expected", $name),
        }
    };
}
pub(super) use by_dtype;

// ---------------------------------------------------------------------------------------------
// Rotary embedding, half-split layout: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin). Its
// backward is the inverse rotation, the same kernel with −sin.

/// `x (N, H, D)`, `cos`/`sin (N, D/2)` f32 at each token's position -> `(N, H, D)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        inverse: false,
    })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

fn rope_fwd<T: WithDType>(
    x: &CpuStorage,
    xl: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<(CpuStorage, Shape)> {
    let (n, h, d) = xl.shape().dims3()?;
    let half = d / 2;
    if cos.dims() != [n, half] || sin.dims() != [n, half] {
        candle_core::bail!("rope: tables must be ({n}, {half}), got {:?}", cos.dims())
    }
    let (cos, sin) = (
        cos.flatten_all()?.to_vec1::<f32>()?,
        sin.flatten_all()?.to_vec1::<f32>()?,
    );
    let y = rope_rows(elems::<T>(x, xl)?, (h, d), &cos, &sin, inverse);
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

/// Rotary embedding of `x (N, H, D)` with `cos`/`sin (N, D/2)`; `inverse` rotates back (the
/// backward).
pub(super) fn rope_rows<T: WithDType>(
    x: &[T],
    (h, d): (usize, usize),
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) -> Vec<T> {
    // An odd head dimension would leave each head's last output element unwritten.
    assert!(d % 2 == 0, "rotary: odd head dimension {d}");
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    // SAFETY: each token's rows are written whole, both halves of every head.
    unsafe {
        par_rows_written(x.len(), h * d, |t0, ys| {
            for (i, yt) in ys.chunks_mut(h * d).enumerate() {
                let t = t0 + i;
                let (ct, st) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                for (head, yh) in yt.chunks_mut(d).enumerate() {
                    let xh = &x[(t * h + head) * d..][..d];
                    for j in 0..half {
                        let (c, s) = (T::from_f64(ct[j] as f64), T::from_f64(sign * st[j] as f64));
                        let (x1, x2) = (xh[j], xh[j + half]);
                        yh[j].write(x1 * c - x2 * s);
                        yh[j + half].write(x2 * c + x1 * s);
                    }
                }
            }
        })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(
            self.name(),
            s,
            rope_fwd(s, l, &self.cos, &self.sin, self.inverse)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_launch::rope(s, l, &self.cos, &self.sin, self.inverse)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax over the last axis of `(..., T, T)` scores: row i sees columns 0..=i, the rest
// are exactly 0. Backward: dx = y ⊙ (g − Σ g⊙y), which is 0 wherever y is.

/// `scores (..., T, T)` -> causal softmax probabilities of `scale · scores`, `(..., T, T)`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// [`causal_softmax`]'s value, with no graph node (for a node with its own backward).
pub fn causal_softmax_value(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op1_no_bwd(&CausalSoftmax { scale })
}

/// The gradient of `scores` from the probabilities `y = causal_softmax(scores, scale)` and their
/// gradient `g`: `scale · y ⊙ (g − rowsum(g ⊙ y))`, with no graph node.
pub fn causal_softmax_grad(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale })
}

struct CausalSoftmax {
    scale: f64,
}

fn causal_softmax_fwd<T: Real>(
    x: &CpuStorage,
    xl: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let t = xl.dims().last().copied().unwrap_or(0);
    let x = elems::<T>(x, xl)?;
    let scale = T::from_f64(scale);
    let mut y = vec![T::zero(); x.len()];
    par_rows(&mut y, t, |r0, ys| {
        for (i, yr) in ys.chunks_mut(t).enumerate() {
            let r = r0 + i;
            let seen = r % t + 1;
            let xs = &x[r * t..][..seen];
            let max = xs
                .iter()
                .copied()
                .fold(xs[0], |m, v| if v > m { v } else { m });
            for (yv, &xv) in yr[..seen].iter_mut().zip(xs) {
                *yv = ((xv - max) * scale).exp();
            }
            let inv = T::from_f64(1.0 / T::sum(&yr[..seen]));
            yr[..seen].iter_mut().for_each(|v| *v *= inv);
        }
    });
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(self.name(), s, causal_softmax_fwd(s, l, self.scale))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_launch::causal_softmax(s, l, self.scale)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(causal_softmax_grad(y, g, self.scale)?))
    }
}

/// `dx = scale · y ⊙ (g − Σ g⊙y)`, row by row.
struct SoftmaxGrad {
    scale: f64,
}

fn softmax_bwd<T: WithDType>(
    y: &CpuStorage,
    yl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let t = yl.dims().last().copied().unwrap_or(0);
    let (y, g) = (elems::<T>(y, yl)?, elems::<T>(g, gl)?);
    let scale = T::from_f64(scale);
    let mut dx = vec![T::zero(); y.len()];
    par_rows(&mut dx, t, |r0, dxs| {
        for (i, dr) in dxs.chunks_mut(t).enumerate() {
            let (ys, gs) = (&y[(r0 + i) * t..][..t], &g[(r0 + i) * t..][..t]);
            let dot: f64 = ys
                .iter()
                .zip(gs)
                .map(|(a, b)| a.to_f64() * b.to_f64())
                .sum();
            let dot = T::from_f64(dot);
            for ((d, &a), &b) in dr.iter_mut().zip(ys).zip(gs) {
                *d = scale * a * (b - dot);
            }
        }
    });
    Ok((T::to_cpu_storage_owned(dx), yl.shape().clone()))
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        yl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(self.name(), y, softmax_bwd(y, yl, g, gl, self.scale))
    }

    /// Only the seen columns (on and below the diagonal) are read: `y` is 0 above it.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_launch::causal_softmax_grad(y, yl, g, gl, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::ops;
    use crate::train::nn::testing::check_fused;
    use candle_core::{DType, Device};

    #[test]
    fn rope_equals_composed_ops_with_gradient() {
        let dev = Device::Cpu;
        let (cos, sin) = ops::rope_tables(8, 32, 10000.0, &dev).unwrap();
        let pos = Tensor::new(&[3u32, 0, 1, 2, 9, 31], &dev).unwrap();
        let (cos, sin) = (
            cos.index_select(&pos, 0).unwrap(),
            sin.index_select(&pos, 0).unwrap(),
        );
        for dtype in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f64, 1., (6, 4, 8), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            check_fused(
                |x| rope(x, &cos, &sin),
                |x| ops::rope_composed(x, &cos, &sin),
                &x,
                1e-5,
            );
        }
    }

    #[test]
    fn causal_softmax_equals_masked_softmax_with_gradient() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f64, 3., (2, 3, 7, 7), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            check_fused(
                |x| causal_softmax(x, 0.3),
                |x| ops::causal_softmax_composed(x, 0.3),
                &x,
                tol,
            );
            // Above the diagonal is exactly zero.
            let y = causal_softmax(&x, 0.3)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            assert_eq!(
                y.get(1)
                    .unwrap()
                    .get(2)
                    .unwrap()
                    .get(3)
                    .unwrap()
                    .get(4)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                0.0
            );
        }
    }
}
