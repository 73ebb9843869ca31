//! CPU kernels for the per-row ops of the decoder (RMSNorm, rotary embedding, causal softmax),
//! each one pass over memory with a hand-written backward.
//!
//! candle's own fused kernels for these cut the gradient, and composing them from tensor ops
//! costs a dozen passes and fresh buffers per call; a checkpointed step runs every one three
//! times (forward, recompute, backward). The callers in `ops` fall back to the composed form on
//! other devices, and the tests below hold each kernel to it, values and gradients.
//!
//! Shapes: rows of C elements; N tokens, H heads, D head dim, T sequence length.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

/// The float types the kernels run in (f32 for training, f64 for gradient checks).
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The contiguous elements of a storage under its layout.
fn elems<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("fused kernel: contiguous input expected"),
    }
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

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = w ⊙ x·r, r = (mean(x²) + eps)^(-1/2), over rows of C = w.len().

/// `x (..., C)` -> `(..., C)`, with `w (C,)` frozen (it is captured, and gets no gradient).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let w = w.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op1(RmsNorm { w, eps })
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

/// `1/√(mean(x²) + eps)` of one row, accumulated in f64.
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> f64 {
    let ms = row.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>() / row.len() as f64;
    1.0 / (ms + eps).sqrt()
}

fn rms_norm_fwd<T: WithDType>(
    x: &CpuStorage,
    xl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = elems::<T>(x, xl)?;
    let w = w.to_vec1::<T>()?;
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(w.len()) {
        let r = T::from_f64(inv_rms(row, eps));
        y.extend(row.iter().zip(&w).map(|(&v, &wj)| wj * (v * r)));
    }
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(self.name(), s, rms_norm_fwd(s, l, &self.w, self.eps))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormGrad {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// `dx = r·(g⊙w) − (r³/C)·x·Σ(g⊙w⊙x)`, row by row.
struct RmsNormGrad {
    w: Tensor,
    eps: f64,
}

fn rms_norm_bwd<T: WithDType>(
    x: &CpuStorage,
    xl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (elems::<T>(x, xl)?, elems::<T>(g, gl)?);
    let w = w.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
    let c = w.len();
    let mut dx = Vec::with_capacity(x.len());
    for (xr, gr) in x.chunks(c).zip(g.chunks(c)) {
        let r = inv_rms(xr, eps);
        let dot: f64 = (0..c).map(|j| gr[j].to_f64() * w[j] * xr[j].to_f64()).sum();
        let k = r * r * r / c as f64 * dot;
        dx.extend((0..c).map(|j| T::from_f64(r * gr[j].to_f64() * w[j] - k * xr[j].to_f64())));
    }
    Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(
            self.name(),
            x,
            rms_norm_bwd(x, xl, g, gl, &self.w, self.eps)
        )
    }
}

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
    let x = elems::<T>(x, xl)?;
    let (cos, sin) = (
        cos.flatten_all()?.to_vec1::<f32>()?,
        sin.flatten_all()?.to_vec1::<f32>()?,
    );
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = vec![T::zero(); x.len()];
    for t in 0..n {
        let (ct, st) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for head in 0..h {
            let o = (t * h + head) * d;
            let (xs, ys) = (&x[o..o + d], &mut y[o..o + d]);
            for i in 0..half {
                let (c, s) = (T::from_f64(ct[i] as f64), T::from_f64(sign * st[i] as f64));
                let (x1, x2) = (xs[i], xs[i + half]);
                ys[i] = x1 * c - x2 * s;
                ys[i + half] = x2 * c + x1 * s;
            }
        }
    }
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
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

/// `scores (..., T, T)` -> causal softmax probabilities `(..., T, T)`.
pub fn causal_softmax(scores: &Tensor) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax)
}

struct CausalSoftmax;

fn causal_softmax_fwd<T: Real>(x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let t = xl.dims().last().copied().unwrap_or(0);
    let x = elems::<T>(x, xl)?;
    let mut y = vec![T::zero(); x.len()];
    for (r, (xs, ys)) in x.chunks(t).zip(y.chunks_mut(t)).enumerate() {
        let seen = r % t + 1;
        let max = xs[..seen]
            .iter()
            .copied()
            .fold(xs[0], |m, v| if v > m { v } else { m });
        let mut sum = 0f64;
        for (yv, &xv) in ys[..seen].iter_mut().zip(&xs[..seen]) {
            *yv = (xv - max).exp();
            sum += yv.to_f64();
        }
        let inv = T::from_f64(1.0 / sum);
        ys[..seen].iter_mut().for_each(|v| *v *= inv);
    }
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(self.name(), s, causal_softmax_fwd(s, l))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

fn softmax_bwd<T: WithDType>(
    y: &CpuStorage,
    yl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let t = yl.dims().last().copied().unwrap_or(0);
    let (y, g) = (elems::<T>(y, yl)?, elems::<T>(g, gl)?);
    let mut dx = Vec::with_capacity(y.len());
    for (ys, gs) in y.chunks(t).zip(g.chunks(t)) {
        let dot: f64 = ys
            .iter()
            .zip(gs)
            .map(|(a, b)| a.to_f64() * b.to_f64())
            .sum();
        let dot = T::from_f64(dot);
        dx.extend(ys.iter().zip(gs).map(|(&a, &b)| a * (b - dot)));
    }
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
        by_dtype!(self.name(), y, softmax_bwd(y, yl, g, gl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::ops;
    use candle_core::{DType, Device, Var};

    /// Value and input gradient of `Σ f(x)⊙cot` at `x`.
    fn value_and_grad(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        cot: &Tensor,
    ) -> (Tensor, Tensor) {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let g = (y.clone() * cot)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (y, g.get(&v).expect("gradient reaches x").clone())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Fused and composed forms agree in value and in gradient against one random cotangent.
    fn check(
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        composed: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        tol: f64,
    ) {
        let cot = Tensor::randn(0f64, 1., x.shape(), x.device())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap();
        let (y1, g1) = value_and_grad(fused, x, &cot);
        let (y2, g2) = value_and_grad(composed, x, &cot);
        assert!(
            max_diff(&y1, &y2) < tol,
            "values differ by {}",
            max_diff(&y1, &y2)
        );
        assert!(
            max_diff(&g1, &g2) < tol,
            "gradients differ by {}",
            max_diff(&g1, &g2)
        );
    }

    #[test]
    fn rms_norm_equals_composed_ops_with_gradient() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let x = Tensor::randn(0f64, 2., (5, 3, 16), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(1f64, 0.5, 16, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            check(
                |x| rms_norm(x, &w, 1e-6),
                |x| ops::rms_norm_composed(x, &w, 1e-6),
                &x,
                tol,
            );
        }
    }

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
            check(
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
            check(causal_softmax, ops::causal_softmax_composed, &x, tol);
            // Above the diagonal is exactly zero.
            let y = causal_softmax(&x).unwrap().to_dtype(DType::F64).unwrap();
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
