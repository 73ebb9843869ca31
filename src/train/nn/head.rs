//! The LM head fused with its cross-entropy: logits, loss, argmax hits and the gradient with
//! respect to the hidden states in one call.
//!
//! On CPU the logits are built vocabulary-major, `logitsᵀ (V, C) = W · xᵀ`. The token-major
//! product `x · Wᵀ` makes the GEMM repack the whole vocabulary × hidden weight (hundreds of MB
//! at Qwen3's vocabulary) element by element into its panel layout on every call; the
//! vocabulary-major one packs only the C hidden states and streams the weight as it lies, which
//! runs the head's forward GEMM about a quarter faster. The softmax then runs down the columns,
//! each pass still one sweep over the logits, and the input gradient reads the gradient through
//! its transpose. Other devices compose the three steps from tensor ops.
//!
//! Shapes: C label positions, H hidden, V vocabulary.

use super::layer::elems;
use super::matmul::{gemm_into, Dst, SendPtr, View};
use super::ops::{softmax_xent, XentStats};
use super::real::Real;
use super::{frozen_linear, frozen_linear_grad};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Token cross-entropy of the LM head `w (V, H)` at the hidden states `x (C, H)` against
/// `targets (C,)` u32: the summed loss, the argmax hits and, with `grad_scale = Some(s)`, the
/// gradient of `s · Σ loss` with respect to `x`, `(C, H)` in `x`'s dtype.
pub fn head_xent(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<(XentStats, Option<Tensor>)> {
    let (c, h) = x.dims2()?;
    let (v, wh) = w.dims2()?;
    if wh != h || targets.dims1()? != c {
        candle_core::bail!(
            "head_xent: x ({c}, {h}), w ({v}, {wh}), {} targets",
            targets.elem_count()
        )
    }
    if super::cpu_kernels::serve(x.device()) && w.device().is_cpu() && x.dtype() == w.dtype() {
        let tg = targets.to_vec1::<u32>()?;
        if let Some(&t) = tg.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("head_xent: target {t} outside the vocabulary of {v}")
        }
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        match x.dtype() {
            DType::F32 => return cpu::<f32>(&x, &w, (c, h, v), &tg, grad_scale),
            DType::F64 => return cpu::<f64>(&x, &w, (c, h, v), &tg, grad_scale),
            _ => {}
        }
    }
    let logits = frozen_linear(x, w)?; // (C, V)
    let (stats, dlogits) = softmax_xent(logits, targets, grad_scale)?;
    let dx = match dlogits {
        Some(g) => Some(frozen_linear_grad(&g.to_dtype(w.dtype())?, w)?.to_dtype(x.dtype())?),
        None => None,
    };
    Ok((stats, dx))
}

/// The CPU path of [`head_xent`] on contiguous `x` and `w` holding `T`s.
fn cpu<T: Real + Send + Sync>(
    x: &Tensor,
    w: &Tensor,
    (c, h, v): (usize, usize, usize),
    targets: &[u32],
    grad_scale: Option<f64>,
) -> Result<(XentStats, Option<Tensor>)> {
    // Both read in place: the (V, H) weight is hundreds of MB at Qwen3's vocabulary.
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = w.storage_and_layout();
    let xs: &[T] = elems(&x_storage, x_layout)?;
    let ws: &[T] = elems(&w_storage, w_layout)?;
    let mut lt: Vec<T> = Vec::with_capacity(v * c);
    // SAFETY: lt has capacity V·C and every element is written (accumulate = false) before the
    // length is set; the views address the (V, H) weight and the (H, C) transpose of x.
    unsafe {
        gemm_into(
            Dst::fresh(lt.as_mut_ptr(), c),
            (v, c, h),
            View::rows(ws, h),
            View::t(xs, h),
            T::one(),
            true,
        );
        lt.set_len(v * c);
    }
    let stats = xent_cols(&mut lt, c, targets, grad_scale);
    let Some(_) = grad_scale else {
        return Ok((stats, None));
    };
    let dx = input_grad(&lt, ws, (c, h, v));
    Ok((stats, Some(Tensor::from_vec(dx, (c, h), x.device())?)))
}

/// Vocabulary bands per thread of the input gradient, taken by whichever thread is free.
const GRAD_BANDS_PER_THREAD: usize = 2;

/// `dx (C, H) = dlogits (C, V) · W (V, H)` from `lt = dlogitsᵀ (V, C)`: the depth V is cut into
/// bands, each band's product goes into a (C, H) buffer of its own, and the buffers are added.
/// Cutting C or H instead would stream all of `lt` (as large as the logits) once per part.
fn input_grad<T: Real + Send + Sync>(
    lt: &[T],
    ws: &[T],
    (c, h, v): (usize, usize, usize),
) -> Vec<T> {
    let threads = super::threads::count();
    let bands = (threads * GRAD_BANDS_PER_THREAD).min(v.div_ceil(64)).max(1);
    let per = v.div_ceil(bands);
    let band = |b: usize| -> Vec<T> {
        let (a, len) = (b * per, per.min(v - b * per));
        let mut part = Vec::with_capacity(c * h);
        // SAFETY: part has capacity C·H and is fully written (accumulate = false) before its
        // length is set; the views address rows a..a + len of lt (as their transpose) and of W.
        unsafe {
            let lhs = View {
                ptr: lt.as_ptr().add(a * c),
                rs: 1,
                cs: c as isize,
            };
            let rhs = View::rows(&ws[a * h..(a + len) * h], h);
            gemm_into(
                Dst::fresh(part.as_mut_ptr(), h),
                (c, h, len),
                lhs,
                rhs,
                T::one(),
                false,
            );
            part.set_len(c * h);
        }
        part
    };
    let mut parts: Vec<Vec<T>> = (0..bands).into_par_iter().map(band).collect();
    let mut dx = parts.swap_remove(0);
    for p in &parts {
        dx.iter_mut().zip(p).for_each(|(d, &x)| *d += x);
    }
    dx
}

/// Logits rows summed in `T` before the sums are carried on in f64 (as the row-major kernel
/// does along a row).
const SUM_BLOCK: usize = 512;
/// Columns (tokens) per thread below which the softmax runs on one thread.
const MIN_COLS_PER_THREAD: usize = 32;

/// Cross-entropy of each column `j` of the vocabulary-major logits `lt (V, C)` against
/// `targets[j]`, over candle's CPU threads by blocks of columns. With `scale = Some(s)`, rewrites
/// `lt` in place as `s · (softmax − onehot)`, column by column. A NaN anywhere in a column makes
/// that token's loss NaN; an argmax hit is the first largest logit being the target.
fn xent_cols<T: Real + Send + Sync>(
    lt: &mut [T],
    c: usize,
    targets: &[u32],
    scale: Option<f64>,
) -> XentStats {
    let threads = super::threads::count().min(c / MIN_COLS_PER_THREAD).max(1);
    let per = c.div_ceil(threads);
    let base = SendPtr(lt.as_mut_ptr());
    let v = lt.len() / c.max(1);
    let block = |j0: usize| {
        let width = per.min(c - j0);
        // SAFETY: each block owns columns j0..j0 + width of every row; blocks are disjoint and
        // joined before `lt` is used again.
        let row =
            |r: usize| unsafe { std::slice::from_raw_parts_mut(base.get().add(r * c + j0), width) };
        xent_block(row, v, &targets[j0..j0 + width], scale)
    };
    let parts: Vec<XentStats> = if threads == 1 {
        vec![block(0)]
    } else {
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..c)
                .step_by(per)
                .map(|j0| sc.spawn(move || block(j0)))
                .collect();
            let joined = handles.into_iter().map(|h| h.join().expect("xent worker"));
            joined.collect()
        })
    };
    parts.iter().fold(XentStats::default(), |a, p| XentStats {
        loss_sum: a.loss_sum + p.loss_sum,
        correct: a.correct + p.correct,
    })
}

/// One block of columns: `row(r)` is row r's slice of the block, `targets` its columns' targets.
fn xent_block<'a, T: Real>(
    row: impl Fn(usize) -> &'a mut [T],
    v: usize,
    targets: &[u32],
    scale: Option<f64>,
) -> XentStats {
    let w = targets.len();
    let mut max = vec![T::from_f64(f64::NEG_INFINITY); w];
    let mut arg = vec![0u32; w];
    for r in 0..v {
        T::max_cols(row(r), &mut max, &mut arg, r as u32);
    }
    let picked: Vec<f64> = (targets.iter().enumerate())
        .map(|(j, &t)| row(t as usize)[j].to_f64())
        .collect();
    let mut sums = vec![0f64; w];
    let mut acc = vec![T::from_f64(0.0); w];
    for r0 in (0..v).step_by(SUM_BLOCK) {
        acc.fill(T::from_f64(0.0));
        for r in r0..(r0 + SUM_BLOCK).min(v) {
            T::exp_cols(row(r), &max, &mut acc);
        }
        sums.iter_mut()
            .zip(&acc)
            .for_each(|(s, a)| *s += a.to_f64());
    }
    if let Some(s) = scale {
        let k: Vec<T> = sums.iter().map(|&sum| T::from_f64(s / sum)).collect();
        for r in 0..v {
            row(r).iter_mut().zip(&k).for_each(|(x, &k)| *x *= k);
        }
        for (j, &t) in targets.iter().enumerate() {
            row(t as usize)[j] -= T::from_f64(s);
        }
    }
    let mut stats = XentStats::default();
    for j in 0..w {
        stats.loss_sum += sums[j].ln() + max[j].to_f64() - picked[j];
        stats.correct += (arg[j] == targets[j]) as u64;
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::ops::softmax_xent_ops;
    use candle_core::Device;

    /// The composed reference: logits by candle's matmul, the softmax from tensor ops, the input
    /// gradient by a second matmul.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        scale: Option<f64>,
    ) -> (XentStats, Option<Tensor>) {
        let logits = x.matmul(&w.t().unwrap()).unwrap();
        let (stats, g) = softmax_xent_ops(&logits, targets, scale).unwrap();
        (stats, g.map(|g| g.matmul(w).unwrap()))
    }

    fn case(dtype: DType, (c, h, v): (usize, usize, usize), tol: f64) {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 1.5, (c, h), &dev).unwrap())
            .to_dtype(dtype)
            .unwrap();
        let w = (Tensor::randn(0f64, 1.0, (v, h), &dev).unwrap())
            .to_dtype(dtype)
            .unwrap();
        let tg: Vec<u32> = (0..c).map(|j| ((j * 7919 + 3) % v) as u32).collect();
        let targets = Tensor::new(tg.as_slice(), &dev).unwrap();
        for scale in [None, Some(0.25)] {
            let (want, want_dx) = reference(&x, &w, &targets, scale);
            let (got, got_dx) = head_xent(&x, &w, &targets, scale).unwrap();
            let rel = (want.loss_sum - got.loss_sum).abs() / want.loss_sum.abs();
            assert!(
                rel < tol,
                "{dtype:?} {c}x{h}x{v}: loss {} vs {}",
                got.loss_sum,
                want.loss_sum
            );
            assert_eq!(want.correct, got.correct, "{dtype:?} {c}x{h}x{v}: hits");
            assert_eq!(want_dx.is_some(), got_dx.is_some());
            if let (Some(a), Some(b)) = (want_dx, got_dx) {
                assert_eq!(b.dims(), &[c, h]);
                let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    diff < tol,
                    "{dtype:?} {c}x{h}x{v}: gradient differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn vocabulary_major_head_equals_composed_ops() {
        // One block of columns (9 tokens), and several blocks on more than one thread (70);
        // vocabularies across the f32 sum blocks and not a multiple of any vector width.
        for shape in [(9, 16, 50), (70, 24, 1037), (3, 8, 5)] {
            case(DType::F64, shape, 1e-10);
            case(DType::F32, shape, 2e-5);
        }
    }

    #[test]
    fn hits_and_nan_follow_the_row_major_kernel() {
        let dev = Device::Cpu;
        // x picks the basis vector of its target: each token's largest logit is its target.
        let (c, v) = (40usize, 64usize);
        let tg: Vec<u32> = (0..c).map(|j| ((j * 5) % v) as u32).collect();
        let w = Tensor::eye(v, DType::F32, &dev).unwrap();
        let x =
            candle_nn::encoding::one_hot(Tensor::new(tg.as_slice(), &dev).unwrap(), v, 9f32, 0f32)
                .unwrap();
        let targets = Tensor::new(tg.as_slice(), &dev).unwrap();
        let (s, _) = head_xent(&x, &w, &targets, None).unwrap();
        assert_eq!(s.correct, c as u64);
        // A NaN in one token's hidden state makes the loss NaN.
        let mut xs = x.to_vec2::<f32>().unwrap();
        xs[3][7] = f32::NAN;
        let x = Tensor::new(xs, &dev).unwrap();
        let (s, dx) = head_xent(&x, &w, &targets, Some(1.0)).unwrap();
        assert!(s.loss_sum.is_nan());
        assert!(dx.is_some());
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((6, 4), DType::F32, &dev).unwrap();
        let targets = Tensor::new(&[1u32, 6], &dev).unwrap();
        let err = head_xent(&x, &w, &targets, None).unwrap_err().to_string();
        assert!(err.contains("target 6"), "{err}");
    }
}
