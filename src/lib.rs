//! sftd: a self-hostable LoRA SFT service for Qwen3 models.

pub mod alloc;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod estimate;
pub mod fault;
pub mod hub;
pub mod storage;
pub mod store;
pub mod train;
pub mod worker;
