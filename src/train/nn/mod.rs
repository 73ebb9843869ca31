//! Neural-network building blocks that keep gradients flowing where candle's fused ops would not.

pub mod fused;
pub mod linear;
pub mod ops;

pub use linear::{frozen_linear, frozen_linear_grad, Lora, LoraLinear, Pass};
