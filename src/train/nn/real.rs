//! The float types the CPU kernels run in, with the row loops of the softmaxes (largest element,
//! shifted exponentials and their sum, dot products) written so that they vectorize, and the
//! run-time choice of instruction set for such loops.
//!
//! The default build targets baseline x86-64 (SSE2), where these loops run four f32 lanes wide
//! and the scalar `max` fold runs one element per compare-and-select latency. So each loop is
//! compiled three times, for baseline x86-64, for AVX2 + FMA (the AMD EPYCs these machines run
//! on) and for AVX-512F (the Intel Xeons), and the widest build the CPU runs is picked at run
//! time ([`dispatched`]): the LM head's cross-entropy runs them over every labelled token's
//! full-vocabulary row of logits, attention over every query row.

/// The instruction sets a [`dispatched`] loop is compiled for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub(super) enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// An instruction set this CPU runs: made only by [`Isa::detected`] and [`Isa::each`], which is
/// what makes calling a loop compiled for it safe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Isa(Level);

impl Isa {
    /// The set sftd's own kernels use: the widest this CPU runs, or a narrower one named by
    /// [`ISA_VARIABLE`] (decided once per process).
    pub fn detected() -> Isa {
        chosen().0
    }

    /// The widest set this CPU runs.
    fn cpu() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa(Level::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa(Level::Avx2);
            }
        }
        Isa(Level::Baseline)
    }

    /// Every set this CPU runs, baseline first (tests hold each build to the baseline one).
    #[cfg(test)]
    pub fn each() -> Vec<Isa> {
        let widest = Isa::cpu().0;
        [Level::Baseline, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| l <= widest)
            .map(Isa)
            .collect()
    }

    pub fn level(self) -> Level {
        self.0
    }
}

/// Caps the instruction set of sftd's own CPU kernels (`baseline`, `avx2` or `avx512`): to time
/// or check the narrower builds on a wider CPU. The gemm crate's own dispatch is not affected.
const ISA_VARIABLE: &str = "SFTD_CPU_ISA";

fn env_request() -> Option<String> {
    std::env::var(ISA_VARIABLE)
        .ok()
        .filter(|v| !v.trim().is_empty())
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Baseline => "baseline",
        Level::Avx2 => "avx2",
        Level::Avx512 => "avx512",
    }
}

/// The set for a CPU that runs up to `cpu` when `request` is asked for, and why the request was
/// not followed, if it was not.
fn kernel_isa_from(cpu: Isa, request: Option<&str>) -> (Isa, Option<String>) {
    let Some(request) = request else {
        return (cpu, None);
    };
    let asked = match request.trim().to_ascii_lowercase().as_str() {
        "baseline" => Level::Baseline,
        "avx2" => Level::Avx2,
        "avx512" => Level::Avx512,
        _ => {
            return (
                cpu,
                Some(format!(
                    "{ISA_VARIABLE}={request:?} is not one of baseline, avx2, avx512; using {}",
                    level_name(cpu.0)
                )),
            )
        }
    };
    if asked > cpu.0 {
        let note = format!(
            "{ISA_VARIABLE}={request} is wider than this CPU runs; using {}",
            level_name(cpu.0)
        );
        return (cpu, Some(note));
    }
    (Isa(asked), None)
}

/// The set and the note on the request, decided once per process.
fn chosen() -> &'static (Isa, Option<String>) {
    static CHOSEN: std::sync::OnceLock<(Isa, Option<String>)> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| kernel_isa_from(Isa::cpu(), env_request().as_deref()))
}

/// The instruction set sftd's own CPU kernels run (`baseline`, `avx2` or `avx512`, or `off` when
/// `SFTD_CPU_KERNELS=off` leaves every op to candle), and a note for each of the two variables
/// whose value could not be honoured.
pub fn kernel_isa() -> (&'static str, Vec<&'static str>) {
    let (isa, isa_note) = chosen();
    let notes = isa_note
        .as_deref()
        .into_iter()
        .chain(super::cpu_kernels::note())
        .collect();
    if !super::cpu_kernels::enabled() {
        return ("off", notes);
    }
    (level_name(isa.0), notes)
}

/// Defines `fn NAME(isa: Isa, ARGS) -> RET` that runs `LANES(ARGS)` compiled for `isa`. `LANES`
/// must be `#[inline(always)]`, so that each build gets its own copy of the loop; the builds
/// run the same operations in the same order (Rust never contracts a multiply and an add into
/// an FMA by itself), so they give the same bits.
macro_rules! dispatched {
    (
        $(#[$attr:meta])*
        fn $name:ident $(<$T:ident: $B:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
            = $lanes:ident
    ) => {
        $(#[$attr])*
        fn $name $(<$T: $B>)? (isa: $crate::train::nn::real::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::train::nn::real::Level;
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512 $(<$T: $B>)? ($($arg: $ty),*) $(-> $ret)? {
                    $lanes($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$T: $B>)? ($($arg: $ty),*) $(-> $ret)? {
                    $lanes($($arg),*)
                }
                match isa.level() {
                    // SAFETY: an `Isa` names only instruction sets this CPU runs.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Baseline => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = isa;
            $lanes($($arg),*)
        }
    };
}
pub(super) use dispatched;

/// The float types the kernels run in (f32 for training, f64 for gradient checks).
pub(crate) trait Real: candle_core::WithDType {
    fn exp(self) -> Self;
    /// `Σ xs` in f64 precision.
    fn sum(xs: &[Self]) -> f64;
    /// The largest element (NaNs are skipped; `-inf` for an empty or all-NaN slice).
    fn max_of(xs: &[Self]) -> Self;
    /// `xs[i] = e^((xs[i] − shift)·scale)` in place; returns `Σ xs` (after) in f64 precision.
    fn exp_shifted(xs: &mut [Self], shift: Self, scale: Self) -> f64;
    /// `Σ a[i]·b[i]` over the shorter of the two.
    fn dot(a: &[Self], b: &[Self]) -> f64;
    /// One row `r` of a running column-wise maximum: where `row[j] > max[j]` (NaNs skipped),
    /// `max[j] = row[j]` and `arg[j] = r`.
    fn max_cols(row: &[Self], max: &mut [Self], arg: &mut [u32], r: u32);
    /// One row of a column-wise softmax: `row[j] = e^(row[j] − shift[j])`, `acc[j] += row[j]`.
    fn exp_cols(row: &mut [Self], shift: &[Self], acc: &mut [Self]);
}

impl Real for f32 {
    fn exp(self) -> Self {
        exp_f32(self)
    }

    fn sum(xs: &[Self]) -> f64 {
        // Eight f32 lanes per block of 256 (vectorizable), blocks added in f64.
        xs.chunks(256)
            .map(|block| {
                let mut lanes = [0f32; 8];
                let mut it = block.chunks_exact(8);
                for c in &mut it {
                    for (l, v) in lanes.iter_mut().zip(c) {
                        *l += v;
                    }
                }
                let rest: f32 = it.remainder().iter().sum();
                lanes.iter().map(|&l| l as f64).sum::<f64>() + rest as f64
            })
            .sum()
    }

    fn max_of(xs: &[Self]) -> Self {
        max_on(Isa::detected(), xs)
    }

    fn exp_shifted(xs: &mut [Self], shift: Self, scale: Self) -> f64 {
        exp_shifted_on(Isa::detected(), xs, shift, scale)
    }

    fn dot(a: &[Self], b: &[Self]) -> f64 {
        dot_on(Isa::detected(), a, b)
    }

    fn max_cols(row: &[Self], max: &mut [Self], arg: &mut [u32], r: u32) {
        max_cols_on(Isa::detected(), row, max, arg, r)
    }

    fn exp_cols(row: &mut [Self], shift: &[Self], acc: &mut [Self]) {
        exp_cols_on(Isa::detected(), row, shift, acc)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }

    fn sum(xs: &[Self]) -> f64 {
        xs.iter().sum()
    }

    fn max_of(xs: &[Self]) -> Self {
        xs.iter()
            .fold(f64::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }

    fn exp_shifted(xs: &mut [Self], shift: Self, scale: Self) -> f64 {
        xs.iter_mut()
            .map(|x| {
                *x = ((*x - shift) * scale).exp();
                *x
            })
            .sum()
    }

    fn dot(a: &[Self], b: &[Self]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn max_cols(row: &[Self], max: &mut [Self], arg: &mut [u32], r: u32) {
        for ((&x, m), a) in row.iter().zip(max.iter_mut()).zip(arg.iter_mut()) {
            if x > *m {
                *m = x;
                *a = r;
            }
        }
    }

    fn exp_cols(row: &mut [Self], shift: &[Self], acc: &mut [Self]) {
        for ((x, &s), a) in row.iter_mut().zip(shift).zip(acc.iter_mut()) {
            *x = (*x - s).exp();
            *a += *x;
        }
    }
}

/// Independent accumulators per loop: a few vector registers' worth, so that the loop is bound by
/// throughput rather than by one accumulator's add or compare latency.
const LANES: usize = 32;
/// Elements summed in f32 lanes before the lanes are added in f64.
const BLOCK: usize = 512;

#[inline(always)]
fn max_lanes(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = xs.chunks_exact(LANES);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let rest = it.remainder().iter().copied();
    acc.into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

#[inline(always)]
fn exp_shifted_lanes(xs: &mut [f32], shift: f32, scale: f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks_mut(BLOCK) {
        let mut acc = [0f32; LANES];
        let mut it = block.chunks_exact_mut(LANES);
        for c in &mut it {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp_f32((*v - shift) * scale);
                *a += *v;
            }
        }
        let mut rest = 0f32;
        for v in it.into_remainder() {
            *v = exp_f32((*v - shift) * scale);
            rest += *v;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64;
    }
    total
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let mut total = 0f64;
    for (ba, bb) in a[..n].chunks(BLOCK).zip(b[..n].chunks(BLOCK)) {
        let mut acc = [0f32; LANES];
        let (mut ia, mut ib) = (ba.chunks_exact(LANES), bb.chunks_exact(LANES));
        for (ca, cb) in (&mut ia).zip(&mut ib) {
            for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
                *s += x * y;
            }
        }
        let rest: f32 = ia
            .remainder()
            .iter()
            .zip(ib.remainder())
            .map(|(x, y)| x * y)
            .sum();
        total += acc.iter().map(|&s| s as f64).sum::<f64>() + rest as f64;
    }
    total
}

#[inline(always)]
fn max_cols_lanes(row: &[f32], max: &mut [f32], arg: &mut [u32], r: u32) {
    // Selects rather than branches, so that the loop compiles to compares and blends.
    for ((&x, m), a) in row.iter().zip(max.iter_mut()).zip(arg.iter_mut()) {
        let greater = x > *m;
        *m = if greater { x } else { *m };
        *a = if greater { r } else { *a };
    }
}

#[inline(always)]
fn exp_cols_lanes(row: &mut [f32], shift: &[f32], acc: &mut [f32]) {
    for ((x, &s), a) in row.iter_mut().zip(shift).zip(acc.iter_mut()) {
        *x = exp_f32(*x - s);
        *a += *x;
    }
}

dispatched!(fn max_on(xs: &[f32]) -> f32 = max_lanes);
dispatched!(fn exp_shifted_on(xs: &mut [f32], shift: f32, scale: f32) -> f64 = exp_shifted_lanes);
dispatched!(fn dot_on(a: &[f32], b: &[f32]) -> f64 = dot_lanes);
dispatched!(fn max_cols_on(row: &[f32], max: &mut [f32], arg: &mut [u32], r: u32) = max_cols_lanes);
dispatched!(fn exp_cols_on(row: &mut [f32], shift: &[f32], acc: &mut [f32]) = exp_cols_lanes);

/// `e^x` in f32 without a libm call, so that loops over it vectorize: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2`, `e^r` by Cephes' degree-7 polynomial, `2^n` built in the exponent bits. Within
/// 2 ulp of `f32::exp` on [-87, 88]; NaN stays NaN; below -87.3 (never reached after a max shift
/// by more than a float can resolve) it flushes to the smallest normal.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a call to roundf.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SFTD_CPU_ISA narrows the set, never widens it past the CPU, and a bad value is reported
    /// and ignored.
    #[test]
    fn requested_isa_only_narrows() {
        let avx2 = Isa(Level::Avx2);
        assert_eq!(kernel_isa_from(avx2, None), (avx2, None));
        assert_eq!(
            kernel_isa_from(avx2, Some("baseline")),
            (Isa(Level::Baseline), None)
        );
        assert_eq!(kernel_isa_from(avx2, Some(" AVX2 ")), (avx2, None));
        let (isa, note) = kernel_isa_from(avx2, Some("avx512"));
        assert_eq!(isa, avx2);
        assert!(note
            .unwrap()
            .contains("wider than this CPU runs; using avx2"));
        let (isa, note) = kernel_isa_from(avx2, Some("sse4"));
        assert_eq!(isa, avx2);
        assert!(note.unwrap().contains("not one of baseline, avx2, avx512"));
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (want, got) = (x.exp(), exp_f32(x));
            assert!(
                (want - got).abs() <= 2.0 * f32::EPSILON * want,
                "exp({x}) = {got}, libm {want}"
            );
            x += 0.0137;
        }
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = xs.iter().map(|&v| v as f64).sum();
        assert!((<f32 as Real>::sum(&xs) - want).abs() < 1e-4);
    }

    /// Rows of awkward lengths (empty, under one lane block, a remainder after whole blocks),
    /// each row loop against the plain scalar computation in f64, through the widest build this
    /// CPU runs and the baseline loops directly.
    #[test]
    fn row_loops_equal_scalar_reference() {
        for n in [0usize, 1, 7, 31, 32, 33, 100, 511, 512, 513, 1500, 151_936] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.731).sin() * 9.0) + (i % 17) as f32 * 0.1)
                .collect();
            let ys: Vec<f32> = (0..n).map(|i| (i as f32 * 0.377).cos()).collect();
            let want_max = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(<f32 as Real>::max_of(&xs), want_max, "max, n={n}");
            assert_eq!(max_lanes(&xs), want_max, "baseline max, n={n}");
            let want_dot: f64 = xs.iter().zip(&ys).map(|(&a, &b)| a as f64 * b as f64).sum();
            let tol = 1e-5 * (1.0 + want_dot.abs()) + 1e-6 * n as f64;
            assert!(
                (<f32 as Real>::dot(&xs, &ys) - want_dot).abs() < tol,
                "dot n={n}"
            );
            assert!(
                (dot_lanes(&xs, &ys) - want_dot).abs() < tol,
                "baseline dot n={n}"
            );
            let (shift, scale) = (want_max, 0.7f32);
            let want: Vec<f64> = xs
                .iter()
                .map(|&v| (((v - shift) * scale) as f64).exp())
                .collect();
            let want_sum: f64 = want.iter().sum();
            for fast in [true, false] {
                let mut got = xs.clone();
                let sum = if fast {
                    <f32 as Real>::exp_shifted(&mut got, shift, scale)
                } else {
                    exp_shifted_lanes(&mut got, shift, scale)
                };
                assert!(
                    (sum - want_sum).abs() <= 1e-5 * want_sum.max(1.0),
                    "sum n={n}"
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() <= 1e-6 * w.max(1e-30), "exp n={n}");
                }
            }
        }
        let with_nan = [1.0f32, f32::NAN, 3.0, -2.0];
        assert_eq!(<f32 as Real>::max_of(&with_nan), 3.0);
        let mut e = with_nan;
        assert!(<f32 as Real>::exp_shifted(&mut e, 3.0, 1.0).is_nan());
        assert_eq!(<f64 as Real>::max_of(&[1.0, f64::NAN, 3.0]), 3.0);
    }

    /// Each loop compiled for each instruction set this CPU runs gives the baseline loop's bits,
    /// on lengths with and without a remainder after the lane blocks.
    #[test]
    fn each_isa_build_equals_the_baseline_loops() {
        for n in [0usize, 5, 32, 77, 1030] {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.913).sin() * 7.0).collect();
            let ys: Vec<f32> = (0..n).map(|i| (i as f32 * 0.29).cos() - 0.2).collect();
            let (mut e_base, mut c_base) = (xs.clone(), xs.clone());
            let sum_base = exp_shifted_lanes(&mut e_base, 1.5, 0.7);
            let (mut m_base, mut a_base, mut acc_base) = (ys.clone(), vec![0u32; n], ys.clone());
            max_cols_lanes(&xs, &mut m_base, &mut a_base, 3);
            exp_cols_lanes(&mut c_base, &ys, &mut acc_base);
            for isa in Isa::each() {
                assert_eq!(max_on(isa, &xs), max_lanes(&xs), "{isa:?} max n={n}");
                assert_eq!(
                    dot_on(isa, &xs, &ys),
                    dot_lanes(&xs, &ys),
                    "{isa:?} dot n={n}"
                );
                let mut e = xs.clone();
                assert_eq!(
                    exp_shifted_on(isa, &mut e, 1.5, 0.7),
                    sum_base,
                    "{isa:?} n={n}"
                );
                assert_eq!(e, e_base, "{isa:?} exp_shifted n={n}");
                let (mut m, mut a) = (ys.clone(), vec![0u32; n]);
                max_cols_on(isa, &xs, &mut m, &mut a, 3);
                assert_eq!(
                    (m, a),
                    (m_base.clone(), a_base.clone()),
                    "{isa:?} max_cols n={n}"
                );
                let (mut c, mut acc) = (xs.clone(), ys.clone());
                exp_cols_on(isa, &mut c, &ys, &mut acc);
                assert_eq!(
                    (c, acc),
                    (c_base.clone(), acc_base.clone()),
                    "{isa:?} exp_cols n={n}"
                );
            }
        }
    }
}
