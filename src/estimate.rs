//! `sftd estimate JOB.json --device …`: a job's estimated peak memory against a device's memory,
//! printed as one JSON object, for this machine or for a named GPU without having one.

use crate::train::device::DeviceInfo;
use crate::train::memory::{self, ModelDims, Recipe, Target};
use crate::train::precision::Precision;
use crate::train::spec::JobSpec;
use anyhow::{anyhow, bail, Result};
use candle_core::DType;
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// Job file with the body of `POST /v1/fine_tuning/jobs` (as `sftd train` takes it).
    pub job: PathBuf,
    /// cpu (this machine's available RAM), cuda:N (a GPU of this machine), or a GPU model:
    /// t4, l4, a10g, a100-40gb, a100-80gb, h100.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Base-weight precision: auto (f32 on the CPU; bf16 from compute capability 8.0, f16
    /// below), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Where the demo model is generated and hub configs are cached.
    #[arg(long, env = "SFTD_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

/// A GPU model the estimate can be asked about without one: nominal memory in decimal GB
/// (slightly under what the cards expose) and compute capability.
struct NamedGpu {
    id: &'static str,
    name: &'static str,
    gigabytes: u64,
    compute_capability: (u32, u32),
}

const GPUS: [NamedGpu; 6] = [
    NamedGpu {
        id: "t4",
        name: "NVIDIA T4",
        gigabytes: 16,
        compute_capability: (7, 5),
    },
    NamedGpu {
        id: "l4",
        name: "NVIDIA L4",
        gigabytes: 24,
        compute_capability: (8, 9),
    },
    NamedGpu {
        id: "a10g",
        name: "NVIDIA A10G",
        gigabytes: 24,
        compute_capability: (8, 6),
    },
    NamedGpu {
        id: "a100-40gb",
        name: "NVIDIA A100 40GB",
        gigabytes: 40,
        compute_capability: (8, 0),
    },
    NamedGpu {
        id: "a100-80gb",
        name: "NVIDIA A100 80GB",
        gigabytes: 80,
        compute_capability: (8, 0),
    },
    NamedGpu {
        id: "h100",
        name: "NVIDIA H100 80GB",
        gigabytes: 80,
        compute_capability: (9, 0),
    },
];

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    device: String,
    device_name: String,
    weight_dtype: String,
    estimated_peak_memory_bytes: u64,
    device_memory_bytes: u64,
    /// The part of the device's memory a job may be estimated to use.
    usable_memory_bytes: u64,
    fits: bool,
    /// Tokens of the training file after templating and truncation (null when the file or the
    /// tokenizer is not at hand).
    tokens: Option<u64>,
    examples: Option<u64>,
    total_steps: Option<u64>,
    peak_phase: &'static str,
    /// Single-knob changes that would fit (when it does not).
    suggestions: Vec<String>,
    model_dims: ModelDims,
    recipe: Recipe,
    breakdown: memory::Breakdown,
}

pub fn estimate(args: EstimateArgs) -> Result<()> {
    let (spec, config) = JobSpec::read_file(&args.job)?;
    let (info, cc) = device_info(&args.device)?;
    let weight_dtype = weight_dtype(&args.precision, &info)?;
    let target = Target {
        cuda: cc.is_some(),
        weight_dtype,
    };
    let model_dir = config_dir(&spec.model, &args.data_dir)?;
    let dims = ModelDims::from_dir(&model_dir)?;
    let recipe = Recipe::from_config(&config);
    let e = memory::estimate(&dims, &recipe, target);
    let device_memory = info.available_memory_bytes;
    let fits = memory::fits(e.estimated_peak_memory_bytes, device_memory);
    let suggestions = if fits {
        Vec::new()
    } else {
        memory::suggestions(&dims, &recipe, target, device_memory)
    };
    let plan = dataset_plan(&model_dir, &spec.training_file, &config).ok();
    let report = Report {
        model: spec.model.clone(),
        device: info.id,
        device_name: info.name,
        weight_dtype: weight_dtype.as_str().to_string(),
        estimated_peak_memory_bytes: e.estimated_peak_memory_bytes,
        device_memory_bytes: device_memory,
        usable_memory_bytes: (device_memory as f64 * memory::USABLE_FRACTION) as u64,
        fits,
        tokens: plan.map(|p| p.0),
        examples: plan.map(|p| p.1),
        total_steps: plan.map(|p| p.2),
        peak_phase: e.peak_phase,
        suggestions,
        model_dims: dims,
        recipe,
        breakdown: e.breakdown,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The device's memory and compute capability: probed for `cpu` and `cuda:N`, from the table
/// for a named GPU.
fn device_info(device: &str) -> Result<(DeviceInfo, Option<(u32, u32)>)> {
    if let Some(g) = GPUS.iter().find(|g| g.id == device.to_ascii_lowercase()) {
        let bytes = g.gigabytes * 1_000_000_000;
        let info = DeviceInfo {
            id: g.id.to_string(),
            name: g.name.to_string(),
            compute_capability: Some(g.compute_capability),
            total_memory_bytes: bytes,
            available_memory_bytes: bytes,
        };
        return Ok((info, Some(g.compute_capability)));
    }
    if device != "cpu" && !device.starts_with("cuda") {
        let names: Vec<&str> = GPUS.iter().map(|g| g.id).collect();
        bail!(
            "unknown device {device:?}: use cpu, cuda:N or one of {}",
            names.join(", ")
        );
    }
    let info = DeviceInfo::probe(&crate::train::device_from_str(device)?)?;
    let cc = info.compute_capability;
    Ok((info, cc))
}

/// The base weights' dtype under the job's precision policy on this device.
fn weight_dtype(precision: &str, info: &DeviceInfo) -> Result<DType> {
    let requested: Precision = serde_json::from_value(serde_json::Value::from(precision))
        .map_err(|_| anyhow!("unknown precision {precision:?}: use auto, f32, bf16 or f16"))?;
    Ok(requested.resolve(info)?.base_dtype)
}

/// A directory with the model's `config.json`: the demo model (generated if needed), a local
/// model directory, or a hub repo id (only its config.json is fetched).
fn config_dir(model: &str, data_dir: &Path) -> Result<PathBuf> {
    match crate::hub::CliModel::parse(model, data_dir)? {
        crate::hub::CliModel::Local(dir) => Ok(dir),
        crate::hub::CliModel::Hub(hub) => {
            Ok(tokio::runtime::Runtime::new()?.block_on(hub.config_dir(model))?)
        }
    }
}

/// (tokens, examples, total optimizer steps) of the training file, as the trainer counts them.
fn dataset_plan(
    model_dir: &Path,
    training_file: &str,
    config: &crate::train::spec::TrainConfig,
) -> Result<(u64, u64, u64)> {
    use crate::train::trainer::{load_dataset, Plan};
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json"))
        .map_err(|e| anyhow!("{e}"))?;
    let template = crate::train::data::template::ChatTemplate::from_model_dir(model_dir)?;
    let ds = load_dataset(Path::new(training_file), &tokenizer, &template, config)?;
    let tokens: usize = ds.examples.iter().map(|e| e.ids.len()).sum();
    let plan = Plan::new(ds.examples.len(), config);
    Ok((tokens as u64, ds.examples.len() as u64, plan.total_steps))
}
