//! Launches sftd's CUDA kernels (`cuda/row_ops.cu`, compiled to PTX by `build.rs`): the CUDA
//! side of the fused ops whose CPU kernels live in `fused`, `rms_norm` and `swiglu`. Each
//! function takes the op's operands as candle hands them to `cuda_fwd` (storage and layout,
//! contiguous) and returns the output storage; the ops stay the autograd nodes.
//!
//! Shapes: rows of C elements; N tokens, H heads, D head dim; T one sequence's length.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The module name sftd's kernels are cached under in candle's device.
const MODULE: &str = "sftd_row_ops";

/// Threads per block for a row kernel: about eight elements a thread, whole warps, at most 1024.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32
}

fn rows_config(rows: usize, cols: usize) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        candle_core::bail!("cuda kernel: {rows} rows of {cols} is too large for one launch")
    }
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (row_threads(cols), 1, 1),
        shared_mem_bytes: 0,
    })
}

fn elementwise_config(n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(256);
    if blocks > i32::MAX as usize {
        candle_core::bail!("cuda kernel: {n} elements is too many for one launch")
    }
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `name_f32` or `name_f64` for `dtype`.
fn kernel_name(name: &str, dtype: DType) -> Result<String> {
    match dtype {
        DType::F32 => Ok(format!("{name}_f32")),
        DType::F64 => Ok(format!("{name}_f64")),
        other => candle_core::bail!("{name}: f32 or f64 expected on the GPU, got {other:?}"),
    }
}

/// The kernel `name` for `dtype`, loaded once per device (candle's function type is not
/// nameable outside candle, hence a macro rather than a function).
macro_rules! kernel {
    ($dev:expr, $name:expr, $dtype:expr) => {
        $dev.get_or_load_custom_func(&kernel_name($name, $dtype)?, MODULE, ptx::ROW_OPS)
    };
}

/// The contiguous elements of a storage under its layout.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("cuda kernel: contiguous input expected"),
    }
}

/// Runs `f` on a captured tensor's CUDA storage (RMSNorm's weight, the rotary tables).
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(s) => f(s, l),
        _ => candle_core::bail!("cuda kernel: a captured tensor is not on the GPU"),
    }
}

fn output<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every kernel below writes each element of its output.
    unsafe { dev.alloc::<T>(n) }
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            other => candle_core::bail!("cuda kernel: f32 or f64 expected, got {other:?}"),
        }
    };
}

/// `scores (..., T, T)` -> causal softmax of `scale · scores`, 0 above the diagonal.
pub fn causal_softmax(s: &CudaStorage, l: &Layout, scale: f64) -> Result<(CudaStorage, Shape)> {
    by_dtype!(s.dtype(), causal_softmax_t(s, l, scale))
}

fn causal_softmax_t<T: CudaDType + DeviceRepr + WithDType>(
    s: &CudaStorage,
    l: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let t = l.dims().last().copied().unwrap_or(1);
    let n = l.shape().elem_count();
    let x = view::<T>(s, l)?;
    let y = output::<T>(dev, n)?;
    let (t32, scale) = (t as i32, T::from_f64(scale));
    let f = kernel!(dev, "causal_softmax", s.dtype())?;
    let mut b = f.builder();
    b.arg(&x).arg(&y).arg(&t32).arg(&scale);
    // SAFETY: the kernel reads n elements of x and writes n of y, rows of t.
    unsafe { b.launch(rows_config(n / t.max(1), t)?) }.w()?;
    Ok((T::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
}

/// The input gradient of [`causal_softmax`] from its output `y` and output gradient `g`.
pub fn causal_softmax_grad(
    y: &CudaStorage,
    yl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(y.dtype(), causal_softmax_grad_t(y, yl, g, gl, scale))
}

fn causal_softmax_grad_t<T: CudaDType + DeviceRepr + WithDType>(
    y: &CudaStorage,
    yl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    same_shape("causal softmax grad", yl, gl)?;
    let dev = y.device();
    let t = yl.dims().last().copied().unwrap_or(1);
    let n = yl.shape().elem_count();
    let (yv, gv) = (view::<T>(y, yl)?, view::<T>(g, gl)?);
    let dx = output::<T>(dev, n)?;
    let (t32, scale) = (t as i32, T::from_f64(scale));
    let f = kernel!(dev, "causal_softmax_grad", y.dtype())?;
    let mut b = f.builder();
    b.arg(&yv).arg(&gv).arg(&dx).arg(&t32).arg(&scale);
    // SAFETY: reads n elements of y and g, writes n of dx, rows of t.
    unsafe { b.launch(rows_config(n / t.max(1), t)?) }.w()?;
    Ok((T::wrap_cuda_slice(dx, dev.clone()), yl.shape().clone()))
}

/// RMSNorm of the rows of `x` with the frozen weight `w (C,)` (x's dtype, contiguous).
pub fn rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.dtype(), rms_norm_t(x, xl, w, eps))
}

fn rms_norm_t<T: CudaDType + DeviceRepr + WithDType>(
    x: &CudaStorage,
    xl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let c = w.elem_count();
    let n = xl.shape().elem_count();
    let xv = view::<T>(x, xl)?;
    let y = output::<T>(dev, n)?;
    with_cuda(w, |ws, wl| {
        let wv = view::<T>(ws, wl)?;
        let (c32, eps) = (c as i32, T::from_f64(eps));
        let f = kernel!(dev, "rms_norm", x.dtype())?;
        let mut b = f.builder();
        b.arg(&xv).arg(&wv).arg(&y).arg(&c32).arg(&eps);
        // SAFETY: reads n elements of x and c of w, writes n of y, rows of c.
        unsafe { b.launch(rows_config(n / c.max(1), c)?) }.w()
    })?;
    Ok((T::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
}

/// The input gradient of [`rms_norm`] for the output gradient `g`.
pub fn rms_norm_grad(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.dtype(), rms_norm_grad_t(x, xl, g, gl, w, eps))
}

fn rms_norm_grad_t<T: CudaDType + DeviceRepr + WithDType>(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    w: &Tensor,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    same_shape("rms norm grad", xl, gl)?;
    let dev = x.device();
    let c = w.elem_count();
    let n = xl.shape().elem_count();
    let (xv, gv) = (view::<T>(x, xl)?, view::<T>(g, gl)?);
    let dx = output::<T>(dev, n)?;
    with_cuda(w, |ws, wl| {
        let wv = view::<T>(ws, wl)?;
        let (c32, eps) = (c as i32, T::from_f64(eps));
        let f = kernel!(dev, "rms_norm_grad", x.dtype())?;
        let mut b = f.builder();
        b.arg(&xv).arg(&gv).arg(&wv).arg(&dx).arg(&c32).arg(&eps);
        // SAFETY: reads n elements of x and g and c of w, writes n of dx, rows of c.
        unsafe { b.launch(rows_config(n / c.max(1), c)?) }.w()
    })?;
    Ok((T::wrap_cuda_slice(dx, dev.clone()), xl.shape().clone()))
}

/// Rotary embedding of `x (N, H, D)` with `cos`/`sin (N, D/2)` f32; `inverse` rotates back
/// (the gradient).
pub fn rope(
    x: &CudaStorage,
    xl: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(x.dtype(), rope_t(x, xl, cos, sin, inverse))
}

fn rope_t<T: CudaDType + DeviceRepr + WithDType>(
    x: &CudaStorage,
    xl: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (n, h, d) = xl.shape().dims3()?;
    let half = d / 2;
    if d % 2 != 0 || cos.dims() != [n, half] || sin.dims() != [n, half] {
        candle_core::bail!(
            "rope: head dim {d}, tables {:?}, expected ({n}, {half})",
            cos.dims()
        )
    }
    if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 {
        candle_core::bail!("rope: f32 tables expected")
    }
    let xv = view::<T>(x, xl)?;
    let y = output::<T>(dev, n * h * d)?;
    with_cuda(cos, |cs, cl| {
        with_cuda(sin, |ss, sl| {
            let (cv, sv) = (view::<f32>(cs, cl)?, view::<f32>(ss, sl)?);
            let (n32, h32, d32) = (n as i32, h as i32, d as i32);
            let sign = T::from_f64(if inverse { -1.0 } else { 1.0 });
            let f = kernel!(dev, "rope", x.dtype())?;
            let mut b = f.builder();
            b.arg(&xv).arg(&cv).arg(&sv).arg(&y);
            b.arg(&n32).arg(&h32).arg(&d32).arg(&sign);
            // SAFETY: one thread per (token, head, j < D/2), each writing y at j and j + D/2.
            unsafe { b.launch(elementwise_config(n * h * half)?) }.w()
        })
    })?;
    Ok((T::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
}

/// `silu(gate) ⊙ up`, both of one shape.
pub fn silu_mul(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<(CudaStorage, Shape)> {
    by_dtype!(g.dtype(), silu_mul_t(g, gl, u, ul))
}

fn silu_mul_t<T: CudaDType + DeviceRepr + WithDType>(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_shape("silu-mul", gl, ul)?;
    let dev = g.device();
    let n = gl.shape().elem_count();
    let (gv, uv) = (view::<T>(g, gl)?, view::<T>(u, ul)?);
    let y = output::<T>(dev, n)?;
    let len = n as i64;
    let f = kernel!(dev, "silu_mul", g.dtype())?;
    let mut b = f.builder();
    b.arg(&gv).arg(&uv).arg(&y).arg(&len);
    // SAFETY: one thread per element of n.
    unsafe { b.launch(elementwise_config(n)?) }.w()?;
    Ok((T::wrap_cuda_slice(y, dev.clone()), gl.shape().clone()))
}

/// `(d gate, d up)` of `silu(gate) ⊙ up` for the output gradient `dy`, from one kernel that
/// writes both into one `(2, ...)` buffer; the two are views of its halves.
pub fn silu_mul_grad(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let both =
        gate.contiguous()?
            .apply_op3_no_bwd(&up.contiguous()?, &dy.contiguous()?, &SiluMulGrad)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("silu-mul-grad-cuda runs on the GPU only")
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
        dy: &CudaStorage,
        dl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(g.dtype(), silu_mul_grad_t(g, gl, u, ul, dy, dl))
    }
}

fn silu_mul_grad_t<T: CudaDType + DeviceRepr + WithDType>(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    dy: &CudaStorage,
    dl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_shape("silu-mul grad", gl, ul)?;
    same_shape("silu-mul grad", gl, dl)?;
    let dev = g.device();
    let n = gl.shape().elem_count();
    let (gv, uv, dv) = (view::<T>(g, gl)?, view::<T>(u, ul)?, view::<T>(dy, dl)?);
    let d = output::<T>(dev, 2 * n)?;
    let len = n as i64;
    let f = kernel!(dev, "silu_mul_grad", g.dtype())?;
    let mut b = f.builder();
    b.arg(&gv).arg(&uv).arg(&dv).arg(&d).arg(&len);
    // SAFETY: one thread per element k < n, writing d[k] and d[n + k].
    unsafe { b.launch(elementwise_config(n)?) }.w()?;
    let mut dims = vec![2];
    dims.extend_from_slice(gl.dims());
    Ok((T::wrap_cuda_slice(d, dev.clone()), Shape::from(dims)))
}

fn same_shape(op: &str, a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    Ok(())
}
