//! The job specification: the body of `POST /v1/fine_tuning/jobs` (also the `sftd train` JOB.json),
//! its defaults (the recipe in docs/architecture.md) and the range checks that turn it into a
//! [`TrainConfig`].

pub use crate::train::precision::Precision;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Name of the built-in demo model, accepted wherever a model id is.
pub const DEMO_MODEL: &str = "sftd-demo";

/// The job body, OpenAI's shape extended with the whole recipe. Unknown fields are rejected so a
/// typo (`n_epoch`) is an error instead of a silently ignored knob.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// HF repo id, local model directory, or [`DEMO_MODEL`].
    pub model: String,
    /// File id (service) or path (CLI) of the training JSONL.
    pub training_file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_file: Option<String>,
    /// Conversations whose assistant turns the tool-call evaluation generates; the validation
    /// file when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_eval_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// A PEFT adapter directory (CLI) or an earlier job id / adapter file id (service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<String>,
    /// Deprecated OpenAI top-level hyperparameters; accepted when `method` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperparameters: Option<Hyperparameters>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Method {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised: Option<Supervised>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Supervised {
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
}

/// A number or OpenAI's `"auto"` (which means: take the recipe's default).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Auto<T> {
    Value(T),
    Auto(AutoTag),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum AutoTag {
    Auto,
}

impl<T: Copy> Auto<T> {
    fn value(this: Option<Self>) -> Option<T> {
        match this {
            Some(Auto::Value(v)) => Some(v),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_epochs: Option<Auto<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<Auto<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// OpenAI's knob: a multiplier of the recipe's learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate_multiplier: Option<Auto<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<LrScheduler>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_on: Option<LossOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<u32>,
    /// Held-out assistant turns the tool-call evaluation generates; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_eval_max_examples: Option<u32>,
    /// Completion budget of each of those turns, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_eval_max_new_tokens: Option<u32>,
    /// Keep only the newest N checkpoints (HF's name); 0 keeps all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<u32>,
    /// Also checkpoint when this many seconds have passed since the last one; 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_interval_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Dtype of the frozen base weights: `auto` (the device's best), `f32`, `bf16` or `f16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    Assistant,
    All,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_rslora: Option<bool>,
}

/// `"all-linear"` or an explicit list of module names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    Named(String),
    List(Vec<String>),
}

/// The linear modules of a Qwen3 decoder layer, in the order PEFT's all-linear finds them.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Fully resolved training settings: every knob has a value and has passed its range check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub n_epochs: u32,
    /// Sequences per micro-batch.
    pub batch_size: u32,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: u32,
    /// Fraction of total steps spent warming up (warmup steps = ceil(ratio × total)).
    pub warmup_ratio: f64,
    pub lr_scheduler: LrScheduler,
    /// Tokens; longer rows are truncated keeping the start.
    pub max_seq_len: u32,
    pub weight_decay: f64,
    /// Global-norm clip; 0 disables clipping.
    pub max_grad_norm: f64,
    /// 0 = run `n_epochs`; otherwise stop after this many optimizer steps.
    pub max_steps: u32,
    pub loss_on: LossOn,
    /// 0 = evaluate only at the end (when there is a validation file).
    pub eval_steps: u32,
    /// 0 = no step cadence: checkpoint at the end (and, for epoch-based runs, each epoch's end).
    pub save_steps: u32,
    /// Assistant turns the tool-call evaluation generates at each evaluation; 0 = none.
    #[serde(default = "default_tool_eval_max_examples")]
    pub tool_eval_max_examples: u32,
    /// Greedy completion budget per evaluated turn.
    #[serde(default = "default_tool_eval_max_new_tokens")]
    pub tool_eval_max_new_tokens: u32,
    /// Checkpoints kept on disk, newest first (HF's `save_total_limit`); 0 = all.
    #[serde(default)]
    pub save_total_limit: u32,
    /// A checkpoint is also written once this many seconds have passed since the last one (or
    /// the start), so a timeout or crash loses at most that much work; 0 disables.
    #[serde(default = "default_save_interval_seconds")]
    pub save_interval_seconds: u32,
    pub gradient_checkpointing: bool,
    pub shuffle: bool,
    pub lora: LoraConfig,
    /// Dtype of the frozen base weights, resolved against the device when the run starts.
    #[serde(default)]
    pub precision: Precision,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The factor multiplying B·A: alpha/r, or alpha/√r with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

impl TrainConfig {
    /// Whether `other` trains exactly the same way: equal but for the checkpoint cadence and
    /// retention, which a resumed run may change.
    pub fn same_training(&self, other: &TrainConfig) -> bool {
        let without_saving = |c: &TrainConfig| TrainConfig {
            save_steps: 0,
            save_total_limit: 0,
            save_interval_seconds: 0,
            ..c.clone()
        };
        without_saving(self) == without_saving(other)
    }
}

fn default_tool_eval_max_examples() -> u32 {
    64
}

fn default_tool_eval_max_new_tokens() -> u32 {
    128
}

/// Ten minutes: the most a timeout or a crash can cost with the default cadence.
fn default_save_interval_seconds() -> u32 {
    600
}

impl Default for TrainConfig {
    /// The recipe in docs/architecture.md (TRL + PEFT on Qwen3-1.7B).
    fn default() -> Self {
        Self {
            seed: 42,
            n_epochs: 3,
            batch_size: 4,
            learning_rate: 2e-4,
            gradient_accumulation_steps: 4,
            warmup_ratio: 0.1,
            lr_scheduler: LrScheduler::Cosine,
            max_seq_len: 2048,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_steps: 0,
            loss_on: LossOn::Assistant,
            eval_steps: 0,
            save_steps: 0,
            tool_eval_max_examples: default_tool_eval_max_examples(),
            tool_eval_max_new_tokens: default_tool_eval_max_new_tokens(),
            save_total_limit: 0,
            save_interval_seconds: default_save_interval_seconds(),
            gradient_checkpointing: true,
            shuffle: true,
            lora: LoraConfig {
                r: 16,
                alpha: 32.0,
                dropout: 0.05,
                target_modules: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
                use_rslora: false,
            },
            precision: Precision::Auto,
        }
    }
}

/// A rejected knob: `param` is the JSON path of the field (OpenAI's `error.param`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct SpecError {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        param: param.to_string(),
        message: message.into(),
    }
}

const HP: &str = "method.supervised.hyperparameters";

impl JobSpec {
    /// A job JSON file as `sftd train` and `sftd estimate` take it: the spec and its config.
    pub fn read_file(path: &std::path::Path) -> anyhow::Result<(JobSpec, TrainConfig)> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let spec: JobSpec = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid job", path.display()))?;
        let config = spec
            .resolve()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((spec, config))
    }

    /// The hyperparameters wherever the body carried them (`method.supervised` or the deprecated top level).
    pub fn hyperparameters(&self) -> Hyperparameters {
        self.method
            .as_ref()
            .and_then(|m| m.supervised.as_ref())
            .map(|s| s.hyperparameters.clone())
            .or_else(|| self.hyperparameters.clone())
            .unwrap_or_default()
    }

    /// Checks every field and fills omitted knobs from the recipe.
    pub fn resolve(&self) -> Result<TrainConfig, SpecError> {
        if self.model.trim().is_empty() {
            return Err(bad("model", "model must not be empty"));
        }
        if self.training_file.trim().is_empty() {
            return Err(bad("training_file", "training_file must not be empty"));
        }
        if let Some(m) = &self.method {
            if m.kind != "supervised" {
                return Err(bad(
                    "method.type",
                    format!("only \"supervised\" is supported, got {:?}", m.kind),
                ));
            }
        }
        if let Some(s) = &self.suffix {
            if s.chars().count() > 64 {
                return Err(bad("suffix", "suffix must be at most 64 characters"));
            }
        }
        if let Some(md) = &self.metadata {
            if md.len() > 16 {
                return Err(bad("metadata", "at most 16 metadata pairs"));
            }
            if md.iter().any(|(k, v)| k.len() > 64 || v.len() > 512) {
                return Err(bad(
                    "metadata",
                    "metadata keys are at most 64 and values at most 512 characters",
                ));
            }
        }
        let hp = self.hyperparameters();
        let d = TrainConfig::default();
        let p = |f: &str| format!("{HP}.{f}");

        let n_epochs = Auto::value(hp.n_epochs).unwrap_or(d.n_epochs);
        check_range(&p("n_epochs"), n_epochs as f64, 1.0, 1000.0)?;
        let batch_size = Auto::value(hp.batch_size).unwrap_or(d.batch_size);
        check_range(&p("batch_size"), batch_size as f64, 1.0, 1024.0)?;
        if hp.learning_rate.is_some() && hp.learning_rate_multiplier.is_some() {
            return Err(bad(
                &p("learning_rate"),
                "give learning_rate or learning_rate_multiplier, not both",
            ));
        }
        let multiplier = Auto::value(hp.learning_rate_multiplier).unwrap_or(1.0);
        check_range(&p("learning_rate_multiplier"), multiplier, 1e-6, 1e3)?;
        let learning_rate = hp.learning_rate.unwrap_or(d.learning_rate * multiplier);
        if !(learning_rate > 0.0 && learning_rate <= 1.0) {
            return Err(bad(
                &p("learning_rate"),
                format!("must be > 0 and <= 1, got {learning_rate}"),
            ));
        }
        let gradient_accumulation_steps = hp
            .gradient_accumulation_steps
            .unwrap_or(d.gradient_accumulation_steps);
        check_range(
            &p("gradient_accumulation_steps"),
            gradient_accumulation_steps as f64,
            1.0,
            4096.0,
        )?;
        let warmup_ratio = hp.warmup_ratio.unwrap_or(d.warmup_ratio);
        check_range(&p("warmup_ratio"), warmup_ratio, 0.0, 1.0)?;
        let max_seq_len = hp.max_seq_len.unwrap_or(d.max_seq_len);
        check_range(&p("max_seq_len"), max_seq_len as f64, 8.0, 131072.0)?;
        let weight_decay = hp.weight_decay.unwrap_or(d.weight_decay);
        check_range(&p("weight_decay"), weight_decay, 0.0, 10.0)?;
        let max_grad_norm = hp.max_grad_norm.unwrap_or(d.max_grad_norm);
        check_range(&p("max_grad_norm"), max_grad_norm, 0.0, 1e6)?;
        let max_steps = hp.max_steps.unwrap_or(0);
        check_range(&p("max_steps"), max_steps as f64, 0.0, 10_000_000.0)?;

        let save_total_limit = hp.save_total_limit.unwrap_or(d.save_total_limit);
        check_range(&p("save_total_limit"), save_total_limit as f64, 0.0, 1e6)?;
        let save_interval_seconds = hp.save_interval_seconds.unwrap_or(d.save_interval_seconds);
        check_range(
            &p("save_interval_seconds"),
            save_interval_seconds as f64,
            0.0,
            31_536_000.0,
        )?;

        let tool_eval_max_examples = hp
            .tool_eval_max_examples
            .unwrap_or(d.tool_eval_max_examples);
        check_range(
            &p("tool_eval_max_examples"),
            tool_eval_max_examples as f64,
            0.0,
            10_000.0,
        )?;
        let tool_eval_max_new_tokens = hp
            .tool_eval_max_new_tokens
            .unwrap_or(d.tool_eval_max_new_tokens);
        check_range(
            &p("tool_eval_max_new_tokens"),
            tool_eval_max_new_tokens as f64,
            1.0,
            32_768.0,
        )?;
        if self
            .tool_eval_file
            .as_deref()
            .is_some_and(|f| f.trim().is_empty())
        {
            return Err(bad("tool_eval_file", "tool_eval_file must not be empty"));
        }

        let l = hp.lora.clone().unwrap_or_default();
        let r = l.r.unwrap_or(d.lora.r);
        check_range(&p("lora.r"), r as f64, 1.0, 1024.0)?;
        let alpha = l.alpha.unwrap_or(d.lora.alpha);
        if !(alpha > 0.0 && alpha <= 1e5) {
            return Err(bad(
                &p("lora.alpha"),
                format!("must be > 0 and <= 100000, got {alpha}"),
            ));
        }
        let dropout = l.dropout.unwrap_or(d.lora.dropout);
        if !(0.0..1.0).contains(&dropout) {
            return Err(bad(
                &p("lora.dropout"),
                format!("must be in [0, 1), got {dropout}"),
            ));
        }
        let target_modules = match l.target_modules {
            None => d.lora.target_modules.clone(),
            Some(TargetModules::Named(s)) if s == "all-linear" => d.lora.target_modules.clone(),
            Some(TargetModules::Named(s)) => vec![s],
            Some(TargetModules::List(v)) => v,
        };
        if target_modules.is_empty() {
            return Err(bad(
                &p("lora.target_modules"),
                "must name at least one module",
            ));
        }
        for m in &target_modules {
            if !ALL_LINEAR.contains(&m.as_str()) {
                return Err(bad(
                    &p("lora.target_modules"),
                    format!(
                        "unknown module {m:?}; use \"all-linear\" or names from {}",
                        ALL_LINEAR.join(", ")
                    ),
                ));
            }
        }
        // Keep PEFT's canonical order and drop duplicates.
        let target_modules = ALL_LINEAR
            .iter()
            .filter(|m| target_modules.iter().any(|t| t == *m))
            .map(|m| m.to_string())
            .collect();

        Ok(TrainConfig {
            seed: self.seed.unwrap_or(d.seed),
            n_epochs,
            batch_size,
            learning_rate,
            gradient_accumulation_steps,
            warmup_ratio,
            lr_scheduler: hp.lr_scheduler.unwrap_or(d.lr_scheduler),
            max_seq_len,
            weight_decay,
            max_grad_norm,
            max_steps,
            loss_on: hp.loss_on.unwrap_or(d.loss_on),
            eval_steps: hp.eval_steps.unwrap_or(0),
            save_steps: hp.save_steps.unwrap_or(0),
            tool_eval_max_examples,
            tool_eval_max_new_tokens,
            save_total_limit,
            save_interval_seconds,
            gradient_checkpointing: hp
                .gradient_checkpointing
                .unwrap_or(d.gradient_checkpointing),
            shuffle: hp.shuffle.unwrap_or(d.shuffle),
            lora: LoraConfig {
                r,
                alpha,
                dropout,
                target_modules,
                use_rslora: l.use_rslora.unwrap_or(false),
            },
            precision: hp.precision.unwrap_or_default(),
        })
    }
}

fn check_range(param: &str, v: f64, lo: f64, hi: f64) -> Result<(), SpecError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(bad(
            param,
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

#[cfg(test)]
mod tests;
