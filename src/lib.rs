//! sftd: a self-hostable LoRA SFT service for Qwen3 models.

pub mod bench;
pub mod cli;
pub mod train;
