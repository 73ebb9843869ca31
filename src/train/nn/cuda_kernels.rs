//! Whether sftd's own CUDA kernels (`cuda_launch`) serve an op on a GPU, or candle's composed
//! tensor ops do; and the precision of attention's f32 GEMMs there.
//!
//! They are on by default in a `cuda` build. `SFTD_CUDA_KERNELS=off` turns them off for the
//! process: the GPU then runs the composed graph it ran before they existed, which is how their
//! effect is measured in one binary and how a wrong result on some GPU is bisected.

use candle_core::{DType, Device, Tensor};
use std::cell::Cell;
use std::sync::OnceLock;

const VARIABLE: &str = "SFTD_CUDA_KERNELS";

fn setting_from(value: Option<&str>) -> (bool, Option<String>) {
    super::cpu_kernels::on_off(VARIABLE, value)
}

fn process_setting() -> &'static (bool, Option<String>) {
    static SETTING: OnceLock<(bool, Option<String>)> = OnceLock::new();
    SETTING.get_or_init(|| setting_from(std::env::var(VARIABLE).ok().as_deref()))
}

/// Why the variable's value was ignored, if it was.
pub fn note() -> Option<&'static str> {
    process_setting().1.as_deref()
}

/// Whether the kernels are on for this process (always false without the `cuda` feature).
pub fn enabled() -> bool {
    cfg!(feature = "cuda") && process_setting().0
}

/// Whether sftd's CUDA kernels serve an op on `x`: a GPU tensor of f32 or f64.
pub fn serve(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F64) && enabled()
}

/// Whether the one-pass kernels of the fused ops (`fused`, `rms_norm`) serve `x`: their CPU
/// kernels on the CPU, these CUDA kernels on a GPU.
pub fn fused_kernels(x: &Tensor) -> bool {
    (super::cpu_kernels::serve(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64))
        || serve(x)
}

thread_local! {
    static ATTENTION_TF32: Cell<bool> = const { Cell::new(false) };
}

/// Records, for the model pass on this thread, whether attention's f32 products may run in TF32
/// on a GPU's tensor cores (inputs rounded to a 10-bit mantissa, f32 accumulation): yes when the
/// base weights are bf16 or f16. transformers + PEFT run those products in bf16 then (sdpa on
/// bf16 activations), coarser still; with f32 weights they stay f32, exactly. LoRA's products
/// stay f32 under every policy, as PEFT's adapters do.
pub fn set_attention_precision(base: DType) {
    ATTENTION_TF32.with(|c| c.set(matches!(base, DType::BF16 | DType::F16)));
}

/// Runs `f`, attention's batched products on `device`, with cuBLAS allowed TF32 where this
/// thread's model pass allows it ([`set_attention_precision`]), and full f32 again afterwards.
/// (candle keeps the TF32 switch process-wide; one thread drives each device.)
pub fn attention_gemms<R>(device: &Device, f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "cuda")]
    if device.is_cuda() && ATTENTION_TF32.with(Cell::get) {
        struct FullF32Again;
        impl Drop for FullF32Again {
            fn drop(&mut self) {
                candle_core::cuda_backend::set_gemm_reduced_precision_f32(false);
            }
        }
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
        let _after = FullF32Again;
        return f();
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_turns_them_off_and_a_bad_value_is_reported() {
        assert_eq!(setting_from(Some("OFF")), (false, None));
        let (on, note) = setting_from(Some("0"));
        assert!(on);
        assert!(note.unwrap().starts_with("SFTD_CUDA_KERNELS=\"0\""));
    }

    #[test]
    fn cpu_tensors_are_never_served() {
        let x = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(!serve(&x));
    }
}
