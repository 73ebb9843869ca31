//! PEFT's LoRA linear `y = x Wᵀ + s·(x Aᵀ) Bᵀ`, W frozen, as one CPU op on the `gemm` crate with a
//! hand-written backward.
//!
//! Composed from candle ops a LoRA projection is a frozen GEMM, two skinny GEMMs, a scale and an
//! add: three (N, O) buffers written per call and held by the graph until backward, every GEMM
//! output zero-filled before it is overwritten, and a backward that computes the frozen and the
//! LoRA path's input gradients separately and adds them in another pass. Here the LoRA product
//! accumulates into the frozen GEMM's output (gemm computes `dst = α·dst + β·lhs·rhs`), the
//! backward accumulates both input-gradient paths into one buffer the same way, no output is
//! zero-filled, and the graph keeps only x and the (N, r) product x Aᵀ.
//!
//! Shapes: N tokens, I in-features, O out-features, r LoRA rank.

use super::dropout::DropMask;
use super::matmul::{accumulate, gemm_into, product, Dst, View};
use candle_core::{
    CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use std::sync::Mutex;

/// `x (..., I) -> x Wᵀ + scaling · (x Aᵀ) Bᵀ (..., O)` for `w (O, I)` frozen and `a (r, I)`,
/// `b (O, r)` trainable. CPU, f32 or f64, all of one dtype.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let op = LoraLinearOp {
        w: w.contiguous()?,
        scaling,
        xa: Mutex::new(None),
    };
    x.contiguous()?.apply_op3_arc(
        &a.contiguous()?,
        &b.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// Whether [`lora_linear`] serves these operands.
pub fn lora_linear_usable(x: &Tensor, w: &Tensor, a: &Tensor) -> bool {
    super::cpu_kernels::serve(x.device())
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && w.dtype() == x.dtype()
        && a.dtype() == x.dtype()
}

impl super::LoraLinear {
    /// The projection through [`lora_linear`] when it serves this call (a LoRA pair, no bias, no
    /// dropout mask drawn, CPU f32/f64); `None` leaves it to the composed path.
    pub(super) fn forward_fused(&self, x: &Tensor, pass: super::Pass) -> Result<Option<Tensor>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let dropout = pass.dropout_key.is_some() && lora.dropout > 0.0;
        if cfg!(feature = "openblas")
            || dropout
            || self.bias.is_some()
            || !lora_linear_usable(x, &self.weight, lora.a.as_tensor())
        {
            return Ok(None);
        }
        let (a, b) = if pass.track {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_detached_tensor(), lora.b.as_detached_tensor())
        };
        lora_linear(x, &self.weight, &a, &b, lora.scaling).map(Some)
    }
}

struct LoraLinearOp {
    /// (O, I), contiguous.
    w: Tensor,
    scaling: f64,
    /// `x Aᵀ (N, r)` from the forward pass, which the B gradient needs.
    xa: Mutex<Option<CpuStorage>>,
}

/// The contiguous elements of a storage under its layout.
fn elems<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("lora linear: contiguous operands expected"),
    }
}

fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("lora linear: CPU tensors expected"),
    }
}

/// Forward: `(y (N, O), xa (N, r))`.
pub(super) fn forward<T: WithDType>(
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    dims: (usize, usize, usize, usize),
    scaling: f64,
) -> (Vec<T>, Vec<T>) {
    forward_on(x, x, w, a, b, dims, scaling)
}

/// [`forward`] with the adapter reading `x_lora (N, I)`, x after LoRA dropout:
/// `y = x Wᵀ + s·(x_lora Aᵀ) Bᵀ`.
pub(super) fn forward_on<T: WithDType>(
    x: &[T],
    x_lora: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    (n, i, o, r): (usize, usize, usize, usize),
    scaling: f64,
) -> (Vec<T>, Vec<T>) {
    let xa = product((n, r, i), View::rows(x_lora, i), View::t(a, i), T::one());
    let mut y = product((n, o, i), View::rows(x, i), View::t(w, i), T::one());
    accumulate(
        &mut y,
        (n, o, r),
        View::rows(&xa, r),
        View::t(b, r),
        T::from_f64(scaling),
    );
    (y, xa)
}

/// Backward: `(dx (N, I) if wanted, dA (r, I), dB (O, r))` for the output gradient `g (N, O)`.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn backward<T: WithDType>(
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    xa: &[T],
    g: &[T],
    dims: (usize, usize, usize, usize),
    scaling: f64,
    want_dx: bool,
) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
    let (n, i, ..) = dims;
    let mut dx = want_dx.then(|| Vec::with_capacity(n * i));
    let dx_into = dx.as_mut().map(|d| DxInto {
        dst: d.as_mut_ptr(),
        accumulate: false,
    });
    // SAFETY: dx has capacity N·I and is written whole (accumulate = false) before its length
    // is set.
    let (da, db) = unsafe { backward_into(x, w, a, b, xa, g, dims, scaling, dx_into, None) };
    if let Some(d) = dx.as_mut() {
        // SAFETY: written above.
        unsafe { d.set_len(n * i) };
    }
    (dx, da, db)
}

/// Where a backward writes its input gradient `(N, I)`: over what `dst` holds, or added to it.
pub(super) struct DxInto<T> {
    pub dst: *mut T,
    pub accumulate: bool,
}

impl<T> DxInto<T> {
    /// The gradient as a product's destination, `i` features wide.
    pub fn rows_of(&self, i: usize) -> Dst<T> {
        Dst {
            ptr: self.dst,
            rs: i,
            accumulate: self.accumulate,
        }
    }
}

/// Backward: `(dA (r, I), dB (O, r))` for the output gradient `g (N, O)`, and `dx = g W +
/// s·(g B) A` into `dx` when given. With LoRA dropout, `x` is the adapter's input (x after
/// dropout) and `mask` the dropout mask, which the adapter's part of `dx` passes through.
///
/// # Safety
/// `dx.dst` addresses N·I elements (initialized when `accumulate`).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn backward_into<T: WithDType>(
    x: &[T],
    w: &[T],
    a: &[T],
    b: &[T],
    xa: &[T],
    g: &[T],
    (n, i, o, r): (usize, usize, usize, usize),
    scaling: f64,
    dx: Option<DxInto<T>>,
    mask: Option<&DropMask>,
) -> (Vec<T>, Vec<T>) {
    let s = T::from_f64(scaling);
    // gb = g B (N, r), the gradient reaching x Aᵀ (before the scale).
    let gb = product((n, r, o), View::rows(g, o), View::rows(b, r), T::one());
    if let Some(dx) = dx {
        // dx (+)= g W + s · gb A (⊙ the mask)
        let (gv, wv) = (View::rows(g, o), View::rows(w, i));
        gemm_into(dx.rows_of(i), (n, i, o), gv, wv, T::one(), true);
        let (gbv, av) = (View::rows(&gb, r), View::rows(a, i));
        match mask {
            None => gemm_into(Dst::add_to(dx.dst, i), (n, i, r), gbv, av, s, true),
            Some(mask) => {
                let through = product((n, i, r), gbv, av, s);
                mask.add_masked(std::slice::from_raw_parts_mut(dx.dst, n * i), &through);
            }
        }
    }
    // dA = s · gbᵀ x (r, I); dB = s · gᵀ xa (O, r)
    let da = product((r, i, n), View::t(&gb, r), View::rows(x, i), s);
    let db = product((o, r, n), View::t(g, o), View::rows(xa, r), s);
    (da, db)
}

/// One projection's operands: W, and A, B, scaling when it carries LoRA.
pub(super) type Proj<'a, T> = (&'a [T], Option<(&'a [T], &'a [T], f64)>);

/// `x (N, I) -> (x Wᵀ + s·(x' Aᵀ) Bᵀ (N, O), x' Aᵀ (N, r))`, the second empty without LoRA;
/// `x'` is `x ⊙ mask` under LoRA dropout, else `x`.
pub(super) fn project<T: WithDType>(
    x: &[T],
    (w, lora): Proj<T>,
    (n, i, o): (usize, usize, usize),
    mask: Option<&DropMask>,
) -> [Vec<T>; 2] {
    match (lora, mask) {
        (Some((a, b, s)), None) => {
            let (y, xa) = forward(x, w, a, b, (n, i, o, a.len() / i), s);
            [y, xa]
        }
        (Some((a, b, s)), Some(mask)) => {
            let (y, xa) = forward_on(x, &mask.apply(x), w, a, b, (n, i, o, a.len() / i), s);
            [y, xa]
        }
        (None, _) => [
            product((n, o, i), View::rows(x, i), View::t(w, i), T::one()),
            Vec::new(),
        ],
    }
}

/// The adapter's input product `x' Aᵀ (N, r)` (`x' = x ⊙ mask` under LoRA dropout), empty
/// without LoRA: all a projection's backward needs from a forward whose output is not read.
pub(super) fn adapter_input<T: WithDType>(
    x: &[T],
    (_, lora): Proj<T>,
    (n, i): (usize, usize),
    mask: Option<&DropMask>,
) -> Vec<T> {
    let Some((a, ..)) = lora else {
        return Vec::new();
    };
    let dropped = mask.map(|m| m.apply(x));
    let x = dropped.as_deref().unwrap_or(x);
    product(
        (n, a.len() / i, i),
        View::rows(x, i),
        View::t(a, i),
        T::one(),
    )
}

/// [`project`]'s backward for the output gradient `g (N, O)`: its input gradient into `dx`
/// when given, and `(dA, dB)` when it carries LoRA.
///
/// # Safety
/// As [`backward_into`].
#[allow(clippy::type_complexity)]
pub(super) unsafe fn project_bwd<T: WithDType>(
    x: &[T],
    (w, lora): Proj<T>,
    (xa, mask): (&[T], Option<&DropMask>),
    g: &[T],
    (n, i, o): (usize, usize, usize),
    dx: Option<DxInto<T>>,
) -> Option<(Vec<T>, Vec<T>)> {
    match lora {
        Some((a, b, s)) => {
            let dims = (n, i, o, a.len() / i);
            let dropped = mask.map(|m| m.apply(x));
            let x = dropped.as_deref().unwrap_or(x);
            Some(backward_into(x, w, a, b, xa, g, dims, s, dx, mask))
        }
        None => {
            if let Some(dx) = dx {
                let (gv, wv) = (View::rows(g, o), View::rows(w, i));
                gemm_into(dx.rows_of(i), (n, i, o), gv, wv, T::one(), true);
            }
            None
        }
    }
}

impl LoraLinearOp {
    fn dims(&self, xl: &Layout, al: &Layout, bl: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (o, i) = self.w.dims2()?;
        let (r, ai) = al.shape().dims2()?;
        let (bo, br) = bl.shape().dims2()?;
        if xl.dims().last() != Some(&i) || ai != i || bo != o || br != r {
            candle_core::bail!(
                "lora linear: x {:?}, W ({o}, {i}), A ({r}, {ai}), B ({bo}, {br}) do not fit",
                xl.dims()
            )
        }
        Ok((xl.shape().elem_count() / i, i, o, r))
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(xl, al, bl)?;
        let (ws, wl) = self.w.storage_and_layout();
        let ws = cpu(&ws)?;
        let (y, xa) = match xs {
            CpuStorage::F32(_) => {
                let (y, xa) = forward::<f32>(
                    elems(xs, xl)?,
                    elems(ws, wl)?,
                    elems(as_, al)?,
                    elems(bs, bl)?,
                    dims,
                    self.scaling,
                );
                (CpuStorage::F32(y), CpuStorage::F32(xa))
            }
            CpuStorage::F64(_) => {
                let (y, xa) = forward::<f64>(
                    elems(xs, xl)?,
                    elems(ws, wl)?,
                    elems(as_, al)?,
                    elems(bs, bl)?,
                    dims,
                    self.scaling,
                );
                (CpuStorage::F64(y), CpuStorage::F64(xa))
            }
            _ => candle_core::bail!("lora linear: f32 or f64 expected"),
        };
        *self.xa.lock().expect("lora xa") = Some(xa);
        let mut out = xl.dims().to_vec();
        *out.last_mut().expect("rank >= 1") = dims.2;
        Ok((y, Shape::from(out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (ws, wl) = self.w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (xs, as_, bs, ws, gs) = (cpu(&xs)?, cpu(&as_)?, cpu(&bs)?, cpu(&ws)?, cpu(&gs)?);
        let dims = self.dims(xl, al, bl)?;
        let (n, i, o, r) = dims;
        let xa_guard = self.xa.lock().expect("lora xa");
        let Some(xa) = xa_guard.as_ref() else {
            candle_core::bail!("lora linear: backward before forward")
        };
        // The input gradient is skipped where nothing upstream of x is trained (the first
        // projections of a graph that starts at the frozen embedding).
        let want_dx = x.track_op();
        let dev = Device::Cpu;
        macro_rules! run {
            ($t:ty) => {{
                let (dx, da, db) = backward::<$t>(
                    elems(xs, xl)?,
                    elems(ws, wl)?,
                    elems(as_, al)?,
                    elems(bs, bl)?,
                    elems(xa, &Layout::contiguous((n, r)))?,
                    elems(gs, gl)?,
                    dims,
                    self.scaling,
                    want_dx,
                );
                (
                    dx.map(|d| Tensor::from_vec(d, x.shape(), &dev))
                        .transpose()?,
                    Tensor::from_vec(da, (r, i), &dev)?,
                    Tensor::from_vec(db, (o, r), &dev)?,
                )
            }};
        }
        let (dx, da, db) = match xs {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            _ => candle_core::bail!("lora linear: f32 or f64 expected"),
        };
        Ok((dx, Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::testing::check_fused_inputs;
    use candle_core::{DType, Var};

    /// The fused op and the composed candle ops agree in value and in the gradients of x, A and
    /// B, against one random cotangent.
    fn check(dtype: DType, tol: f64) {
        let dev = Device::Cpu;
        let (n, i, o, r, s) = (13, 24, 20, 4, 1.7);
        let rnd = |shape: (usize, usize)| {
            Tensor::randn(0f64, 1., shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (x0, w, a0, b0, cot) = (
            rnd((n, i)),
            rnd((o, i)),
            rnd((r, i)),
            rnd((o, r)),
            rnd((n, o)),
        );
        check_fused_inputs(
            |fused, v| {
                let (x, a, b) = (v[0], v[1], v[2]);
                if fused {
                    return lora_linear(x, &w, a, b, s);
                }
                let delta = x.matmul(&a.t()?)?.matmul(&b.t()?)?;
                x.matmul(&w.t()?)? + (delta * s)?
            },
            &[&x0, &a0, &b0],
            &cot,
            &["y", "dx", "dA", "dB"],
            tol,
            format_args!("{dtype:?}"),
        );
    }

    #[test]
    fn lora_linear_equals_composed_ops_with_gradients_f32() {
        check(DType::F32, 1e-4);
    }

    #[test]
    fn lora_linear_equals_composed_ops_with_gradients_f64() {
        check(DType::F64, 1e-12);
    }

    #[test]
    fn untracked_input_gets_no_gradient_but_lora_does() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (5, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (6, 8), &dev).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 8), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (6, 2), &dev).unwrap()).unwrap();
        let y = lora_linear(&x, &w, a.as_tensor(), b.as_tensor(), 2.0).unwrap();
        let gs = y.sum_all().unwrap().backward().unwrap();
        assert!(gs.get(&x).is_none());
        assert!(gs.get(&a).is_some() && gs.get(&b).is_some());
    }
}
