//! The SwiGLU gate `silu(gate) ⊙ up` as one CPU pass, with a backward that writes both input
//! gradients in one pass.
//!
//! Composed, it is candle's silu (one pass, and a graph node keeping `silu(gate)`) then a multiply
//! (another pass), and its backward is about six elementwise passes with their buffers. Here the
//! graph keeps only `gate` and `up`.
//!
//! Shapes: N tokens, F intermediate features; `gate` and `up` are `(N, F)`.

use super::fused::{par_rows_written, Real};
use super::real::{dispatched, Isa};
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

/// `silu(gate) ⊙ up`, by the one-pass kernel where it serves, else by candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if silu_mul_usable(gate, up) {
        return silu_mul(gate, up);
    }
    gate.silu()? * up
}

/// `silu(gate) ⊙ up`; CPU or GPU, f32 or f64, both of one dtype and shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

/// Whether [`silu_mul`] serves these operands.
pub fn silu_mul_usable(gate: &Tensor, up: &Tensor) -> bool {
    let kernels = super::cpu_kernels::serve(gate.device())
        && matches!(
            gate.dtype(),
            candle_core::DType::F32 | candle_core::DType::F64
        );
    (kernels || super::cuda_kernels::serve(gate))
        && up.dtype() == gate.dtype()
        && up.shape() == gate.shape()
}

struct SiluMul;

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (T::zero() - x).exp())
}

fn elems<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("silu-mul: contiguous input expected"),
    }
}

/// Below this many elements the backward runs on the calling thread: starting threads costs more.
const PAR_MIN: usize = 1 << 16;

/// Runs `f(offset, chunk_a, chunk_b)` over matching chunks of `a` and `b`, one per thread.
fn par_chunks2<T: Send>(a: &mut [T], b: &mut [T], f: impl Fn(usize, &mut [T], &mut [T]) + Sync) {
    let threads = super::threads::count();
    if threads == 1 || a.len() < PAR_MIN {
        return f(0, a, b);
    }
    let per = a.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = a.chunks_mut(per).zip(b.chunks_mut(per)).enumerate();
        let first = parts.next();
        for (k, (ca, cb)) in parts {
            let f = &f;
            scope.spawn(move || f(k * per, ca, cb));
        }
        if let Some((_, (ca, cb))) = first {
            f(0, ca, cb);
        }
    });
}

pub(super) fn fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    // Every output element is written below (so the buffer is not zero-filled first) only if
    // the operands are as long as each other.
    assert_eq!(u.len(), g.len(), "silu-mul: gate and up lengths differ");
    // SAFETY: fwd_span writes every element of its block (g and u are as long as the output).
    unsafe {
        par_rows_written(g.len(), 1, |off, ys| {
            fwd_span(Isa::detected(), &g[off..], &u[off..], ys)
        })
    }
}

/// `(d gate, d up)` for the output gradient `dy`.
pub(super) fn bwd<T: Real>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    assert!(
        u.len() == g.len() && dy.len() == g.len(),
        "silu-mul: lengths differ"
    );
    let (mut dg, mut du) = (Vec::with_capacity(g.len()), Vec::with_capacity(g.len()));
    par_chunks2(
        &mut dg.spare_capacity_mut()[..g.len()],
        &mut du.spare_capacity_mut()[..g.len()],
        |off, dgs, dus| bwd_span(Isa::detected(), &g[off..], &u[off..], &dy[off..], dgs, dus),
    );
    // SAFETY: bwd_span wrote every element of both, the parts covering g.len().
    unsafe {
        dg.set_len(g.len());
        du.set_len(g.len());
    }
    (dg, du)
}

dispatched! {
    /// `ys[k] = silu(g[k])·u[k]` (with the exponential's polynomial inlined the loop is
    /// arithmetic-bound, and the baseline build runs it four f32 lanes wide).
    fn fwd_span<T: Real>(g: &[T], u: &[T], ys: &mut [MaybeUninit<T>]) = fwd_lanes
}

#[inline(always)]
fn fwd_lanes<T: Real>(g: &[T], u: &[T], ys: &mut [MaybeUninit<T>]) {
    for ((y, &g), &u) in ys.iter_mut().zip(g).zip(u) {
        y.write(g * sigmoid(g) * u);
    }
}

dispatched! {
    /// `dgs[k], dus[k]`: the gate and up gradients for the output gradient `dy[k]`.
    fn bwd_span<T: Real>(
        g: &[T],
        u: &[T],
        dy: &[T],
        dgs: &mut [MaybeUninit<T>],
        dus: &mut [MaybeUninit<T>],
    ) = bwd_lanes
}

#[inline(always)]
fn bwd_lanes<T: Real>(
    g: &[T],
    u: &[T],
    dy: &[T],
    dgs: &mut [MaybeUninit<T>],
    dus: &mut [MaybeUninit<T>],
) {
    for (k, (dg, du)) in dgs.iter_mut().zip(dus.iter_mut()).enumerate() {
        let s = sigmoid(g[k]);
        let silu = g[k] * s;
        // d silu / dg = s · (1 + g · (1 − s))
        dg.write(dy[k] * u[k] * s * (T::one() + g[k] * (T::one() - s)));
        du.write(dy[k] * silu);
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ",
                gl.dims(),
                ul.dims()
            )
        }
        let y = match gs {
            CpuStorage::F32(_) => CpuStorage::F32(fwd::<f32>(elems(gs, gl)?, elems(us, ul)?)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd::<f64>(elems(gs, gl)?, elems(us, ul)?)),
            _ => candle_core::bail!("silu-mul: f32 or f64 expected"),
        };
        Ok((y, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda_launch::silu_mul(gs, gl, us, ul)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if gate.device().is_cuda() {
            let (dg, du) = super::cuda_launch::silu_mul_grad(gate, up, dy)?;
            return Ok((Some(dg), Some(du)));
        }
        let dy = dy.contiguous()?;
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (
            candle_core::Storage::Cpu(gs),
            candle_core::Storage::Cpu(us),
            candle_core::Storage::Cpu(ds),
        ) = (&*gs, &*us, &*ds)
        else {
            candle_core::bail!("silu-mul: CPU tensors expected")
        };
        let dev = Device::Cpu;
        let shape = gate.shape();
        let (dg, du) = match gs {
            CpuStorage::F32(_) => {
                let (a, b) = bwd::<f32>(elems(gs, gl)?, elems(us, ul)?, elems(ds, dl)?);
                (
                    Tensor::from_vec(a, shape, &dev)?,
                    Tensor::from_vec(b, shape, &dev)?,
                )
            }
            CpuStorage::F64(_) => {
                let (a, b) = bwd::<f64>(elems(gs, gl)?, elems(us, ul)?, elems(ds, dl)?);
                (
                    Tensor::from_vec(a, shape, &dev)?,
                    Tensor::from_vec(b, shape, &dev)?,
                )
            }
            _ => candle_core::bail!("silu-mul: f32 or f64 expected"),
        };
        Ok((Some(dg), Some(du)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::testing::check_fused_inputs;
    use candle_core::DType;

    /// Fused and composed (`gate.silu() * up`) agree in value and in both gradients; the larger
    /// size runs the threaded path.
    fn check(dtype: DType, n: usize, tol: f64) {
        let dev = Device::Cpu;
        let rnd = || {
            (Tensor::randn(0f64, 3., (n, 37), &dev).unwrap())
                .to_dtype(dtype)
                .unwrap()
        };
        let (g0, u0, cot) = (rnd(), rnd(), rnd());
        check_fused_inputs(
            |fused, x| {
                if fused {
                    silu_mul(x[0], x[1])
                } else {
                    x[0].silu()? * x[1]
                }
            },
            &[&g0, &u0],
            &cot,
            &["y", "dgate", "dup"],
            tol,
            format_args!("{dtype:?}, n {n}"),
        );
    }

    #[test]
    fn silu_mul_equals_composed_ops_with_gradients() {
        for n in [3, 4000] {
            check(DType::F32, n, 1e-4);
            check(DType::F64, n, 1e-12);
        }
    }

    /// The spans compiled for each instruction set this CPU runs give exactly what the baseline
    /// loops give.
    #[test]
    fn dispatched_spans_equal_the_baseline_loops() {
        let n = 203;
        let vals = |seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + seed) * 0.377).sin() * 6.0)
                .collect()
        };
        let (g, u, dy) = (vals(0.0), vals(3.0), vals(7.0));
        let init = || vec![MaybeUninit::new(f32::NAN); n];
        // SAFETY: every element initialized by `init` (and overwritten by the span).
        let read = |v: &[MaybeUninit<f32>]| -> Vec<f32> {
            v.iter().map(|x| unsafe { x.assume_init() }).collect()
        };
        let mut y_base = init();
        fwd_lanes(&g, &u, &mut y_base);
        let (mut dg_base, mut du_base) = (init(), init());
        bwd_lanes(&g, &u, &dy, &mut dg_base, &mut du_base);
        for isa in Isa::each() {
            let mut y = init();
            fwd_span(isa, &g, &u, &mut y);
            assert_eq!(read(&y), read(&y_base), "{isa:?}");
            let (mut dg, mut du) = (init(), init());
            bwd_span(isa, &g, &u, &dy, &mut dg, &mut du);
            assert_eq!(read(&dg), read(&dg_base), "{isa:?}");
            assert_eq!(read(&du), read(&du_base), "{isa:?}");
        }
    }
}
