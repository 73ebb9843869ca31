//! The training engine: LoRA SFT of Qwen3 with candle. Knows nothing of HTTP or SQL.

pub mod checkpoint;
pub mod data;
pub mod demo;
pub mod device;
pub mod events;
pub mod generate;
pub mod interlude;
pub mod loss_scale;
pub mod memory;
pub mod model;
pub mod nn;
pub mod optim;
pub mod precision;
pub mod spec;
pub mod tool_calls;
pub mod tool_eval;
pub mod trainer;

use anyhow::{bail, Result};
use candle_core::Device;

/// `auto` (CUDA 0 when built with CUDA and a GPU is present, else CPU), `cpu`, or `cuda:N`.
pub fn device_from_str(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        _ => match s.strip_prefix("cuda:").or((s == "cuda").then_some("0")) {
            Some(n) => {
                let n: usize = n.parse().map_err(|_| anyhow::anyhow!("bad device {s:?}"))?;
                Ok(Device::new_cuda(n)?)
            }
            None => bail!("unknown device {s:?}: use auto, cpu or cuda:N"),
        },
    }
}
