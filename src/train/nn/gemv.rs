//! f32 matrix products for the cached (inference) forward pass on plain slices: `W x` for one
//! token, read W once and split its rows over candle's persistent thread pool (decoding is bound
//! by reading the weights), and gemm-crate products for many tokens and for attention.
//!
//! Shapes: I in-features, O out-features, W (O, I) row-major.

use super::matmul::{gemm_into, Dst, View};
#[cfg(target_arch = "x86_64")]
use super::real::Level;
use super::real::{dispatched, Isa};
use candle_core::utils::barrier_pool;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One product of a group: `out (O) = W (O, I) · x (I)`.
pub struct Gemv<'a> {
    pub w: &'a [f32],
    pub out: &'a mut [f32],
}

/// Multiply-adds below which a group stays on the calling thread (waking the pool costs more
/// than reading a few hundred KiB).
const MIN_PARALLEL: usize = 1 << 16;

/// Rows a thread takes from the shared cursor at a time (a multiple of the kernel's 4).
const BLOCK_ROWS: usize = 32;

/// Every `out = W x` of `group` (products that read the same input), in one dispatch over the
/// pool: the groups' rows are numbered end to end and the threads take blocks of them from a
/// shared cursor, so a thread slowed by another process costs only its last block.
pub fn gemv_group(x: &[f32], group: &mut [Gemv<'_>]) {
    let i = x.len();
    for g in group.iter() {
        assert_eq!(g.w.len(), g.out.len() * i, "gemv: W is not (O, I)");
    }
    let rows: usize = group.iter().map(|g| g.out.len()).sum();
    let pool = barrier_pool();
    if pool.n_workers() == 0 || rows * i < MIN_PARALLEL {
        for g in group.iter_mut() {
            dot_rows(x, g.w, g.out);
        }
        return;
    }
    // (W, out, first row, rows) per product; pointers as integers so the closure is Sync.
    let parts: Vec<(usize, usize, usize, usize)> = group
        .iter_mut()
        .scan(0, |first, g| {
            let n = g.out.len();
            let p = (
                g.w.as_ptr() as usize,
                g.out.as_mut_ptr() as usize,
                *first,
                n,
            );
            *first += n;
            Some(p)
        })
        .collect();
    let cursor = AtomicUsize::new(0);
    pool.execute(|_| loop {
        let lo = cursor.fetch_add(BLOCK_ROWS, Ordering::Relaxed);
        if lo >= rows {
            break;
        }
        let hi = (lo + BLOCK_ROWS).min(rows);
        for &(w, out, first, n) in &parts {
            let (a, b) = (lo.max(first), hi.min(first + n));
            if a >= b {
                continue;
            }
            let (a, b) = (a - first, b - first);
            // SAFETY: rows a..b of this product's W (O·I elements) and out (O); blocks are
            // disjoint, and `group`'s borrows outlive `execute`, which joins every thread.
            unsafe {
                let w = std::slice::from_raw_parts((w as *const f32).add(a * i), (b - a) * i);
                let out = std::slice::from_raw_parts_mut((out as *mut f32).add(a), b - a);
                dot_rows(x, w, out);
            }
        }
    });
}

/// `out[r] = W[r] · x` for each row r of `w`, on the calling thread.
pub fn dot_rows(x: &[f32], w: &[f32], out: &mut [f32]) {
    dot_rows_on(Isa::detected(), x, w, out)
}

fn dot_rows_on(isa: Isa, x: &[f32], w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.level() == Level::Avx512 {
        // SAFETY: an `Isa` names only instruction sets this CPU runs; the slices are as the
        // kernel reads them.
        return unsafe { avx512::dot_rows(x, w, out) };
    }
    portable_dot_rows(isa, x, w, out)
}

dispatched! {
    /// Sixteen lanes per row, vectorized by the compiler for each instruction set (eight-lane
    /// AVX2 registers where the CPU has no AVX-512, instead of baseline x86-64's four).
    fn portable_dot_rows(x: &[f32], w: &[f32], out: &mut [f32]) = dot_rows_lanes
}

#[inline(always)]
fn dot_rows_lanes(x: &[f32], w: &[f32], out: &mut [f32]) {
    let i = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(i)) {
        let mut lanes = [0f32; 16];
        let (xc, wc) = (x.chunks_exact(16), row.chunks_exact(16));
        let tail: f32 = xc
            .remainder()
            .iter()
            .zip(wc.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (xs, ws) in xc.zip(wc) {
            for ((l, a), b) in lanes.iter_mut().zip(xs).zip(ws) {
                *l += a * b;
            }
        }
        *o = lanes.iter().sum::<f32>() + tail;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Four rows at a time against one load of x, two accumulators per row so the fused
    /// multiply-adds overlap; the last partial vector of each row through a masked load.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `w` holds `out.len()` rows of `x.len()` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_rows(x: &[f32], w: &[f32], out: &mut [f32]) {
        let i = x.len();
        debug_assert_eq!(w.len(), out.len() * i);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let full = i / 16 * 16;
        let tail: __mmask16 = ((1u32 << (i - full)) - 1) as __mmask16;
        let mut r = 0;
        while r + 4 <= out.len() {
            let rows = [0, 1, 2, 3].map(|k| wp.add((r + k) * i));
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            let mut j = 0;
            while j + 32 <= full {
                let (x0, x1) = (_mm512_loadu_ps(xp.add(j)), _mm512_loadu_ps(xp.add(j + 16)));
                for k in 0..4 {
                    let a = &mut acc[k];
                    a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[k].add(j)), x0, a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[k].add(j + 16)), x1, a[1]);
                }
                j += 32;
            }
            if j < full {
                let x0 = _mm512_loadu_ps(xp.add(j));
                for k in 0..4 {
                    acc[k][0] = _mm512_fmadd_ps(_mm512_loadu_ps(rows[k].add(j)), x0, acc[k][0]);
                }
            }
            if tail != 0 {
                let x0 = _mm512_maskz_loadu_ps(tail, xp.add(full));
                for k in 0..4 {
                    let wv = _mm512_maskz_loadu_ps(tail, rows[k].add(full));
                    acc[k][1] = _mm512_fmadd_ps(wv, x0, acc[k][1]);
                }
            }
            for k in 0..4 {
                out[r + k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[k][0], acc[k][1]));
            }
            r += 4;
        }
        while r < out.len() {
            let row = wp.add(r * i);
            let mut acc = _mm512_setzero_ps();
            let mut j = 0;
            while j < full {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(row.add(j)), _mm512_loadu_ps(xp.add(j)), acc);
                j += 16;
            }
            if tail != 0 {
                let wv = _mm512_maskz_loadu_ps(tail, row.add(full));
                acc = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, xp.add(full)), acc);
            }
            out[r] = _mm512_reduce_add_ps(acc);
            r += 1;
        }
    }
}

/// `y (T, O) = x (T, I) · Wᵀ` for row-major `w (O, I)`: one GEMV group for a single row, a
/// threaded gemm for more.
pub fn x_wt(x: &[f32], w: &[f32], i: usize) -> Vec<f32> {
    let (t, o) = (x.len() / i, w.len() / i);
    if t == 1 {
        let mut y = vec![0f32; o];
        gemv_group(
            x,
            &mut [Gemv {
                w,
                out: y.as_mut_slice(),
            }],
        );
        return y;
    }
    let mut y = Vec::with_capacity(t * o);
    // SAFETY: capacity t·o, every element written (no accumulate) before the length is set.
    unsafe {
        gemm_into(
            Dst::fresh(y.as_mut_ptr(), o),
            (t, o, i),
            View::rows(x, i),
            View::t(w, i),
            1.0,
            true,
        );
        y.set_len(t * o);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32]) -> Vec<f32> {
        w.chunks_exact(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32)
            .collect()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|k| (((k as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Every kernel and the grouped dispatch equal a plain dot product: in-feature counts with
    /// and without a partial vector, row counts that leave rows outside the four-row blocks, and
    /// a group large enough to be split over the pool.
    #[test]
    fn gemv_kernels_equal_plain_dot_products() {
        for (o, i) in [(1, 5), (7, 16), (9, 33), (13, 64), (37, 100), (300, 1024)] {
            let (x, w) = (data(i, 1), data(o * i, 2));
            let want = reference(&x, &w);
            let tol = 1e-4 * (i as f32).sqrt();
            let mut a = vec![0f32; o];
            dot_rows(&x, &w, &mut a);
            let mut b = vec![0f32; o];
            portable_dot_rows(Isa::each()[0], &x, &w, &mut b);
            for k in 0..o {
                assert!((a[k] - want[k]).abs() < tol, "dot_rows o={o} i={i} row {k}");
                assert!((b[k] - want[k]).abs() < tol, "portable o={o} i={i} row {k}");
            }
            // Each instruction set's build of the portable loop gives the baseline's bits, and
            // each set's kernel the plain product.
            for isa in Isa::each() {
                let mut c = vec![0f32; o];
                portable_dot_rows(isa, &x, &w, &mut c);
                assert_eq!(c, b, "portable on {isa:?}, o={o} i={i}");
                dot_rows_on(isa, &x, &w, &mut c);
                for k in 0..o {
                    assert!((c[k] - want[k]).abs() < tol, "{isa:?} o={o} i={i} row {k}");
                }
            }
        }
        let i = 257;
        let (x, w1, w2) = (data(i, 3), data(700 * i, 4), data(45 * i, 5));
        let (mut y1, mut y2) = (vec![0f32; 700], vec![0f32; 45]);
        gemv_group(
            &x,
            &mut [
                Gemv {
                    w: &w1,
                    out: &mut y1,
                },
                Gemv {
                    w: &w2,
                    out: &mut y2,
                },
            ],
        );
        for (y, w) in [(&y1, &w1), (&y2, &w2)] {
            let want = reference(&x, w);
            assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-3));
        }
    }

    /// One row and several through [`x_wt`] agree with the plain products.
    #[test]
    fn x_wt_one_row_and_many() {
        let (i, o) = (96, 130);
        let w = data(o * i, 6);
        for t in [1, 5] {
            let x = data(t * i, 7);
            let y = x_wt(&x, &w, i);
            let want: Vec<f32> = x.chunks(i).flat_map(|r| reference(r, &w)).collect();
            assert!(
                y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-3),
                "t={t}"
            );
        }
    }
}
