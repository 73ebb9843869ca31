//! The training engine: LoRA SFT of Qwen3 with candle. Knows nothing of HTTP or SQL.

pub mod events;
pub mod spec;
