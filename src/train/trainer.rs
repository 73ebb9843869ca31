//! The training loop: tokenize → forward → chunked loss → backward → clip → AdamW step → log,
//! with per-layer gradient checkpointing, periodic eval and resumable checkpoints.
//!
//! Shapes: N packed tokens of a micro-batch, M label positions among them, H hidden, V vocab.

use crate::train::checkpoint::{self, TrainerState};
use crate::train::data::encode::{Encoder, Example};
use crate::train::data::template::ChatTemplate;
use crate::train::data::{parse_jsonl, RowError};
use crate::train::device::DeviceInfo;
use crate::train::events::{
    CheckpointInfo, Control, EvalMetrics, Level, Outcome, StepMetrics, TrainEvent,
};
use crate::train::loss_scale::{self, LossScaler};
use crate::train::model::{Packed, Qwen3};
use crate::train::nn::linear::kaiming_uniform_a;
use crate::train::nn::ops::softmax_xent;
use crate::train::nn::{frozen_linear, frozen_linear_grad, Pass};
use crate::train::optim::{clip_grad_norm, lr_at, warmup_steps, AdamW};
use crate::train::precision::{Precision, Resolved};
use crate::train::spec::{LoraConfig, TrainConfig};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Everything one run needs, with paths already resolved.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub model_dir: PathBuf,
    /// Written into `adapter_config.json` as `base_model_name_or_path`.
    pub base_model_name: String,
    pub training_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    /// A PEFT adapter directory to start from instead of a fresh init.
    pub init_adapter: Option<PathBuf>,
    pub config: TrainConfig,
    /// Receives `adapter/`, `checkpoints/step-N/` and `metrics.jsonl`.
    pub output_dir: PathBuf,
    /// A checkpoint directory to continue from.
    pub resume_from: Option<PathBuf>,
    pub device: Device,
}

pub use checkpoint::latest_checkpoint;

/// Logits rows per loss chunk for `m` label positions: equal chunks of at most 64M f32 logits
/// (256 MB) whatever the vocabulary. Each chunk streams the whole LM-head matrix through the GEMM
/// twice (logits, then input gradient), so few, large and even chunks are fastest; at Qwen3's
/// vocabulary a 441-token micro-batch is one chunk.
pub fn loss_chunk_rows(vocab: usize, m: usize) -> usize {
    let max_rows = ((64 << 20) / vocab).clamp(16, 8192);
    m.div_ceil(m.div_ceil(max_rows).max(1)).max(1)
}

/// Loads the tokenizer, template and rows of a file and tokenizes them.
pub struct Dataset {
    pub examples: Vec<Example>,
    pub skipped: Vec<RowError>,
}

pub fn load_dataset(
    path: &Path,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    cfg: &TrainConfig,
) -> Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let rows = parse_jsonl(&bytes).map_err(|errs| {
        let shown: Vec<String> = errs
            .iter()
            .take(10)
            .map(|e| format!("line {}: {} ({})", e.line, e.message, e.code))
            .collect();
        anyhow!(
            "{} has {} invalid line(s): {}{}",
            path.display(),
            errs.len(),
            shown.join("; "),
            if errs.len() > 10 { "; …" } else { "" }
        )
    })?;
    let enc = Encoder {
        tokenizer,
        template,
        loss_on: cfg.loss_on,
        max_seq_len: cfg.max_seq_len as usize,
    };
    let (examples, skipped) = enc.encode_all(&rows)?;
    if examples.is_empty() {
        bail!("{} has no row with tokens to train on", path.display());
    }
    Ok(Dataset { examples, skipped })
}

/// Data order and step counts, all pure functions of the config and the dataset size.
pub struct Plan {
    pub n_examples: usize,
    pub batch_size: usize,
    pub accum: usize,
    pub micro_per_epoch: usize,
    pub windows_per_epoch: usize,
    pub total_steps: u64,
    pub warmup_steps: u64,
    seed: u64,
    shuffle: bool,
}

impl Plan {
    pub fn new(n_examples: usize, cfg: &TrainConfig) -> Self {
        let batch_size = cfg.batch_size as usize;
        let accum = cfg.gradient_accumulation_steps as usize;
        let micro_per_epoch = n_examples.div_ceil(batch_size);
        let windows_per_epoch = micro_per_epoch.div_ceil(accum);
        let total_steps = if cfg.max_steps > 0 {
            cfg.max_steps as u64
        } else {
            cfg.n_epochs as u64 * windows_per_epoch as u64
        };
        Self {
            n_examples,
            batch_size,
            accum,
            micro_per_epoch,
            windows_per_epoch,
            total_steps,
            warmup_steps: warmup_steps(cfg.warmup_ratio, total_steps),
            seed: cfg.seed,
            shuffle: cfg.shuffle,
        }
    }

    /// Example indices in epoch order (a seeded shuffle per epoch, or file order).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_examples).collect();
        if self.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, epoch, 0x5eed));
            order.shuffle(&mut rng);
        }
        order
    }

    /// The micro-batches (as example indices) of window `w` of an epoch's order.
    pub fn window(&self, order: &[usize], w: usize) -> Vec<Vec<usize>> {
        let first = w * self.accum;
        let last = ((w + 1) * self.accum).min(self.micro_per_epoch);
        (first..last)
            .map(|m| {
                let s = m * self.batch_size;
                order[s..(s + self.batch_size).min(order.len())].to_vec()
            })
            .collect()
    }
}

/// SplitMix64-style mixing of three words into one seed.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sum of token losses of one micro-batch, its correct predictions and targets.
pub struct MicroStats {
    pub loss_sum: f64,
    pub correct: u64,
    pub targets: u64,
}

/// A packed micro-batch plus where its label positions are.
pub struct Batch {
    packed: Packed,
    /// (M,) u32: packed positions whose next token is a target.
    positions: Tensor,
    /// (M,) u32: those next tokens.
    targets: Tensor,
    pub n_targets: usize,
    pub n_tokens: usize,
}

pub fn make_batch(model: &Qwen3, examples: &[&Example]) -> Result<Batch> {
    let seqs: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
    let packed = model.pack(&seqs)?;
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (&(start, len), ex) in packed.segments.iter().zip(examples) {
        for j in 0..len.saturating_sub(1) {
            if ex.labels[j + 1] {
                positions.push((start + j) as u32);
                targets.push(ex.ids[j + 1]);
            }
        }
    }
    let m = positions.len();
    let n_tokens = seqs.iter().map(|s| s.len()).sum();
    Ok(Batch {
        positions: Tensor::from_vec(positions, m, &model.device)?,
        targets: Tensor::from_vec(targets, m, &model.device)?,
        packed,
        n_targets: m,
        n_tokens,
    })
}

/// Chunked LM head + cross-entropy on the final hidden states `h (N, H)`. With `scale`, also
/// backpropagates `scale · Σ CE` into `h`'s graph and returns the resulting gradients; the full
/// `(M, V)` logits never exist at once.
fn head_loss(
    model: &Qwen3,
    h: &Tensor,
    b: &Batch,
    scale: Option<f64>,
) -> Result<(MicroStats, Option<GradStore>)> {
    let normed = model.final_norm(h)?;
    let sel = normed.index_select(&b.positions, 0)?; // (M, H)
    let sel_detached = sel.detach();
    let rows = loss_chunk_rows(model.cfg.vocab_size, b.n_targets);
    let mut stats = MicroStats {
        loss_sum: 0.0,
        correct: 0,
        targets: b.n_targets as u64,
    };
    let mut sel_grads = Vec::new();
    let mut start = 0;
    while start < b.n_targets {
        let c = rows.min(b.n_targets - start);
        let chunk = sel_detached.narrow(0, start, c)?;
        let tgt = b.targets.narrow(0, start, c)?;
        let logits = frozen_linear(&chunk, &model.lm_head)?; // (C, V)
        let (s, dlogits) = softmax_xent(logits, &tgt, scale)?;
        stats.loss_sum += s.loss_sum;
        stats.correct += s.correct;
        if let Some(g) = dlogits {
            let g = g.to_dtype(model.lm_head.dtype())?;
            sel_grads.push(frozen_linear_grad(&g, &model.lm_head)?); // (C, H)
        }
        start += c;
    }
    let Some(_) = scale else {
        return Ok((stats, None));
    };
    if sel_grads.is_empty() {
        return Ok((stats, Some(GradStore::default())));
    }
    let g_sel = Tensor::cat(&sel_grads, 0)?; // (M, H)
    let grads = (sel * g_sel.to_dtype(sel_detached.dtype())?)?
        .sum_all()?
        .backward()?;
    Ok((stats, Some(grads)))
}

/// Forward + backward of one micro-batch; LoRA gradients are added into `acc`.
pub fn micro_step(
    model: &Qwen3,
    b: &Batch,
    scale: f64,
    dropout_key: Option<u64>,
    checkpointing: bool,
    acc: &mut HashMap<TensorId, Tensor>,
) -> Result<MicroStats> {
    let mut add = |v: &Var, g: Option<&Tensor>| -> Result<()> {
        let g = g.ok_or_else(|| anyhow!("a LoRA weight received no gradient (graph cut)"))?;
        match acc.get_mut(&v.id()) {
            Some(a) => *a = (&*a + g)?,
            None => {
                acc.insert(v.id(), g.clone());
            }
        }
        Ok(())
    };
    let x = model.embed(&b.packed)?;
    if !checkpointing {
        let pass = Pass {
            track: true,
            dropout_key,
        };
        let h = model.forward(&b.packed, pass)?;
        let (stats, grads) = head_loss(model, &h, b, Some(scale))?;
        let grads = grads.expect("scaled");
        for i in 0..model.layers.len() {
            for v in model.layer_vars(i) {
                add(v, grads.get(v))?;
            }
        }
        return Ok(stats);
    }
    // 1. Forward without a graph, keeping each layer's input.
    let no_grad = Pass {
        track: false,
        dropout_key,
    };
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut h = x;
    for i in 0..model.layers.len() {
        let next = model.layer_forward(i, &h, &b.packed, no_grad)?;
        inputs.push(h);
        h = next;
    }
    // 2. Loss and its gradient with respect to the last hidden state.
    let hv = Var::from_tensor(&h)?;
    let (stats, grads) = head_loss(model, hv.as_tensor(), b, Some(scale))?;
    let mut g = grads
        .and_then(|gs| gs.get(&hv).cloned())
        .ok_or_else(|| anyhow!("no gradient reached the final hidden state"))?;
    // 3. Recompute each layer with a graph, newest first, and pull the gradient through it.
    let track = Pass {
        track: true,
        dropout_key,
    };
    for i in (0..model.layers.len()).rev() {
        let xv = Var::from_tensor(&inputs[i])?;
        let out = model.layer_forward(i, xv.as_tensor(), &b.packed, track)?;
        let gs = (out * &g)?.sum_all()?.backward()?;
        for v in model.layer_vars(i) {
            add(v, gs.get(v))?;
        }
        if i > 0 {
            g = gs.get(&xv).context("layer input gradient missing")?.clone();
        }
    }
    Ok(stats)
}

/// Loss and accuracy over a whole dataset, without gradients or dropout.
pub fn evaluate(model: &Qwen3, examples: &[Example], batch_size: usize) -> Result<(f64, f64, u64)> {
    let (mut loss, mut correct, mut targets) = (0.0, 0u64, 0u64);
    let pass = Pass {
        track: false,
        dropout_key: None,
    };
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = make_batch(model, &refs)?;
        let h = model.forward(&b.packed, pass)?;
        let (s, _) = head_loss(model, &h, &b, None)?;
        loss += s.loss_sum;
        correct += s.correct;
        targets += s.targets;
    }
    let n = targets.max(1) as f64;
    Ok((loss / n, correct as f64 / n, targets))
}

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

/// Runs (or resumes) a job to completion, cancellation or suspension.
pub fn run(
    job: &TrainJob,
    control: &Control,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome> {
    let mut s = Session::start(job, on_event)?;
    while s.state.step < s.plan.total_steps {
        let window = match s.accumulate(control, on_event)? {
            Accumulated::Window(w) => w,
            Accumulated::Stopped(outcome) => return Ok(outcome),
        };
        let metrics = s.update(window)?;
        s.report(metrics, on_event)?;
    }
    let adapter_dir = job.output_dir.join("adapter");
    checkpoint::save_adapter(&adapter_dir, &s.params, &s.lora, &job.base_model_name)?;
    Ok(Outcome::Completed {
        adapter_dir,
        steps: s.state.step,
        trained_tokens: s.state.num_tokens,
    })
}

/// Everything a run holds between optimizer steps.
struct Session<'a> {
    job: &'a TrainJob,
    model: Qwen3,
    /// The effective LoRA settings (the init adapter's when given).
    lora: LoraConfig,
    params: Vec<(String, Var)>,
    opt: AdamW,
    /// Base-weight dtype, and the loss scaler when it is f16.
    precision: Resolved,
    scaler: Option<LossScaler>,
    plan: Plan,
    train: Dataset,
    val: Option<Dataset>,
    state: TrainerState,
    /// The current epoch's example order.
    order: Vec<usize>,
    metrics_file: std::fs::File,
    /// Wall clock of this process's part of the run, and where the state stood when it began.
    clock: Instant,
    start: (u64, f64, u64),
    /// When the last checkpoint was written (or the run began), for the time-based cadence.
    last_save: std::cell::Cell<Instant>,
}

/// One accumulation window's gradients and statistics, or how the run stopped instead.
enum Accumulated {
    Window(Window),
    Stopped(Outcome),
}

struct Window {
    /// Summed LoRA gradients, keyed by the Var's tensor id.
    grads: HashMap<TensorId, Tensor>,
    loss_sum: f64,
    n_targets: usize,
    /// Σ over micro-batches of their token accuracy (TRL averages them unweighted).
    accuracy_sum: f64,
    micro_batches: usize,
    tokens: usize,
    lr: f64,
}

impl<'a> Session<'a> {
    /// Tokenizer, data, model, optimizer and schedule; the saved state when resuming.
    fn start(job: &'a TrainJob, on_event: &mut dyn FnMut(TrainEvent)) -> Result<Self> {
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
        Ok(Self {
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
            state,
            metrics_file,
        })
    }

    /// Forward and backward over the next window's micro-batches, polling `control` before each.
    fn accumulate(
        &mut self,
        control: &Control,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<Accumulated> {
        let (cfg, plan) = (&self.job.config, &self.plan);
        if self.state.window_in_epoch as usize >= plan.windows_per_epoch {
            self.state.epoch += 1;
            self.state.window_in_epoch = 0;
            self.order = plan.epoch_order(self.state.epoch);
        }
        let batches: Vec<Vec<&Example>> = plan
            .window(&self.order, self.state.window_in_epoch as usize)
            .iter()
            .map(|idx| idx.iter().map(|&i| &self.train.examples[i]).collect())
            .collect();
        let n_targets: usize = batches.iter().flatten().map(|e| e.n_targets()).sum();
        let step = self.state.step;
        let lr = lr_at(
            cfg.lr_scheduler,
            cfg.learning_rate,
            step,
            plan.warmup_steps,
            plan.total_steps,
        );
        let mut w = Window {
            grads: HashMap::new(),
            loss_sum: 0.0,
            n_targets,
            accuracy_sum: 0.0,
            micro_batches: batches.len(),
            tokens: 0,
            lr,
        };
        for (m, examples) in batches.iter().enumerate() {
            if control.is_cancelled() {
                return Ok(Accumulated::Stopped(Outcome::Cancelled { step }));
            }
            if control.is_suspended() {
                let checkpoint = self.save(on_event)?;
                return Ok(Accumulated::Stopped(Outcome::Suspended {
                    checkpoint,
                    step,
                }));
            }
            let b = make_batch(&self.model, examples)?;
            let key = (cfg.lora.dropout > 0.0).then(|| mix(cfg.seed, step, m as u64));
            let scale = self.scaler.map_or(1.0, |s| s.scale) / n_targets as f64;
            let s = micro_step(
                &self.model,
                &b,
                scale,
                key,
                cfg.gradient_checkpointing,
                &mut w.grads,
            )?;
            if !s.loss_sum.is_finite() && self.precision.base_dtype != DType::F32 {
                self.fail_on_forward_overflow(&b, key, step)?;
            }
            w.loss_sum += s.loss_sum;
            w.accuracy_sum += s.correct as f64 / s.targets.max(1) as f64;
            w.tokens += b.n_tokens;
        }
        Ok(Accumulated::Window(w))
    }

    /// Clip, check for divergence, take the AdamW step and advance the state.
    fn update(&mut self, mut w: Window) -> Result<StepMetrics> {
        let cfg = &self.job.config;
        let train_loss = w.loss_sum / w.n_targets.max(1) as f64;
        let mut grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(k, v)| {
                w.grads
                    .remove(&v.id())
                    .with_context(|| format!("{k} got no gradient"))
            })
            .collect::<Result<_>>()?;
        if let (true, Some(g)) = (
            loss_scale::injected_overflow(self.state.step + 1),
            grads.first_mut(),
        ) {
            *g = g.affine(f64::INFINITY, 0.0)?;
        }
        let loss_scale = self.scaler.map(|s| s.scale);
        if let Some(s) = loss_scale {
            for g in grads.iter_mut() {
                *g = g.affine(1.0 / s, 0.0)?;
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        // With loss scaling, overflowing gradients skip the step and lower the scale; without it
        // they mean divergence.
        let step_ok = match self.scaler.as_mut() {
            Some(s) => s.update(grad_norm.is_finite()),
            None => grad_norm.is_finite(),
        };
        if !train_loss.is_finite() || (!step_ok && self.scaler.is_none()) {
            bail!(
                "training diverged at step {}: loss {train_loss}, grad norm {grad_norm}; lower the learning rate (now {})",
                self.state.step + 1,
                cfg.learning_rate
            );
        }
        if step_ok {
            self.opt.step(&grads, w.lr)?;
        }
        self.state.loss_scaler = self.scaler;

        let (plan, st) = (&self.plan, &mut self.state);
        let accuracy = w.accuracy_sum / w.micro_batches as f64;
        st.step += 1;
        st.window_in_epoch += 1;
        st.num_tokens += w.tokens as u64;
        st.last_train_loss = Some(train_loss);
        st.last_train_accuracy = Some(accuracy);
        let (start_step, start_elapsed, start_tokens) = self.start;
        let elapsed = self.clock.elapsed().as_secs_f64();
        st.elapsed_seconds = start_elapsed + elapsed;
        let micro_done = (st.window_in_epoch as usize * plan.accum).min(plan.micro_per_epoch);
        Ok(StepMetrics {
            step: st.step,
            total_steps: plan.total_steps,
            epoch: st.epoch as f64 + micro_done as f64 / plan.micro_per_epoch as f64,
            train_loss,
            learning_rate: w.lr,
            grad_norm,
            train_mean_token_accuracy: accuracy,
            num_tokens: st.num_tokens,
            tokens_per_second: (st.num_tokens - start_tokens) as f64 / elapsed.max(1e-9),
            elapsed_seconds: st.elapsed_seconds,
            eta_seconds: elapsed / (st.step - start_step) as f64
                * (plan.total_steps - st.step) as f64,
            loss_scale,
            skipped_steps: self.scaler.map_or(0, |s| s.skipped_steps),
        })
    }

    /// A non-finite loss under f16/bf16 base weights: replays the micro-batch's forward pass,
    /// checking every projection's GEMM output, and fails naming the first that overflowed. Loss
    /// scaling cannot help there (the forward pass is not scaled), so torch's scaler would
    /// only skip steps and shrink the scale forever. Without an overflowing projection, returns
    /// and the step fails as a divergence.
    fn fail_on_forward_overflow(&self, b: &Batch, key: Option<u64>, step: u64) -> Result<()> {
        if let Some(name) =
            crate::train::model::overflow::locate_overflow(&self.model, &b.packed, key)?
        {
            let dtype = self.precision.name();
            let fix = if dtype == "f16" {
                "use precision f32 or bf16"
            } else {
                "use precision f32"
            };
            bail!(
                "{dtype} overflow in {name} output at step {}; {fix}",
                step + 1
            );
        }
        Ok(())
    }

    /// Logs the step, and evaluates and checkpoints when their intervals (or the end) come.
    fn report(&mut self, metrics: StepMetrics, on_event: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        let cfg = &self.job.config;
        writeln!(self.metrics_file, "{}", serde_json::to_string(&metrics)?)?;
        on_event(TrainEvent::Metrics(metrics));
        let step = self.state.step;
        let last = step == self.plan.total_steps;
        let due = |every: u32| last || (every > 0 && step % every as u64 == 0);
        if let (Some(v), true) = (&self.val, due(cfg.eval_steps)) {
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

    /// Writes `checkpoints/step-N` for the last completed step and announces it.
    fn save(&self, on_event: &mut dyn FnMut(TrainEvent)) -> Result<PathBuf> {
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

/// One warning for all rows of a file that had nothing to learn from.
fn skipped_summary(name: &str, skipped: &[RowError]) -> Option<String> {
    let first = skipped.first()?;
    let lines: Vec<String> = skipped
        .iter()
        .take(20)
        .map(|s| s.line.to_string())
        .collect();
    let more = if skipped.len() > 20 { ", …" } else { "" };
    Some(format!(
        "{name} file: {} row(s) skipped ({}): lines {}{more}",
        skipped.len(),
        first.message,
        lines.join(", ")
    ))
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
