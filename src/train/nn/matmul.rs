//! Direct calls into the `gemm` crate (the kernels behind candle's CPU matmul) for the fused ops:
//! strided operands read where they lie, results accumulated into an existing buffer, outputs
//! written without zero-filling them first, and the thread count chosen per call.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

pub(crate) use super::view::{Dst, SendPtr, View};

/// `dst (m, n) = β·lhs (m, k)·rhs (k, n)`, plus `dst`'s own values when it accumulates.
/// `threaded`: split this one product over candle's CPU threads (small products still run on
/// one).
///
/// The split is ours, not gemm's: gemm transposes a row-major product (`dstᵀ = rhsᵀ·lhsᵀ`) and
/// then hands each thread a share of `dst`'s rows, so every thread packs the whole of `rhs` (in
/// a layer, the frozen weight) into its own buffer. Here the product is cut into bands of
/// `dst`'s columns (rows when there are too few columns, or when `dst` is far taller than wide),
/// a few per thread, and each band runs gemm on one thread, so each packs only its band of the
/// weight, no thread waits on another between gemm's blocks, and a thread that finishes early
/// takes the next band.
///
/// # Safety
/// `dst` addresses m rows of n elements (initialized when it accumulates), the views address
/// m×k and k×n matrices inside live buffers, and `T` is f32 or f64.
pub(crate) unsafe fn gemm_into<T: WithDType>(
    dst: Dst<T>,
    (m, n, k): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
    threaded: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !dst.accumulate {
            for i in 0..m {
                // All-zero bits are 0.0 for f32 and f64.
                std::ptr::write_bytes(dst.ptr.add(i * dst.rs), 0, n);
            }
        }
        return;
    }
    let threads = if threaded { super::threads::count() } else { 1 };
    if threads > 1 && m * n * k >= SPLIT_MIN_WORK {
        // Columns share lhs between the parts, rows share rhs: split the side whose shared
        // operand is the smaller, unless that side is too short to split.
        let tall = m >= SPLIT_TALL * n;
        let split = if n >= SPLIT_MIN_SIDE * threads && !(tall && m >= SPLIT_MIN_SIDE * threads) {
            Some((n, true))
        } else if m >= SPLIT_MIN_SIDE * threads {
            Some((m, false))
        } else {
            None
        };
        if let Some((side, columns)) = split {
            let per = side
                .div_ceil(threads * SPLIT_PARTS_PER_THREAD)
                .max(SPLIT_MIN_SIDE)
                .next_multiple_of(SPLIT_ALIGN);
            let parts = side.div_ceil(per);
            // (Addresses, not pointers, cross into the threads.)
            let (dst_at, dst_rs, accumulate) = (dst.ptr as usize, dst.rs, dst.accumulate);
            let run_parts = |rhs: View<T>| {
                let (lhs_at, rhs_at) = (lhs.ptr as usize, rhs.ptr as usize);
                (0..parts).into_par_iter().for_each(|p| {
                    let (a, len) = (p * per, per.min(side - p * per));
                    let size = std::mem::size_of::<T>() as isize;
                    // SAFETY: part p reads and writes only columns (or rows) a..a + len of dst,
                    // and the matching columns of rhs (or rows of lhs), all inside the caller's
                    // operands; the parts are disjoint and all joined before this call returns.
                    unsafe {
                        let (d, l, r, mnk) = if columns {
                            let r = rhs_at as isize + a as isize * rhs.cs * size;
                            (dst_at + a * size as usize, lhs_at as isize, r, (m, len, k))
                        } else {
                            let l = lhs_at as isize + a as isize * lhs.rs * size;
                            (
                                dst_at + a * dst_rs * size as usize,
                                l,
                                rhs_at as isize,
                                (len, n, k),
                            )
                        };
                        let lhs = View {
                            ptr: l as *const T,
                            ..lhs
                        };
                        let rhs = View {
                            ptr: r as *const T,
                            ..rhs
                        };
                        let dst = Dst {
                            ptr: d as *mut T,
                            rs: dst_rs,
                            accumulate,
                        };
                        gemm_one(dst, mnk, lhs, rhs, beta, gemm::Parallelism::None);
                    }
                });
            };
            // Row parts share all of rhs: a transposed one is copied once here, not per part.
            if columns {
                run_parts(rhs)
            } else {
                super::transpose::with_row_major_rhs(rhs, (k, n), m, run_parts)
            }
            return;
        }
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_one(dst, (m, n, k), lhs, rhs, beta, par);
}

/// Products below this many multiply-adds run on one thread (gemm's own threshold).
const SPLIT_MIN_WORK: usize = 48 * 48 * 256;
/// A product is split over threads along a side at least this long per thread.
const SPLIT_MIN_SIDE: usize = 64;
/// Parts start at multiples of this many columns (rows): whole tiles of gemm's micro-kernels.
const SPLIT_ALIGN: usize = 16;
/// Parts per thread, taken by whichever thread is free. On a shared machine one core often runs
/// slower than the other for a while; with one part per thread the fast one then idles until
/// the slow one finishes (a fifth of a batch-1 layer step), with four it takes over the rest.
const SPLIT_PARTS_PER_THREAD: usize = 4;
/// A destination this many times taller than wide is split by rows even when it is wide enough
/// to split by columns: its lhs (the LM head's vocabulary-major weight) is the operand that
/// must not be read once per part.
const SPLIT_TALL: usize = 4;

/// One product on gemm's micro-kernels for [`gemm_into`]'s arguments: a transposed row-major rhs
/// through `panel_gemm` where it applies, anything else through `gemm::gemm` (a transposed rhs
/// copied row-major first).
///
/// # Safety
/// As [`gemm_into`], with `k > 0`.
unsafe fn gemm_one<T: WithDType>(
    dst: Dst<T>,
    (m, n, k): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
    par: gemm::Parallelism,
) {
    // A transposed row-major rhs (a frozen weight in `x·Wᵀ`, the keys in attention's `q·kᵀ`) on
    // one thread: packed straight into the micro-kernels' panels.
    if matches!(par, gemm::Parallelism::None)
        && m >= super::transpose::TRANSPOSE_MIN_ROWS
        && super::panel_gemm::x_wt(dst, (m, n, k), lhs, rhs, beta)
    {
        return;
    }
    super::transpose::with_row_major_rhs(rhs, (k, n), m, |rhs| {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.rs as isize,
            dst.accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::one(),
            beta,
            false,
            false,
            false,
            par,
        );
    })
}

/// A fresh row-major `(m, n) = β·lhs·rhs` over candle's threads, not zero-filled first.
pub(crate) fn product<T: WithDType>(
    mnk: (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) -> Vec<T> {
    let len = mnk.0 * mnk.1;
    let mut out = Vec::with_capacity(len);
    // SAFETY: capacity m·n; the callers build the views from slices of the stated shapes; with
    // `accumulate = false` every element of dst is written before the length is set.
    unsafe {
        gemm_into(
            Dst::fresh(out.as_mut_ptr(), mnk.1),
            mnk,
            lhs,
            rhs,
            beta,
            true,
        );
        out.set_len(len);
    }
    out
}

/// `dst (m, n) += β·lhs·rhs`, row-major, over candle's threads.
pub(crate) fn accumulate<T: WithDType>(
    dst: &mut [T],
    mnk: (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) {
    assert_eq!(dst.len(), mnk.0 * mnk.1, "gemm destination size");
    // SAFETY: dst is an initialized slice of m·n; views as in `product`.
    unsafe {
        gemm_into(
            Dst::add_to(dst.as_mut_ptr(), mnk.1),
            mnk,
            lhs,
            rhs,
            beta,
            true,
        )
    }
}

/// The contiguous elements of `s` under `l`, when it holds `T`s laid out contiguously.
fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [T]> {
    let (a, b) = l.contiguous_offsets()?;
    s.as_slice::<T>().ok().map(|v| &v[a..b])
}

/// `x (..., I) · Wᵀ` for `w (O, I)`, both contiguous f32 or both f64: candle's matmul on the same
/// kernels, without zero-filling the output first. `None` for other operands.
pub(crate) fn x_wt(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Option<candle_core::Result<(CpuStorage, Shape)>> {
    fn go<T: WithDType>(x: &[T], w: &[T], o: usize, i: usize) -> Vec<T> {
        if x.len() == i {
            return vector_wt(x, w, o, i);
        }
        product(
            (x.len() / i, o, i),
            View::rows(x, i),
            View::t(w, i),
            T::one(),
        )
    }
    let (o, i) = wl.shape().dims2().ok()?;
    if xl.dims().last() != Some(&i) || i == 0 {
        return None;
    }
    let y = match (x, w) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            CpuStorage::F32(go(contiguous::<f32>(x, xl)?, contiguous(w, wl)?, o, i))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => {
            CpuStorage::F64(go(contiguous::<f64>(x, xl)?, contiguous(w, wl)?, o, i))
        }
        _ => return None,
    };
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = o;
    Some(Ok((y, Shape::from(dims))))
}

/// Output rows per thread below which a one-row product stays on one thread (spreading it costs
/// more than reading a few hundred KiB of weights).
const VECTOR_ROWS_PER_THREAD: usize = 256;

/// `x (I) · Wᵀ` for `w (O, I)`: one token's projection while decoding. gemm runs a one-row
/// product on a single thread whatever it is asked, and decoding is bound by reading W once per
/// token, so W's rows are split over candle's threads, each writing its own slice of the output.
fn vector_wt<T: WithDType>(x: &[T], w: &[T], o: usize, i: usize) -> Vec<T> {
    let threads = super::threads::count().min(o / VECTOR_ROWS_PER_THREAD);
    if threads < 2 {
        return product((1, o, i), View::rows(x, i), View::t(w, i), T::one());
    }
    let mut out = vec![T::zero(); o];
    let chunk = o.div_ceil(threads);
    out.par_chunks_mut(chunk)
        .zip(w.par_chunks(chunk * i))
        .for_each(|(dst, w_rows)| {
            let n = dst.len();
            // SAFETY: dst is an initialized slice of n outputs; x holds i elements and w_rows
            // the n rows of i elements these outputs read.
            unsafe {
                gemm_into(
                    Dst::fresh(dst.as_mut_ptr(), n),
                    (1, n, i),
                    View::rows(x, i),
                    View::t(w_rows, i),
                    T::one(),
                    false,
                )
            }
        });
    out
}

/// `g (..., O) · W` for `w (O, I)` on the CPU, f32 or f64, as [`x_wt`] does the forward;
/// `Ok(None)` for other operands.
pub(crate) fn g_w(g: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !super::cpu_kernels::serve(g.device())
        || g.dtype() != w.dtype()
        || !matches!(g.dtype(), DType::F32 | DType::F64)
    {
        return Ok(None);
    }
    let g = g.contiguous()?;
    let w = w.contiguous()?;
    g.apply_op1_no_bwd(&GradInput { w }).map(Some)
}

/// `dx = g W`, the input gradient of a frozen linear.
struct GradInput {
    w: Tensor,
}

impl CustomOp1 for GradInput {
    fn name(&self) -> &'static str {
        "frozen-linear-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn go<T: WithDType>(g: &[T], w: &[T], o: usize, i: usize) -> Vec<T> {
            product(
                (g.len() / o, i, o),
                View::rows(g, o),
                View::rows(w, i),
                T::one(),
            )
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else {
            candle_core::bail!("frozen linear grad: weight not on the CPU")
        };
        let (o, i) = wl.shape().dims2()?;
        if gl.dims().last() != Some(&o) {
            candle_core::bail!(
                "frozen linear grad: gradient {:?} for W ({o}, {i})",
                gl.dims()
            )
        }
        let dx = match (g, w) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => contiguous::<f32>(g, gl)
                .zip(contiguous(w, wl))
                .map(|(g, w)| CpuStorage::F32(go(g, w, o, i))),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => contiguous::<f64>(g, gl)
                .zip(contiguous(w, wl))
                .map(|(g, w)| CpuStorage::F64(go(g, w, o, i))),
            _ => None,
        };
        let Some(dx) = dx else {
            candle_core::bail!("frozen linear grad: contiguous f32 or f64 operands expected")
        };
        let mut dims = gl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = i;
        Ok((dx, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use crate::train::nn::testing::max_diff;
    use crate::train::nn::{frozen_linear, frozen_linear_grad};
    use candle_core::{DType, Device, Tensor, Var};

    /// `2·a (m, k) · btᵀ` added to a destination of 0.5s (or written over it), through
    /// [`super::gemm_into`] with the transposed view of `bt (n, k)`.
    fn split_product<T: candle_core::WithDType>(
        a: &[T],
        bt: &[T],
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Vec<T> {
        use super::{gemm_into, Dst, View};
        let mut dst = vec![T::from_f64(0.5); m * n];
        // SAFETY: dst is m×n and initialized; the views address a (m×k) and bt (n×k).
        unsafe {
            gemm_into(
                Dst {
                    ptr: dst.as_mut_ptr(),
                    rs: n,
                    accumulate,
                },
                (m, n, k),
                View::rows(a, k),
                View::t(bt, k),
                T::from_f64(2.0),
                true,
            )
        };
        dst
    }

    /// Products large enough to be split over threads, along columns (wide outputs) and along
    /// rows (narrow ones, e.g. a LoRA gradient's r columns), with transposed operands, sizes that
    /// do not divide evenly, and accumulation into an existing destination, against the plain
    /// triple loop in f64. (The split needs more than one thread: candle's thread count, 2 here.)
    #[test]
    fn split_products_equal_naive_product() {
        for (m, n, k) in [
            (37, 1000, 70),
            (1000, 16, 50),
            (130, 190, 300),
            (300, 200, 1030),
        ] {
            let a: Vec<f64> = (0..m * k)
                .map(|i| ((i * 7 % 23) as f64 - 11.0) / 7.0)
                .collect();
            let b: Vec<f64> = (0..k * n)
                .map(|i| ((i * 5 % 19) as f64 - 9.0) / 5.0)
                .collect();
            // lhs (m, k) row-major; rhs (k, n) read as the transpose of a row-major (n, k).
            let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let want =
                |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f64>();
            // The same product in f32 too (AVX-512 or AVX2 kernels and register transposes where
            // the CPU has them).
            let (a32, bt32): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|&v| v as f32).collect(),
                bt.iter().map(|&v| v as f32).collect(),
            );
            for accumulate in [false, true] {
                let dst = split_product(&a, &bt, (m, n, k), accumulate);
                let dst32 = split_product(&a32, &bt32, (m, n, k), accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let w = 2.0 * want(i, j) + if accumulate { 0.5 } else { 0.0 };
                        let got = dst[i * n + j];
                        assert!(
                            (got - w).abs() < 1e-9 * (1.0 + w.abs()),
                            "{m}x{n}x{k} ({i},{j})"
                        );
                        let got32 = dst32[i * n + j] as f64;
                        assert!(
                            (got32 - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "f32 {m}x{n}x{k} ({i},{j})"
                        );
                    }
                }
            }
        }
    }

    /// A single row (decoding) takes the split-over-threads path; it equals candle's matmul for
    /// output counts that split evenly, unevenly, and too few to split.
    #[test]
    fn one_row_frozen_linear_equals_candle_matmul() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-12)] {
            for o in [7, 512, 1037, 4096] {
                let x = Tensor::randn(0f64, 1., (1, 1, 96), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(0f64, 1., (o, 96), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let y = frozen_linear(&x, &w).unwrap();
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                assert_eq!(y.dims(), &[1, 1, o]);
                assert!(max_diff(&y, &want) < tol, "{dtype:?} o={o}");
            }
        }
    }

    /// The direct-gemm frozen linear equals candle's matmul, value and input gradient, f32 and f64.
    #[test]
    fn frozen_linear_equals_candle_matmul() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-12)] {
            let x = Tensor::randn(0f64, 1., (2, 7, 12), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(0f64, 1., (9, 12), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::randn(0f64, 1., (2, 7, 9), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let y = frozen_linear(xv.as_tensor(), &w).unwrap();
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let dx = (y.clone() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = dx.get(&xv).unwrap();
            let want_dx = g.broadcast_matmul(&w).unwrap();
            assert!(max_diff(&y, &want) < tol, "{dtype:?} forward");
            assert!(max_diff(dx, &want_dx) < tol, "{dtype:?} backward");
            assert!(max_diff(&frozen_linear_grad(&g, &w).unwrap(), &want_dx) < tol);
        }
    }
}
