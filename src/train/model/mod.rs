//! Model definitions the trainer can fine-tune.

pub mod overflow;
pub mod qwen3;
pub mod weights;

pub use qwen3::{Packed, Qwen3, Qwen3Config};
