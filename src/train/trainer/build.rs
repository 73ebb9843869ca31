//! Building the model to train: the precision policy, the base weights and the LoRA adapter
//! (loaded from an init adapter or freshly initialised).

use super::plan::mix;
use crate::train::checkpoint;
use crate::train::device::DeviceInfo;
use crate::train::model::Qwen3;
use crate::train::nn::linear::kaiming_uniform_a;
use crate::train::precision::{Precision, Resolved};
use crate::train::spec::LoraConfig;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::path::Path;

/// The precision policy of `requested` on `device`, from its compute capability.
pub fn resolve_precision(device: &Device, requested: Precision) -> Result<Resolved> {
    Ok(requested.resolve(&DeviceInfo::probe(device)?)?)
}

/// [`build_model_in`] with the device's default precision.
pub fn build_model(
    model_dir: &Path,
    device: &Device,
    lora: &LoraConfig,
    init: Option<&Path>,
    seed: u64,
) -> Result<(Qwen3, LoraConfig)> {
    let dtype = resolve_precision(device, Precision::Auto)?.base_dtype;
    build_model_in(model_dir, device, dtype, lora, init, seed)
}

/// Loads the base model with its GEMM weights in `base_dtype` and attaches LoRA: from `init`
/// when given, else PEFT's fresh init (A kaiming-uniform, B zeros) drawn from `seed`. Returns the
/// effective LoRA settings.
pub fn build_model_in(
    model_dir: &Path,
    device: &Device,
    base_dtype: DType,
    lora: &LoraConfig,
    init: Option<&Path>,
    seed: u64,
) -> Result<(Qwen3, LoraConfig)> {
    let mut model = Qwen3::load(model_dir, base_dtype, device)?;
    let mut lora = lora.clone();
    match init {
        Some(dir) => {
            let adapter = checkpoint::load_adapter(dir, device)?;
            lora.r = adapter.r as u32;
            lora.alpha = adapter.alpha;
            lora.use_rslora = adapter.use_rslora;
            lora.target_modules = adapter.target_modules.clone();
            let tensors = adapter.tensors;
            model.attach_lora(
                &lora.target_modules,
                lora.r as usize,
                lora.scaling(),
                lora.dropout,
                |key, _| {
                    tensors
                        .get(key)
                        .cloned()
                        .ok_or_else(|| anyhow!("adapter {} has no tensor {key}", dir.display()))
                },
            )?;
        }
        None => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, 0, 0x10a));
            model.attach_lora(
                &lora.target_modules,
                lora.r as usize,
                lora.scaling(),
                lora.dropout,
                |key, (rows, cols)| {
                    let data = if key.ends_with("lora_A.weight") {
                        kaiming_uniform_a(rows, cols, &mut rng)
                    } else {
                        vec![0f32; rows * cols]
                    };
                    Ok(Tensor::from_vec(data, (rows, cols), device)?)
                },
            )?;
        }
    }
    Ok((model, lora))
}
