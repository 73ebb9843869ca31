//! Out-of-place matrix transpose for the GEMM path: a transposed operand copied into row-major
//! order before gemm packs it, or packed straight into micro-kernel panels (`panel_gemm.rs`). Tiles of 16×16, an f32 tile transposed in registers where the CPU
//! allows: with AVX-512F 16 row loads, four shuffle stages and 16 row stores; with AVX (the AMD
//! EPYCs here) as four 8×8 blocks of three stages each; at the edges, in f64, and on other CPUs
//! element by element.

use super::real::{Isa, Level};
use super::view::View;
use candle_core::{DType, WithDType};

/// Tile side: 16 f32 lanes of one AVX-512 register.
const TILE: usize = 16;

/// Writes the `(k, n)` matrix at `src` (element (p, j) at `src + p + j·src_cs`: its columns are
/// contiguous) row-major into `dst`.
///
/// # Safety
/// `dst` has room for k·n elements and does not overlap src; `src` addresses a k×n matrix
/// inside a live buffer.
pub(crate) unsafe fn columns_to_rows<T: WithDType>(
    dst: *mut T,
    src: *const T,
    src_cs: usize,
    kn: (usize, usize),
) {
    columns_to_rows_on(Isa::detected(), dst, src, src_cs, kn)
}

/// [`columns_to_rows`] with full f32 tiles transposed in the registers of `isa` (AVX-512F; AVX,
/// which every AVX2 CPU has), other tiles element by element.
///
/// # Safety
/// As [`columns_to_rows`].
unsafe fn columns_to_rows_on<T: WithDType>(
    isa: Isa,
    dst: *mut T,
    src: *const T,
    src_cs: usize,
    (k, n): (usize, usize),
) {
    let level = if T::DTYPE == DType::F32 {
        isa.level()
    } else {
        Level::Baseline
    };
    for j0 in (0..n).step_by(TILE) {
        let j1 = (j0 + TILE).min(n);
        for p0 in (0..k).step_by(TILE) {
            let p1 = (p0 + TILE).min(k);
            if j1 - j0 == TILE && p1 - p0 == TILE {
                let (d, s) = (
                    dst.add(p0 * n + j0) as *mut f32,
                    src.add(j0 * src_cs + p0) as *const f32,
                );
                match level {
                    // SAFETY (both arms): an `Isa` names only instruction sets this CPU runs.
                    #[cfg(target_arch = "x86_64")]
                    Level::Avx512 => {
                        tile_avx512(d, n, s, src_cs);
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    Level::Avx2 => {
                        for (dp, sj) in [(0, 0), (0, 8), (8, 0), (8, 8)] {
                            block8_avx(d.add(dp * n + sj), n, s.add(sj * src_cs + dp), src_cs);
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            for p in p0..p1 {
                let row = dst.add(p * n);
                for j in j0..j1 {
                    *row.add(j) = *src.add(j * src_cs + p);
                }
            }
        }
    }
}

/// One 8×8 f32 block: `dst[p·dst_rs + j] = src[j·src_rs + p]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn block8_avx(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(src.add(j * src_rs)));
    // Pairs of rows interleaved per 128-bit half: t[2i] = (r[2i][0], r[2i+1][0], r[2i][1], …).
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // Quads: u[4g + c] holds element c (and c + 4 in the upper half) of rows 4g..4g+4.
    let mut u = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let (lo, hi) = (t[4 * g], t[4 * g + 2]);
        let (lo2, hi2) = (t[4 * g + 1], t[4 * g + 3]);
        u[4 * g] = _mm256_shuffle_ps::<0x44>(lo, hi);
        u[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(lo, hi);
        u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(lo2, hi2);
        u[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(lo2, hi2);
    }
    // Halves joined: rows 0..4 of column c from u[c], rows 4..8 from u[4 + c].
    for c in 0..4 {
        let (a, b) = (u[c], u[4 + c]);
        _mm256_storeu_ps(dst.add(c * dst_rs), _mm256_permute2f128_ps::<0x20>(a, b));
        _mm256_storeu_ps(
            dst.add((c + 4) * dst_rs),
            _mm256_permute2f128_ps::<0x31>(a, b),
        );
    }
}

/// One 16×16 f32 tile: `dst[p·dst_rs + j] = src[j·src_rs + p]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(dst: *mut f32, dst_rs: usize, src: *const f32, src_rs: usize) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(src.add(j * src_rs)));
    // Pairs of rows interleaved per 128-bit lane: t[2i] = (r[2i][0], r[2i+1][0], r[2i][1], …).
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Quads: u[4g + c] holds columns c, c+4, c+8, c+12 (one per lane) of rows 4g..4g+4.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (lo, hi) = (t[4 * g], t[4 * g + 2]);
        let (lo2, hi2) = (t[4 * g + 1], t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(
            _mm512_castps_pd(lo),
            _mm512_castps_pd(hi),
        ));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(
            _mm512_castps_pd(lo),
            _mm512_castps_pd(hi),
        ));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(
            _mm512_castps_pd(lo2),
            _mm512_castps_pd(hi2),
        ));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(
            _mm512_castps_pd(lo2),
            _mm512_castps_pd(hi2),
        ));
    }
    // Lanes regrouped twice: 0x88 takes lanes 0 and 2 of each operand, 0xDD lanes 1 and 3.
    for c in 0..4 {
        let lo = [0, 1].map(|h| _mm512_shuffle_f32x4::<0x88>(u[8 * h + c], u[8 * h + 4 + c]));
        let hi = [0, 1].map(|h| _mm512_shuffle_f32x4::<0xDD>(u[8 * h + c], u[8 * h + 4 + c]));
        let out = [
            (c, _mm512_shuffle_f32x4::<0x88>(lo[0], lo[1])),
            (c + 8, _mm512_shuffle_f32x4::<0xDD>(lo[0], lo[1])),
            (c + 4, _mm512_shuffle_f32x4::<0x88>(hi[0], hi[1])),
            (c + 12, _mm512_shuffle_f32x4::<0xDD>(hi[0], hi[1])),
        ];
        for (p, v) in out {
            _mm512_storeu_ps(dst.add(p * dst_rs), v);
        }
    }
}

/// Calls `f` with `rhs (k, n)` as gemm packs it fastest. A rhs that is the transpose of a
/// row-major matrix (a frozen weight read as `Wᵀ` in `x·Wᵀ`) gemm packs for its kernels one
/// element at a time, gathering across 64 rows; copied into row-major order first, 16×16 tiles at
/// a time (in registers with AVX-512 or AVX), it is packed with vector loads instead: a Qwen3-0.6B
/// layer's forward products run 3–10 % faster per call (docs/benchmarks.md). The copy lives in
/// this thread's buffer for the duration of `f`. (Where `panel_gemm` applies, the weight is
/// packed once instead; this copy serves the rest: f64, widths off the vector lanes, products
/// split by rows, CPUs without AVX2.)
///
/// # Safety
/// `rhs` addresses a k×n matrix inside a live buffer.
pub(super) unsafe fn with_row_major_rhs<T: WithDType, R>(
    rhs: View<T>,
    (k, n): (usize, usize),
    m: usize,
    f: impl FnOnce(View<T>) -> R,
) -> R {
    if !(rhs.rs == 1 && rhs.cs > 1 && m >= TRANSPOSE_MIN_ROWS) {
        return f(rhs);
    }
    with_scratch(k * n * std::mem::size_of::<T>(), |buf| {
        let rows = buf as *mut T;
        columns_to_rows(rows, rhs.ptr, rhs.cs as usize, (k, n));
        f(View {
            ptr: rows as *const T,
            rs: n as isize,
            cs: 1,
        })
    })
}

/// Products with at least this many rows copy a transposed rhs into row-major order first: the
/// copy moves each rhs element once, the product reads it `m` times.
pub(super) const TRANSPOSE_MIN_ROWS: usize = 64;

/// Runs `f` on this thread's scratch buffer of at least `bytes` bytes, aligned for f32 and f64:
/// the transposed copies above and `panel_gemm`'s packed panels. It is kept between calls (up to
/// 16 MiB; a larger one, a whole activation read transposed, say, is freed rather than held for
/// the life of the thread), and taken out while in use, so a nested call allocates its own.
pub(super) fn with_scratch<R>(bytes: usize, f: impl FnOnce(*mut u8) -> R) -> R {
    let mut buf = SCRATCH.take();
    let words = bytes.div_ceil(8);
    if buf.len() < words {
        buf = vec![0f64; words];
    }
    let out = f(buf.as_mut_ptr() as *mut u8);
    if buf.len() <= SCRATCH_KEEP_WORDS {
        SCRATCH.set(buf);
    }
    out
}

/// [`with_scratch`] keeps buffers up to this many f64 words (16 MiB).
const SCRATCH_KEEP_WORDS: usize = 2 << 20;

thread_local! {
    /// [`with_scratch`]'s buffer (f64 words, for the alignment).
    static SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::{columns_to_rows, columns_to_rows_on, Isa};

    /// Full tiles, edge tiles in both directions, and a source with padding between columns,
    /// in f32 with the registers of every instruction set this CPU runs and in f64 (element by
    /// element).
    #[test]
    fn columns_to_rows_transposes() {
        fn check<T: candle_core::WithDType>(isa: Option<Isa>, k: usize, n: usize, pad: usize) {
            let cs = k + pad;
            let src: Vec<T> = (0..n * cs).map(|i| T::from_f64(i as f64)).collect();
            let mut dst = vec![T::from_f64(-1.0); k * n];
            // SAFETY: dst holds k·n elements; src holds n columns of k at stride cs.
            unsafe {
                match isa {
                    Some(isa) => {
                        columns_to_rows_on(isa, dst.as_mut_ptr(), src.as_ptr(), cs, (k, n))
                    }
                    None => columns_to_rows(dst.as_mut_ptr(), src.as_ptr(), cs, (k, n)),
                }
            };
            for p in 0..k {
                for j in 0..n {
                    assert_eq!(
                        dst[p * n + j].to_f64(),
                        src[j * cs + p].to_f64(),
                        "{isa:?} {k}x{n}+{pad} ({p},{j})"
                    );
                }
            }
        }
        for (k, n, pad) in [
            (16, 16, 0),
            (64, 48, 0),
            (300, 35, 3),
            (7, 200, 1),
            (145, 160, 0),
        ] {
            check::<f32>(None, k, n, pad);
            check::<f64>(None, k, n, pad);
            for isa in Isa::each() {
                check::<f32>(Some(isa), k, n, pad);
            }
        }
    }
}
