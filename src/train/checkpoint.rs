//! PEFT adapter files (`adapter_model.safetensors` + `adapter_config.json`) and resumable
//! checkpoints: adapter, optimizer moments, and the trainer's position in the data, written
//! durably with a manifest so a resume can tell a complete checkpoint from a torn one.

pub mod durable;
mod manifest;

pub use manifest::MANIFEST;

use crate::train::spec::{LoraConfig, TrainConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const TRAINER_STATE: &str = "trainer_state.json";

/// Writes a PEFT-loadable adapter into `dir`, durably: the files appear all at once (a
/// temporary sibling renamed into place) or not at all.
pub fn save_adapter(
    dir: &Path,
    vars: &[(String, Var)],
    lora: &LoraConfig,
    base_model: &str,
) -> Result<()> {
    durable::write_dir(dir, |tmp| write_adapter_files(tmp, vars, lora, base_model))
}

fn write_adapter_files(
    dir: &Path,
    vars: &[(String, Var)],
    lora: &LoraConfig,
    base_model: &str,
) -> Result<()> {
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join(ADAPTER_WEIGHTS))?;
    std::fs::write(
        dir.join(ADAPTER_CONFIG),
        adapter_config_json(lora, base_model),
    )?;
    Ok(())
}

/// `adapter_config.json` as PEFT writes it: every LoraConfig field we set, keys sorted.
pub fn adapter_config_json(lora: &LoraConfig, base_model: &str) -> String {
    use serde_json::{json, Value};
    let fields: BTreeMap<&str, Value> = BTreeMap::from([
        ("alpha_pattern", json!({})),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", json!(base_model)),
        ("bias", json!("none")),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("lora_alpha", json!(lora.alpha)),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(lora.dropout)),
        ("modules_to_save", Value::Null),
        ("peft_type", json!("LORA")),
        ("r", json!(lora.r)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_modules", json!(lora.target_modules)),
        ("task_type", json!("CAUSAL_LM")),
        ("use_dora", json!(false)),
        ("use_rslora", json!(lora.use_rslora)),
    ]);
    serde_json::to_string_pretty(&fields).expect("config serialises")
}

/// An adapter read back from disk.
pub struct Adapter {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    /// PEFT keys (without `.default`) → f32 tensors.
    pub tensors: HashMap<String, Tensor>,
}

#[derive(Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    target_modules: serde_json::Value,
    #[serde(default)]
    use_dora: bool,
}

pub fn load_adapter(dir: &Path, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg: PeftConfigFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a PEFT LoRA config", cfg_path.display()))?;
    if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") || cfg.use_dora {
        bail!(
            "{}: only plain LoRA adapters are supported",
            cfg_path.display()
        );
    }
    // PEFT writes suffixes ("q_proj") for many modules but full paths
    // ("model.layers.0.self_attn.q_proj") for few; both name the same projections here.
    let names: Vec<String> = match &cfg.target_modules {
        serde_json::Value::String(s) if s == "all-linear" => crate::train::spec::ALL_LINEAR
            .iter()
            .map(|s| s.to_string())
            .collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => bail!("{}: target_modules must be a list", cfg_path.display()),
    };
    let target_modules: Vec<String> = crate::train::spec::ALL_LINEAR
        .iter()
        .filter(|m| {
            names
                .iter()
                .any(|n| n == *m || n.ends_with(&format!(".{m}")))
        })
        .map(|m| m.to_string())
        .collect();
    if target_modules.is_empty() {
        bail!(
            "{}: target_modules {names:?} name no Qwen3 projection",
            cfg_path.display()
        );
    }
    let weights = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&weights, device)
        .with_context(|| format!("reading {}", weights.display()))?
        .into_iter()
        .map(|(k, t)| {
            Ok((
                k.replace(".default.", "."),
                t.to_dtype(candle_core::DType::F32)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Adapter {
        r: cfg.r,
        alpha: cfg.lora_alpha,
        use_rslora: cfg.use_rslora,
        target_modules,
        tensors,
    })
}

/// Where the trainer stands; with the optimizer file this is all a resume needs, because data
/// order and dropout masks are pure functions of (seed, epoch, step).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    /// Epoch the next window comes from, and windows of it already consumed.
    pub epoch: u64,
    pub window_in_epoch: u64,
    /// Cumulative non-pad tokens trained on.
    pub num_tokens: u64,
    /// Training time before this checkpoint, summed over earlier runs.
    pub elapsed_seconds: f64,
    pub last_train_loss: Option<f64>,
    pub last_train_accuracy: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub last_eval_accuracy: Option<f64>,
    pub config: Option<TrainConfig>,
    /// The effective LoRA settings (from `init_adapter` when given).
    pub lora: Option<LoraConfig>,
    /// The f16 loss scaler after the last completed step (absent when the loss is not scaled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::train::loss_scale::LossScaler>,
    /// The last tool-call evaluation (absent when none ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tool_eval: Option<crate::train::tool_eval::ToolEvalMetrics>,
    /// Seconds the last evaluation (loss and tool calls) took, which the ETA counts per
    /// evaluation still to come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_eval_seconds: Option<f64>,
}

/// Writes the checkpoint `dir` durably: adapter, optimizer and state files, then the manifest
/// (sizes and SHA-256 of the others) last, each fsync'd, renamed into place and the parent
/// directory fsync'd, so once this returns the checkpoint survives a crash or power loss, and a
/// directory that [`verify`] accepts is complete. Nothing is left behind on error (disk full).
pub fn save_checkpoint(
    dir: &Path,
    vars: &[(String, Var)],
    lora: &LoraConfig,
    base_model: &str,
    optimizer: &crate::train::optim::AdamW,
    state: &TrainerState,
) -> Result<()> {
    durable::write_dir(dir, |tmp| {
        write_adapter_files(tmp, vars, lora, base_model)?;
        optimizer.save(&tmp.join(OPTIMIZER))?;
        std::fs::write(tmp.join(TRAINER_STATE), serde_json::to_vec_pretty(state)?)?;
        crate::fault::point("checkpoint_files");
        manifest::write(tmp)
    })
    .with_context(|| format!("writing checkpoint {}", dir.display()))?;
    crate::fault::point("checkpoint_renamed");
    Ok(())
}

/// Checks a checkpoint against its manifest (every file present with its size and hash) and
/// returns its trainer state.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    manifest::verify(dir)?;
    load_state(dir)
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

pub fn optimizer_path(dir: &Path) -> PathBuf {
    dir.join(OPTIMIZER)
}

/// Checkpoint directory for a step under an output directory.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join("checkpoints").join(format!("step-{step}"))
}

/// `checkpoints/step-N` directories under `output_dir`, newest (highest step) first.
fn checkpoints_newest_first(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir.join("checkpoints")) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    found
}

/// The newest checkpoint that passes [`verify`], plus why each newer one was passed over (a
/// torn or damaged directory: resume falls back to the previous good checkpoint).
pub fn latest_verified_checkpoint(output_dir: &Path) -> (Option<PathBuf>, Vec<String>) {
    let mut rejected = Vec::new();
    for (_, dir) in checkpoints_newest_first(output_dir) {
        match verify(&dir) {
            Ok(_) => return (Some(dir), rejected),
            Err(e) => rejected.push(format!("{e:#}")),
        }
    }
    (None, rejected)
}

/// The newest checkpoint under `output_dir/checkpoints` that passes [`verify`].
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    latest_verified_checkpoint(output_dir).0
}

/// Keeps the `keep` newest checkpoints (HF's `save_total_limit`) and deletes the older ones.
pub fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<()> {
    for (_, dir) in checkpoints_newest_first(output_dir).into_iter().skip(keep) {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}
