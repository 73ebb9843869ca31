//! RMSNorm on the CPU, `y = w ⊙ x·r` with `r = (mean(x²) + eps)^(-1/2)` over rows of C = w.len(),
//! one pass over memory with a hand-written backward (see `fused` for why). Row sums run in f64
//! (eight lanes), and each block of rows is compiled for AVX2 + FMA and AVX-512F too and picked at
//! run time (`real::dispatched`): the baseline x86-64 build adds f64 two lanes wide.
//!
//! Shapes: rows of C elements.

use super::fused::{by_dtype, elems, par_rows, par_rows_written};
use super::real::{dispatched, Isa};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use std::mem::MaybeUninit;

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
#[inline(always)]
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> f64 {
    let ms = sum_sq_f64(row) / row.len() as f64;
    1.0 / (ms + eps).sqrt()
}

/// `Σ row[j]²` in f64. The sums below run in eight lanes: one running sum would make each add
/// wait for the one before it (a row of a thousand elements, then, takes four thousand cycles),
/// and eight consecutive elements at a time become one vector add where the build allows.
#[inline(always)]
fn sum_sq_f64<T: WithDType>(row: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = row.chunks_exact(acc.len());
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v.to_f64() * v.to_f64();
        }
    }
    let rest: f64 = it.remainder().iter().map(|v| v.to_f64() * v.to_f64()).sum();
    rest + acc.iter().sum::<f64>()
}

/// `Σ g[j]·w[j]·x[j]` in f64, in eight lanes as [`sum_sq_f64`].
#[inline(always)]
fn dot3_f64<T: WithDType>(g: &[T], w: &[f64], x: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let (gs, ws, xs) = (g.chunks_exact(8), w.chunks_exact(8), x.chunks_exact(8));
    let rest = (gs
        .remainder()
        .iter()
        .zip(ws.remainder())
        .zip(xs.remainder()))
    .map(|((g, w), x)| g.to_f64() * w * x.to_f64())
    .sum::<f64>();
    for ((g, w), x) in gs.zip(ws).zip(xs) {
        for (((a, g), w), x) in acc.iter_mut().zip(g).zip(w).zip(x) {
            *a += g.to_f64() * w * x.to_f64();
        }
    }
    rest + acc.iter().sum::<f64>()
}

fn rms_norm_fwd<T: WithDType>(
    x: &CpuStorage,
    xl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let y = rms_rows(elems::<T>(x, xl)?, &w.to_vec1::<T>()?, eps);
    Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
}

/// RMSNorm of each row of C = `w.len()` elements of `x`.
pub(super) fn rms_rows<T: WithDType>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let c = w.len();
    // SAFETY: rms_block writes every element of its rows.
    unsafe {
        par_rows_written(x.len(), c, |r0, ys| {
            rms_block(Isa::detected(), &x[r0 * c..], w, eps, ys)
        })
    }
}

dispatched! {
    /// The rows of [`rms_rows`] that `ys` holds, `x` starting at the first of them.
    fn rms_block<T: WithDType>(x: &[T], w: &[T], eps: f64, ys: &mut [MaybeUninit<T>]) = rms_block_lanes
}

#[inline(always)]
fn rms_block_lanes<T: WithDType>(x: &[T], w: &[T], eps: f64, ys: &mut [MaybeUninit<T>]) {
    let c = w.len();
    for (yr, xr) in ys.chunks_mut(c).zip(x.chunks(c)) {
        let r = T::from_f64(inv_rms(xr, eps));
        for ((yv, &xv), &wj) in yr.iter_mut().zip(xr).zip(w) {
            yv.write(wj * (xv * r));
        }
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(self.name(), s, rms_norm_fwd(s, l, &self.w, self.eps))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_launch::rms_norm(s, l, &self.w, self.eps)
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
    let mut dx = vec![T::zero(); x.len()];
    rms_rows_bwd(x, g, &w, eps, &mut dx, false);
    Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
}

/// The input gradient of [`rms_rows`] for the output gradient `g`, written into `dx`, or added
/// to what `dx` holds when `accumulate` (a residual branch's gradient joining the stream's).
pub(super) fn rms_rows_bwd<T: WithDType>(
    x: &[T],
    g: &[T],
    w: &[f64],
    eps: f64,
    dx: &mut [T],
    accumulate: bool,
) {
    let c = w.len();
    par_rows(dx, c, |r0, dxs| {
        rms_bwd_block(
            Isa::detected(),
            &x[r0 * c..],
            &g[r0 * c..],
            w,
            eps,
            dxs,
            accumulate,
        )
    });
}

dispatched! {
    /// The rows of [`rms_rows_bwd`] that `dxs` holds, `x` and `g` starting at the first of them.
    fn rms_bwd_block<T: WithDType>(
        x: &[T],
        g: &[T],
        w: &[f64],
        eps: f64,
        dxs: &mut [T],
        acc: bool,
    ) = rms_bwd_lanes
}

#[inline(always)]
fn rms_bwd_lanes<T: WithDType>(x: &[T], g: &[T], w: &[f64], eps: f64, dxs: &mut [T], acc: bool) {
    let c = w.len();
    for ((dr, xr), gr) in dxs.chunks_mut(c).zip(x.chunks(c)).zip(g.chunks(c)) {
        let r = inv_rms(xr, eps);
        let dot = dot3_f64(gr, w, xr);
        let k = r * r * r / c as f64 * dot;
        let v = |j: usize| T::from_f64(r * gr[j].to_f64() * w[j] - k * xr[j].to_f64());
        if acc {
            for (j, d) in dr.iter_mut().enumerate() {
                *d += v(j);
            }
        } else {
            for (j, d) in dr.iter_mut().enumerate() {
                *d = v(j);
            }
        }
    }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_launch::rms_norm_grad(x, xl, g, gl, &self.w, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::ops;
    use crate::train::nn::testing::check_fused;
    use candle_core::{DType, Device};

    /// Rows of 16 (whole eight-lane blocks) and of 19 (a remainder after them), the larger
    /// shape split over threads.
    #[test]
    fn rms_norm_equals_composed_ops_with_gradient() {
        let dev = Device::Cpu;
        for (rows, c) in [(15, 16), (2000, 19)] {
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::randn(0f64, 2., (rows, c), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(1f64, 0.5, c, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                check_fused(
                    |x| rms_norm(x, &w, 1e-6),
                    |x| ops::rms_norm_composed(x, &w, 1e-6),
                    &x,
                    tol,
                );
            }
        }
    }

    /// The blocks compiled for each instruction set this CPU runs give exactly what the baseline
    /// loops give: the same operations in the same order, only wider.
    #[test]
    fn dispatched_blocks_equal_the_baseline_loops() {
        let (rows, c) = (7, 27);
        let vals = |seed: f32| -> Vec<f32> {
            (0..rows * c)
                .map(|i| ((i as f32 + seed) * 0.731).sin() * 3.0)
                .collect()
        };
        let (x, g) = (vals(0.0), vals(5.0));
        let w: Vec<f32> = (0..c).map(|j| 1.0 + 0.1 * j as f32).collect();
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let written = |f: &dyn Fn(&mut [MaybeUninit<f32>])| {
            let mut out = vec![MaybeUninit::new(f32::NAN); rows * c];
            f(&mut out);
            // SAFETY: initialized above (and overwritten by `f`).
            out.iter()
                .map(|v| unsafe { v.assume_init() })
                .collect::<Vec<_>>()
        };
        let fwd_base = written(&|ys| rms_block_lanes(&x, &w, 1e-6, ys));
        for isa in Isa::each() {
            let fwd = written(&|ys| rms_block(isa, &x, &w, 1e-6, ys));
            assert_eq!(fwd, fwd_base, "{isa:?}");
            for acc in [false, true] {
                let (mut dx, mut dx_base) = (g.clone(), g.clone());
                rms_bwd_block(isa, &x, &g, &w64, 1e-6, &mut dx, acc);
                rms_bwd_lanes(&x, &g, &w64, 1e-6, &mut dx_base, acc);
                assert_eq!(dx, dx_base, "{isa:?} accumulate {acc}");
            }
        }
    }
}
