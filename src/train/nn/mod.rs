//! Neural-network building blocks that keep gradients flowing where candle's fused ops would not.

pub mod attention;
pub mod attention_device;
pub mod cpu_kernels;
pub mod cuda_kernels;
#[cfg(feature = "cuda")]
mod cuda_launch;
pub(crate) mod dropout;
pub mod fused;
pub mod gemv;
pub mod head;
pub mod layer;
pub mod linear;
pub mod lora_op;
pub(crate) mod matmul;
pub mod ops;
mod panel_gemm;
mod real;
pub mod rms_norm;
pub mod swiglu;
pub mod threads;
mod transpose;
pub(crate) mod view;

pub use linear::{frozen_linear, frozen_linear_grad, Lora, LoraLinear, Pass};
pub use real::kernel_isa;

/// What runs sftd's own ops on `device`: on the CPU its kernels' instruction set (see
/// [`kernel_isa`]); on a GPU `cuda` (sftd's CUDA kernels) or `off` (`SFTD_CUDA_KERNELS=off`:
/// candle's composed ops). With a note for each variable whose value was not honoured.
pub fn kernels_on(device: &candle_core::Device) -> (&'static str, Vec<&'static str>) {
    if device.is_cpu() {
        return kernel_isa();
    }
    let notes = cuda_kernels::note().into_iter().collect();
    match device.is_cuda() && cuda_kernels::enabled() {
        true => ("cuda", notes),
        false => ("off", notes),
    }
}
#[cfg(test)]
pub(crate) mod testing;
