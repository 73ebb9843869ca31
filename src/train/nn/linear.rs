//! Frozen linear (a matmul whose backward yields only the input gradient) and PEFT's LoRA linear.
//!
//! Shapes: N tokens, I in-features, O out-features, r LoRA rank.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, Var};

/// `y = x Wᵀ` with `W` captured as a constant: candle's own matmul backward would also compute
/// `xᵀ·g` for `W` (a weight-sized GEMM and buffer per layer) even though `W` is never trained.
struct FrozenMatmul {
    /// (O, I), contiguous.
    w: Tensor,
}

impl FrozenMatmul {
    fn fwd<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        w: &S,
        wl: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (out_f, in_f) = wl.shape().dims2()?;
        if !xl.is_contiguous() || xl.dims().last() != Some(&in_f) {
            candle_core::bail!(
                "frozen linear: input must be contiguous with last dim {in_f}, got {:?}",
                xl.dims()
            )
        }
        let m = xl.shape().elem_count() / in_f;
        // (M, I) @ (I, O): W's transpose is a stride swap, no copy.
        let y = x.matmul(
            w,
            (1, m, out_f, in_f),
            &Layout::contiguous_with_offset((m, in_f), xl.start_offset()),
            &wl.transpose(0, 1)?,
        )?;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out_f;
        Ok((y, Shape::from(dims)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) if !super::cpu_kernels::enabled() => self.fwd(s, l, w, wl),
            #[cfg(feature = "openblas")]
            Storage::Cpu(w) if blas::usable(s, l, w, wl) => blas::x_wt(s, l, w, wl),
            Storage::Cpu(w) => {
                super::matmul::x_wt(s, l, w, wl).unwrap_or_else(|| self.fwd(s, l, w, wl))
            }
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => self.fwd(s, l, w, wl),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        frozen_linear_grad(g, &self.w).map(Some)
    }
}

/// OpenBLAS sgemm for the two large frozen-weight GEMMs of every projection (opt-in feature:
/// on these CPUs it runs about twice as fast as candle's default gemm).
#[cfg(feature = "openblas")]
mod blas {
    use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage};
    use std::os::raw::c_int;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;

    #[link(name = "openblas")]
    extern "C" {
        fn cblas_sgemm(
            order: c_int,
            ta: c_int,
            tb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
    }

    fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
        match s {
            CpuStorage::F32(v) if l.is_contiguous() => {
                Some(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
            }
            _ => None,
        }
    }

    pub fn usable(x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> bool {
        f32s(x, xl).is_some() && f32s(w, wl).is_some()
    }

    /// `y (M, O) = x (M, I) · Wᵀ`.
    pub fn x_wt(
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o, i) = wl.shape().dims2()?;
        let (xs, ws) = (f32s(x, xl).expect("checked"), f32s(w, wl).expect("checked"));
        let m = xs.len() / i;
        let mut y = vec![0f32; m * o];
        // SAFETY: slices sized (m,i), (o,i), (m,o) as the arguments state.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                m as c_int,
                o as c_int,
                i as c_int,
                1.0,
                xs.as_ptr(),
                i as c_int,
                ws.as_ptr(),
                i as c_int,
                0.0,
                y.as_mut_ptr(),
                o as c_int,
            );
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = o;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// `dx (M, I) = g (M, O) · W`.
    pub struct GradInput {
        pub w: candle_core::Tensor,
    }

    impl CustomOp1 for GradInput {
        fn name(&self) -> &'static str {
            "frozen-linear-grad"
        }
        fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            let (ws, wl) = self.w.storage_and_layout();
            let Storage::Cpu(w) = &*ws else {
                candle_core::bail!("weight not on CPU")
            };
            let (o, i) = wl.shape().dims2()?;
            let (Some(gs), Some(wv)) = (f32s(g, gl), f32s(w, wl)) else {
                candle_core::bail!("frozen linear grad: f32 contiguous operands expected")
            };
            let m = gs.len() / o;
            let mut dx = vec![0f32; m * i];
            // SAFETY: slices sized (m,o), (o,i), (m,i) as the arguments state.
            unsafe {
                cblas_sgemm(
                    ROW_MAJOR,
                    NO_TRANS,
                    NO_TRANS,
                    m as c_int,
                    i as c_int,
                    o as c_int,
                    1.0,
                    gs.as_ptr(),
                    o as c_int,
                    wv.as_ptr(),
                    i as c_int,
                    0.0,
                    dx.as_mut_ptr(),
                    i as c_int,
                );
            }
            let mut dims = gl.dims().to_vec();
            *dims.last_mut().expect("rank >= 1") = i;
            Ok((CpuStorage::F32(dx), Shape::from(dims)))
        }
    }
}

/// `x (..., I) -> x Wᵀ (..., O)`; no gradient ever flows to `w`.
///
/// When `w` is stored narrower than `x` (f16/bf16 base weights under an f32 residual stream),
/// only the GEMM runs in `w`'s dtype: `x` is cast down for it and the product cast back, and the
/// input gradient returns through the same casts to `x`'s dtype.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    if x.dtype() == w.dtype() {
        return x.apply_op1(FrozenMatmul { w: w.clone() });
    }
    x.to_dtype(w.dtype())?
        .apply_op1(FrozenMatmul { w: w.clone() })?
        .to_dtype(x.dtype())
}

/// The input gradient of [`frozen_linear`]: `g (..., O) -> g W (..., I)`.
pub fn frozen_linear_grad(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "openblas")]
    if super::cpu_kernels::serve(g.device()) && g.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return g
            .contiguous()?
            .apply_op1_no_bwd(&blas::GradInput { w: w.clone() });
    }
    if let Some(dx) = super::matmul::g_w(g, w)? {
        return Ok(dx);
    }
    g.broadcast_matmul(w)
}

/// A frozen base projection, optionally wrapped with a trainable LoRA pair.
pub struct LoraLinear {
    /// (O, I) frozen, in the compute dtype.
    pub weight: Tensor,
    /// (O,) frozen.
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// PEFT's LoRA: `ΔW x = scaling · B(A(dropout(x)))`, A (r, I), B (O, r), both f32 masters.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
}

/// How a forward pass runs: whether LoRA weights are tracked for autograd, and which dropout mask
/// to draw. Masks are a pure function of `key`, so a checkpointed layer recomputes the very same
/// activations and a resumed run draws the same masks as an uninterrupted one.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub track: bool,
    /// `None` disables dropout (eval, or p = 0).
    pub dropout_key: Option<u64>,
}

impl LoraLinear {
    /// The frozen projection alone, `x (N, I) -> x Wᵀ + b (N, O)`: any attached LoRA is ignored.
    pub fn forward_frozen(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = frozen_linear(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `x (N, I) -> (N, O)`.
    pub fn forward(&self, x: &Tensor, pass: Pass, module_key: u64) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_fused(x, pass)? {
            return Ok(y);
        }
        let mut y = frozen_linear(x, &self.weight)?;
        overflow_probe::check(&y, module_key)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        let (a, b) = if pass.track {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.as_detached_tensor(), lora.b.as_detached_tensor())
        };
        // PEFT casts the input to the adapter dtype (f32) and the result back.
        let mut xa = x.to_dtype(a.dtype())?;
        if let (Some(key), true) = (pass.dropout_key, lora.dropout > 0.0) {
            let mask = dropout_mask(
                xa.dtype(),
                xa.shape(),
                lora.dropout,
                key ^ module_key,
                xa.device(),
            )?;
            xa = (xa * mask)?;
        }
        // (N, I) @ (I, r) -> (N, r) @ (r, O) -> (N, O). PEFT scales the (N, O) product; scaling
        // the (N, r) one instead is the same up to rounding and spares a pass over (N, O) each
        // way.
        let delta = (xa.matmul(&a.t()?)? * lora.scaling)?.matmul(&b.t()?)?;
        let delta = delta.to_dtype(y.dtype())?;
        y + delta
    }
}

/// Inverted-dropout mask (values 0 or 1/(1-p)) drawn from a generator seeded by `key`, on the
/// device that uses it: a GPU draws it with its own generator (reseeded with `key`, so the mask is
/// still a pure function of it) instead of receiving it over the bus for every module and layer.
pub fn dropout_mask(
    dtype: DType,
    shape: &Shape,
    p: f64,
    key: u64,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    if !device.is_cpu() {
        // candle's CUDA `set_seed` recreates the cuRAND generator, so equal keys give equal
        // masks (tests/cuda.rs, run on an H200).
        device.set_seed(key)?;
        let u = Tensor::rand(0f32, 1f32, shape, device)?;
        return (u.ge(p)?.to_dtype(DType::F32)? * (1.0 / (1.0 - p)))?.to_dtype(dtype);
    }
    let data: Vec<f32> = super::dropout::DropMask::draw(shape.elem_count(), p, key).values();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// Kaiming-uniform with a = √5 on a (rows, fan_in) matrix: U(±1/√fan_in), PEFT's init for A.
pub fn kaiming_uniform_a(rows: usize, fan_in: usize, rng: &mut impl rand::Rng) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    (0..rows * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect()
}

/// A diagnostic pass that finds the first projection whose base GEMM output is not finite (an
/// f16 overflow), so a job can fail naming the layer. Off by default: the check reads a value back
/// from the device for every projection, so it runs only when a loss has already come out
/// non-finite. Scoped to the calling thread.
pub mod overflow_probe {
    use candle_core::{DType, Tensor};
    use std::cell::Cell;

    thread_local! {
        /// `None`: not probing. `Some(hit)`: probing, with the first non-finite module key.
        static PROBE: Cell<Option<Option<u64>>> = const { Cell::new(None) };
    }

    /// Runs `f` with the probe on; returns its result and the module key of the first projection
    /// whose output held inf or NaN.
    pub fn run<T>(f: impl FnOnce() -> T) -> (T, Option<u64>) {
        PROBE.with(|p| p.set(Some(None)));
        let out = f();
        let hit = PROBE.with(|p| p.replace(None)).flatten();
        (out, hit)
    }

    pub(super) fn check(y: &Tensor, module_key: u64) -> candle_core::Result<()> {
        if PROBE.with(|p| p.get()) != Some(None) {
            return Ok(());
        }
        if !all_finite(y)? {
            PROBE.with(|p| p.set(Some(Some(module_key))));
        }
        Ok(())
    }

    /// Whether every element is finite: their f32 sum is inf or NaN otherwise.
    pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
        let s = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(s.is_finite())
    }
}
