//! Neural-network building blocks that keep gradients flowing where candle's fused ops would not.

pub mod attention;
pub mod attention_device;
pub mod cpu_kernels;
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
#[cfg(test)]
pub(crate) mod testing;
