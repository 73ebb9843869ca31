//! A run's session: setup (data, model, optimizer, resume), and after each step the metrics
//! record, the eval and checkpoint cadence and the checkpoint itself.

use super::build::{build_model_in, resolve_precision};
use super::dataset::{load_dataset, skipped_summary, Dataset};
use super::eval::evaluate;
use super::plan::Plan;
use super::tool_eval::ToolEval;
use super::TrainJob;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::data::template::ChatTemplate;
use crate::train::events::{CheckpointInfo, Control, EvalMetrics, Level, StepMetrics, TrainEvent};
use crate::train::loss_scale::{self, LossScaler};
use crate::train::model::Qwen3;
use crate::train::optim::AdamW;
use crate::train::precision::{Precision, Resolved};
use crate::train::spec::LoraConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Var;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Everything a run holds between optimizer steps.
pub(super) struct Session<'a> {
    pub(super) job: &'a TrainJob,
    pub(super) model: Qwen3,
    /// The effective LoRA settings (the init adapter's when given).
    pub(super) lora: LoraConfig,
    pub(super) params: Vec<(String, Var)>,
    pub(super) opt: AdamW,
    /// Base-weight dtype, and the loss scaler when it is f16.
    pub(super) precision: Resolved,
    pub(super) scaler: Option<LossScaler>,
    pub(super) plan: Plan,
    pub(super) train: Dataset,
    pub(super) val: Option<Dataset>,
    /// Held-out turns generated at each evaluation (and before the first step).
    pub(super) tool_eval: Option<ToolEval>,
    pub(super) state: TrainerState,
    /// The current epoch's example order.
    pub(super) order: Vec<usize>,
    pub(super) metrics_file: std::fs::File,
    /// Wall clock of this process's part of the run, and where the state stood when it began.
    pub(super) clock: Instant,
    pub(super) start: (u64, f64, u64),
    /// Seconds of this process's part spent evaluating, which the per-step time excludes.
    pub(super) eval_seconds: f64,
    /// When the last checkpoint was written (or the run began), for the time-based cadence.
    pub(super) last_save: std::cell::Cell<Instant>,
}

impl<'a> Session<'a> {
    /// Tokenizer, data, model, optimizer and schedule; the saved state when resuming.
    pub(super) fn start(
        job: &'a TrainJob,
        control: &Control,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<Self> {
        let cfg = &job.config;
        let tok_path = job.model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("loading {}: {e}", tok_path.display()))?;
        let template = ChatTemplate::from_model_dir(&job.model_dir)?;
        let train = load_dataset(&job.training_file, &tokenizer, &template, cfg)?;
        let val = match &job.validation_file {
            Some(p) => Some(load_dataset(p, &tokenizer, &template, cfg)?),
            None => None,
        };
        for (name, ds) in [("training", Some(&train)), ("validation", val.as_ref())] {
            if let Some(message) = ds.and_then(|d| skipped_summary(name, &d.skipped)) {
                emit_log(on_event, Level::Warn, message);
            }
        }
        let precision = resolve_precision(&job.device, cfg.precision)?;
        let (model, lora) = build_model_in(
            &job.model_dir,
            &job.device,
            precision.base_dtype,
            &cfg.lora,
            job.init_adapter.as_deref(),
            cfg.seed,
        )?;
        let tool_eval = match (&job.tool_eval_file, &job.validation_file) {
            _ if cfg.tool_eval_max_examples == 0 => None,
            (Some(p), _) => Some((p, true)),
            (None, Some(p)) => Some((p, false)),
            (None, None) => None,
        };
        let tool_eval = match tool_eval {
            Some((path, explicit)) => {
                let prepared = ToolEval::prepare(
                    path,
                    explicit,
                    &job.model_dir,
                    &tokenizer,
                    &template,
                    cfg.tool_eval_max_examples as usize,
                    cfg.tool_eval_max_new_tokens as usize,
                    model.cfg.max_position_embeddings,
                )?;
                emit_log(on_event, Level::Info, prepared.message);
                prepared.eval
            }
            None => None,
        };
        let params = model.lora_vars();
        let mut opt = AdamW::new(params.clone(), cfg.weight_decay)?;
        let plan = Plan::new(train.examples.len(), cfg);
        let state = match &job.resume_from {
            Some(ckpt) => {
                let state = resume(ckpt, job, &params, &mut opt)?;
                let message = format!("resumed from step {} of {}", state.step, state.total_steps);
                emit_log(on_event, Level::Info, message);
                state
            }
            None => {
                let n_tokens: usize = train.examples.iter().map(|e| e.ids.len()).sum();
                let n_params: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
                let message = format!(
                    "training {} examples ({n_tokens} tokens) for {} steps: {} LoRA tensors, {n_params} trainable parameters",
                    train.examples.len(),
                    plan.total_steps,
                    params.len(),
                );
                emit_log(on_event, Level::Info, message);
                TrainerState {
                    total_steps: plan.total_steps,
                    config: Some(cfg.clone()),
                    lora: Some(lora.clone()),
                    ..Default::default()
                }
            }
        };
        let scaler = precision
            .loss_scaling
            .then(|| state.loss_scaler.unwrap_or_else(loss_scale::new_scaler));
        if cfg.precision == Precision::Auto || precision.loss_scaling {
            let scaling = match &scaler {
                Some(s) => format!(", dynamic loss scaling at {}", s.scale),
                None => String::new(),
            };
            let message = format!("precision {}{scaling}", precision.name());
            emit_log(on_event, Level::Info, message);
        }
        std::fs::create_dir_all(&job.output_dir)?;
        let metrics_file = open_metrics(&job.output_dir.join("metrics.jsonl"), state.step)?;
        let mut session = Self {
            precision,
            scaler,
            job,
            order: plan.epoch_order(state.epoch),
            start: (state.step, state.elapsed_seconds, state.num_tokens),
            clock: Instant::now(),
            last_save: std::cell::Cell::new(Instant::now()),
            model,
            lora,
            params,
            opt,
            plan,
            train,
            val,
            tool_eval,
            state,
            metrics_file,
            eval_seconds: 0.0,
        };
        // A fresh run measures the model it starts from: the baseline of the accuracies, and
        // what one evaluation costs, which the ETA counts from the first step on.
        if session.state.step == 0 && session.tool_eval.is_some() {
            let started = Instant::now();
            session.evaluate_tools(control, on_event)?;
            session.note_eval_time(started);
        }
        Ok(session)
    }

    /// Logs the step, and evaluates and checkpoints when their intervals (or the end) come.
    pub(super) fn report(
        &mut self,
        metrics: StepMetrics,
        control: &Control,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<()> {
        let cfg = &self.job.config;
        writeln!(self.metrics_file, "{}", serde_json::to_string(&metrics)?)?;
        on_event(TrainEvent::Metrics(metrics));
        let step = self.state.step;
        let last = step == self.plan.total_steps;
        let due = |every: u32| last || (every > 0 && step.is_multiple_of(every as u64));
        if due(cfg.eval_steps) && (self.val.is_some() || self.tool_eval.is_some()) {
            let started = Instant::now();
            if let Some(v) = &self.val {
                let (loss, accuracy, n) = evaluate(&self.model, &v.examples, self.plan.batch_size)?;
                self.state.last_eval_loss = Some(loss);
                self.state.last_eval_accuracy = Some(accuracy);
                let e = EvalMetrics {
                    step,
                    eval_loss: loss,
                    eval_mean_token_accuracy: accuracy,
                    eval_tokens: n,
                };
                let mut rec = serde_json::to_value(&e)?;
                rec["type"] = "eval".into();
                writeln!(self.metrics_file, "{rec}")?;
                on_event(TrainEvent::Eval(e));
            }
            self.evaluate_tools(control, on_event)?;
            self.note_eval_time(started);
        }
        // Without a step cadence an epoch-based run also saves at each epoch's end; and a
        // checkpoint is due whenever `save_interval_seconds` have passed since the last one.
        let epoch_end = cfg.save_steps == 0
            && cfg.max_steps == 0
            && self.state.window_in_epoch as usize >= self.plan.windows_per_epoch;
        let interval = u64::from(cfg.save_interval_seconds);
        let timed = interval > 0 && self.last_save.get().elapsed().as_secs() >= interval;
        if due(cfg.save_steps) || epoch_end || timed {
            self.save(on_event)?;
        }
        Ok(())
    }

    /// Generates the held-out turns with the model as it stands and reports the accuracies. An
    /// evaluation interrupted by a cancel or suspend request reports nothing.
    fn evaluate_tools(
        &mut self,
        control: &Control,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<()> {
        let Some(t) = &self.tool_eval else {
            return Ok(());
        };
        let Some(m) = t.run(&self.model, self.state.step, control)? else {
            return Ok(());
        };
        let mut rec = serde_json::to_value(&m)?;
        rec["type"] = "tool_eval".into();
        writeln!(self.metrics_file, "{rec}")?;
        self.state.last_tool_eval = Some(m.clone());
        on_event(TrainEvent::ToolEval(m));
        Ok(())
    }

    /// Records what an evaluation that began at `started` cost.
    fn note_eval_time(&mut self, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        self.eval_seconds += seconds;
        self.state.last_eval_seconds = Some(seconds);
    }

    /// Writes `checkpoints/step-N` for the last completed step and announces it.
    pub(super) fn save(&self, on_event: &mut dyn FnMut(TrainEvent)) -> Result<PathBuf> {
        let (job, st) = (self.job, &self.state);
        let dir = checkpoint::checkpoint_dir(&job.output_dir, st.step);
        checkpoint::save_checkpoint(
            &dir,
            &self.params,
            &self.lora,
            &job.base_model_name,
            &self.opt,
            st,
        )?;
        self.last_save.set(Instant::now());
        if job.config.save_total_limit > 0 {
            checkpoint::prune_checkpoints(&job.output_dir, job.config.save_total_limit as usize)?;
        }
        on_event(TrainEvent::Checkpoint(CheckpointInfo {
            step: st.step,
            path: dir.clone(),
            train_loss: st.last_train_loss,
            train_mean_token_accuracy: st.last_train_accuracy,
            eval_loss: st.last_eval_loss,
            eval_mean_token_accuracy: st.last_eval_accuracy,
            tool_eval: st.last_tool_eval.clone(),
        }));
        Ok(dir)
    }
}

/// Restores adapter weights and optimizer moments from a checkpoint and returns its state.
fn resume(
    ckpt: &Path,
    job: &TrainJob,
    params: &[(String, Var)],
    opt: &mut AdamW,
) -> Result<TrainerState> {
    let state = checkpoint::verify(ckpt)?;
    if !state
        .config
        .as_ref()
        .is_some_and(|c| c.same_training(&job.config))
    {
        bail!(
            "checkpoint {} was written with different hyperparameters",
            ckpt.display()
        );
    }
    let adapter = checkpoint::load_adapter(ckpt, &job.device)?;
    for (key, var) in params {
        let t = adapter
            .tensors
            .get(key)
            .with_context(|| format!("checkpoint lacks {key}"))?;
        var.set(t)?;
    }
    opt.load(&checkpoint::optimizer_path(ckpt))?;
    Ok(state)
}

fn emit_log(on_event: &mut dyn FnMut(TrainEvent), level: Level, message: String) {
    on_event(TrainEvent::Log { level, message });
}

/// Opens `metrics.jsonl` for appending, first dropping records past `keep_through` (a resumed
/// run rewrites the steps after its checkpoint).
fn open_metrics(path: &Path, keep_through: u64) -> Result<std::fs::File> {
    let kept: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= keep_through)
            })
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut f = std::fs::File::create(path)?;
    for l in kept {
        writeln!(f, "{l}")?;
    }
    Ok(f)
}
