//! `x · Wᵀ` for a row-major frozen weight `W (O, I)`, with the weight packed in one pass straight
//! into the panels that gemm's f32 micro-kernels read, then those micro-kernels called directly.
//!
//! Through `gemm::gemm` the same product touches the weight twice before any arithmetic: gemm
//! wants it contiguous along O, so it is first copied out of its row-major layout in 16×16 tiles
//! (`transpose.rs`), then gemm packs that copy into its own panels. Here the tile transpose writes
//! the panels themselves: a panel is `mr` consecutive output features (64 with AVX-512, 16 with
//! AVX2) by `KC` input features, stored depth by depth, which is exactly a `(KC, mr)` row-major
//! transpose of the weight's block. The input `x` is read in place by the micro-kernel, as gemm
//! reads it for these shapes.
//!
//! In gemm's column-major terms the product is `yᵀ (O, T) = W (O, I) · xᵀ (I, T)`: the weight is
//! the left operand (packed), `x` the right one (read strided), `y` the destination with unit
//! row stride.

#[cfg(target_arch = "x86_64")]
use super::real::{Isa, Level};
use super::view::{Dst, View};
use candle_core::{DType, WithDType};

/// A gemm f32 micro-kernel: `dst (m, n) = α·dst + β·lhs (m, k) · rhs (k, n)` for `m ≤ mr`,
/// `n ≤ 6`, with `lhs` packed (`lhs_cs` between depths, `mr` lanes contiguous) and `rhs` strided.
/// Arguments: m, n, k, dst, lhs, rhs, dst_cs, dst_rs, lhs_cs, rhs_rs, rhs_cs, α, β, α's kind (0:
/// zero, 1: one, 2: other), three conjugation flags, and a prefetch hint.
type MicroKernel = unsafe fn(
    usize,
    usize,
    usize,
    *mut f32,
    *const f32,
    *const f32,
    isize,
    isize,
    isize,
    isize,
    isize,
    f32,
    f32,
    u8,
    bool,
    bool,
    bool,
    *const f32,
);

/// gemm's micro-kernels for one instruction set: `table[r - 1][c - 1]` computes `r·lanes` rows by
/// `c` columns.
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    table: &'static [[MicroKernel; NR]],
    lanes: usize,
}

/// Columns (tokens) per micro-kernel call: the widest tile gemm's x86 kernels have.
const NR: usize = 6;

/// Bytes of packed panels per chunk of output features (256 features at depth [`KC`]), so that
/// they stay in L2 while every token passes over them: Qwen3-1.7B's MLP bands (768 features,
/// 1.5 MiB at this depth) ran their forward about 9 % slower unchunked on a 1 MiB L2.
const PANEL_BYTES: usize = 512 << 10;

/// Depth of one packed block; `x`'s six rows per micro-kernel call (12 KiB) stay in L1. (256 ran
/// slower, 1024 no faster.)
const KC: usize = 512;

impl Kernels {
    /// The widest kernels this CPU runs, if it runs any of them.
    pub fn detected() -> Option<Kernels> {
        #[cfg(target_arch = "x86_64")]
        {
            Kernels::for_isa(Isa::detected())
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }

    /// The kernels compiled for `isa` (AVX-512F or AVX2 + FMA).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn for_isa(isa: Isa) -> Option<Kernels> {
        match isa.level() {
            Level::Avx512 => Some(Kernels {
                table: &gemm_f32::microkernel::avx512f::f32::UKR,
                lanes: 16,
            }),
            Level::Avx2 => Some(Kernels {
                table: &gemm_f32::microkernel::fma::f32::UKR,
                lanes: 8,
            }),
            Level::Baseline => None,
        }
    }

    /// Rows of a full panel.
    fn mr(self) -> usize {
        self.table.len() * self.lanes
    }

    /// Whether a product with `o` output features can run here: every panel, the last included,
    /// must be whole vector lanes (the kernels load whole registers of the packed weight).
    pub fn fits(self, o: usize) -> bool {
        o.is_multiple_of(self.lanes)
    }

    /// `y (t, o) = β·x (t, i) · Wᵀ`, plus `y`'s own values when it accumulates, on this thread.
    /// `w` is `W (o, i)` with unit column stride.
    ///
    /// # Safety
    /// The views address matrices of the stated shapes inside live buffers (`y` initialized
    /// when it accumulates), `y` overlaps neither operand, and `self.fits(o)`.
    unsafe fn x_wt(
        self,
        y: Dst<f32>,
        (t, o, i): (usize, usize, usize),
        x: View<f32>,
        w: View<f32>,
        beta: f32,
    ) {
        debug_assert!(self.fits(o) && w.cs == 1);
        let mr = self.mr();
        let (x, x_rs, x_cs) = (x.ptr, x.rs, x.cs);
        let (accumulate, w_rs) = (y.accumulate, w.rs as usize);
        let (y, y_rs, w) = (y.ptr, y.rs, w.ptr);
        let kc_max = KC.min(i);
        // Output features packed at a time: a chunk's panels stay within PANEL_BYTES, and within
        // what gemm itself would pack for this CPU's L2 (half of it on a 512 KiB L2 with AVX2).
        let gemm_mc = gemm_common::cache::kernel_params(o, t, i, mr, NR, 4).mc;
        let mc = (PANEL_BYTES / (kc_max * 4)).min(gemm_mc) / mr * mr;
        let mc = mc.max(mr);
        super::transpose::with_scratch(o.min(mc) * kc_max * 4, |buf| {
            let packed = buf as *mut f32;
            for c0 in (0..o).step_by(mc) {
                let chunk = mc.min(o - c0);
                for k0 in (0..i).step_by(KC) {
                    let kc = KC.min(i - k0);
                    self.pack(packed, w.add(c0 * w_rs + k0), w_rs, (chunk, kc));
                    // Overwrite on the first block unless accumulating, add on the others.
                    let alpha_status = u8::from(accumulate || k0 > 0);
                    for t0 in (0..t).step_by(NR) {
                        let cols = NR.min(t - t0);
                        let rhs = x.offset(t0 as isize * x_rs + k0 as isize * x_cs);
                        for p0 in (0..chunk).step_by(mr) {
                            let width = mr.min(chunk - p0);
                            let kernel = self.table[width / self.lanes - 1][cols - 1];
                            let lhs = packed.add(p0 * kc);
                            kernel(
                                width,
                                cols,
                                kc,
                                y.add(t0 * y_rs + c0 + p0),
                                lhs,
                                rhs,
                                y_rs as isize,
                                1,
                                width as isize,
                                x_cs,
                                x_rs,
                                1.0,
                                beta,
                                alpha_status,
                                false,
                                false,
                                false,
                                lhs,
                            );
                        }
                    }
                }
            }
        })
    }

    /// Packs the weight block `(rows, kc)` at `w` (row stride `w_rs`) into panels: panel p holds
    /// rows p·mr.. (the last one narrower) as a `(kc, width)` row-major matrix at `p·mr·kc`.
    ///
    /// # Safety
    /// `packed` has room for `rows·kc` f32; `w` addresses the block inside a live buffer.
    unsafe fn pack(self, packed: *mut f32, w: *const f32, w_rs: usize, (rows, kc): (usize, usize)) {
        let mr = self.mr();
        for p0 in (0..rows).step_by(mr) {
            let width = mr.min(rows - p0);
            super::transpose::columns_to_rows(
                packed.add(p0 * kc),
                w.add(p0 * w_rs),
                w_rs,
                (kc, width),
            );
        }
    }
}

/// [`gemm_into`](super::matmul::gemm_into)'s product on this thread when `rhs (k, n)` is the
/// transpose of a row-major matrix (a frozen weight in `x·Wᵀ`) and this CPU has kernels for it;
/// `false`, with nothing written, otherwise.
///
/// # Safety
/// As `gemm_into`, with `k > 0`.
pub(super) unsafe fn x_wt<T: WithDType>(
    dst: Dst<T>,
    (m, n, k): (usize, usize, usize),
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) -> bool {
    if T::DTYPE != DType::F32 || rhs.rs != 1 || rhs.cs <= 1 {
        return false;
    }
    let Some(kernels) = Kernels::detected().filter(|ks| ks.fits(n)) else {
        return false;
    };
    // SAFETY: T is f32; rhs (k, n) is the row-major (n, k) matrix at rhs.ptr, row stride rhs.cs.
    let dst = Dst {
        ptr: dst.ptr as *mut f32,
        rs: dst.rs,
        accumulate: dst.accumulate,
    };
    let x = View {
        ptr: lhs.ptr as *const f32,
        rs: lhs.rs,
        cs: lhs.cs,
    };
    // W itself, row-major (n, k).
    let w = View {
        ptr: rhs.ptr as *const f32,
        rs: rhs.cs,
        cs: 1,
    };
    kernels.x_wt(dst, (m, n, k), x, w, beta.to_f64() as f32);
    true
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{Dst, Isa, Kernels, View};

    /// Against the naive product in f64, with every kernel set this CPU runs: depths across
    /// several packed blocks and off the block size, token counts off the tile width, narrow last
    /// panels, outputs wider than one packed chunk (528 = 256 + 256 + 16 features), padded
    /// strides, `x` row-major and column-major (`gemm_into` passes any strides),
    /// overwrite and accumulate.
    #[test]
    fn x_wt_equals_naive_product() {
        let mut ran = 0;
        for kernels in Isa::each().into_iter().filter_map(Kernels::for_isa) {
            for &(t, o, i) in &[
                (1, 16, 3),
                (13, 64, 100),
                (70, 208, 1100),
                (6, 80, 512),
                (9, 528, 600),
            ] {
                if !kernels.fits(o) {
                    continue;
                }
                // x row-major (padded rows), then column-major (x read through its transpose).
                for (accumulate, x_rs, x_cs) in [
                    (false, i + 3, 1),
                    (true, i + 3, 1),
                    (false, 1, t + 2),
                    (true, 1, t + 2),
                ] {
                    let (w_rs, y_rs) = (i + 5, o + 7);
                    let x_len = if x_cs == 1 { t * x_rs } else { i * x_cs };
                    let x: Vec<f32> = (0..x_len)
                        .map(|v| ((v * 37 % 101) as f32 - 50.0) / 64.0)
                        .collect();
                    let x_at = |r: usize, p: usize| x[r * x_rs + p * x_cs];
                    let w: Vec<f32> = (0..o * w_rs)
                        .map(|v| ((v * 53 % 97) as f32 - 48.0) / 128.0)
                        .collect();
                    let start: Vec<f32> = (0..t * y_rs).map(|v| (v % 11) as f32 - 5.0).collect();
                    let mut y = start.clone();
                    let beta = 0.75f32;
                    // SAFETY: the buffers hold the stated shapes at the stated strides.
                    unsafe {
                        let dst = Dst {
                            ptr: y.as_mut_ptr(),
                            rs: y_rs,
                            accumulate,
                        };
                        let xv = View {
                            ptr: x.as_ptr(),
                            rs: x_rs as isize,
                            cs: x_cs as isize,
                        };
                        let wv = View::rows(&w, w_rs);
                        kernels.x_wt(dst, (t, o, i), xv, wv, beta)
                    };
                    for r in 0..t {
                        for c in 0..y_rs {
                            let got = y[r * y_rs + c];
                            if c >= o {
                                assert_eq!(
                                    got,
                                    start[r * y_rs + c],
                                    "padding written at ({r}, {c})"
                                );
                                continue;
                            }
                            let dot: f64 = (0..i)
                                .map(|p| x_at(r, p) as f64 * w[c * w_rs + p] as f64)
                                .sum();
                            let want = beta as f64 * dot
                                + if accumulate {
                                    start[r * y_rs + c] as f64
                                } else {
                                    0.0
                                };
                            assert!(
                                (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "({t}, {o}, {i}) acc {accumulate} x strides ({x_rs}, {x_cs}): \
                                 y[{r}, {c}] = {got}, want {want}"
                            );
                        }
                    }
                    ran += 1;
                }
            }
        }
        assert!(ran > 0 || Kernels::detected().is_none());
    }
}
