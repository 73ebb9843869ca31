//! Command-line front ends to the engine: `train` (one job with a progress bar), `demo-model`,
//! `logits` (a forward pass for parity checks) and `merge` (base + scaled B·A in safetensors).

use crate::train::checkpoint::{self, ADAPTER_CONFIG};
use crate::train::events::{Control, Level, Outcome, TrainEvent};
use crate::train::model::qwen3::weight_files;
use crate::train::spec::{JobSpec, LoraConfig};
use crate::train::trainer::{self, TrainJob};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Job file with the body of `POST /v1/fine_tuning/jobs`; local paths allowed for `model`,
    /// the files and `init_adapter`.
    pub job: PathBuf,
    /// Receives adapter/, checkpoints/ and metrics.jsonl.
    #[arg(long, short)]
    pub output: PathBuf,
    /// auto | cpu | cuda:N
    #[arg(long, env = "SFTD_DEVICE", default_value = "auto")]
    pub device: String,
    /// Continue from the newest complete checkpoint in the output directory, if any (a torn
    /// or damaged one is skipped for the one before it).
    #[arg(long)]
    pub resume: bool,
    /// Where the demo model and hub downloads are cached.
    #[arg(long, env = "SFTD_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Progress without a terminal (a container, a pipe): `text` lines, or `json`, one event
    /// object per line on stdout (also in a terminal).
    #[arg(long, env = "SFTD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// How `train` reports progress: a bar in a terminal; otherwise one line per event on stdout, so
/// that container logs (`docker logs`, `hf jobs logs`) show every step.
enum Report {
    Bar(ProgressBar),
    Text,
    Json,
}

impl Report {
    fn new(log_format: &str) -> Self {
        if log_format == "json" {
            return Report::Json;
        }
        if !std::io::stderr().is_terminal() {
            return Report::Text;
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template"),
        );
        Report::Bar(bar)
    }

    fn event(&self, ev: TrainEvent) {
        let bar = match self {
            Report::Json => {
                println!("{}", serde_json::to_string(&ev).expect("events serialize"));
                return;
            }
            Report::Text => {
                println!("{}", event_line(&ev));
                return;
            }
            Report::Bar(bar) => bar,
        };
        match ev {
            TrainEvent::Metrics(m) => {
                bar.set_length(m.total_steps);
                bar.set_position(m.step);
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                    m.train_loss, m.learning_rate, m.tokens_per_second
                ));
            }
            ev => bar.println(event_line(&ev)),
        }
    }

    /// The last line: how the run ended.
    fn finish(&self, summary: String) {
        match self {
            Report::Json => println!(
                "{}",
                serde_json::json!({ "type": "done", "message": summary })
            ),
            Report::Bar(bar) => {
                bar.finish();
                println!("{summary}");
            }
            Report::Text => println!("{summary}"),
        }
    }
}

fn event_line(ev: &TrainEvent) -> String {
    match ev {
        TrainEvent::Metrics(m) => format!(
            "step {}/{}: loss {:.4}  lr {:.2e}  {:.0} tok/s",
            m.step, m.total_steps, m.train_loss, m.learning_rate, m.tokens_per_second
        ),
        TrainEvent::Eval(e) => format!(
            "step {}: eval loss {:.4}, accuracy {:.3}",
            e.step, e.eval_loss, e.eval_mean_token_accuracy
        ),
        TrainEvent::ToolEval(t) => format!("step {}: {}", t.step, t.summary()),
        TrainEvent::Checkpoint(c) => format!("step {}: checkpoint {}", c.step, c.path.display()),
        TrainEvent::Log { level, message } => {
            let tag = match level {
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            };
            format!("{tag}: {message}")
        }
    }
}

/// Exit status of `sftd train` stopped by SIGTERM or SIGINT after checkpointing (75 is
/// sysexits' EX_TEMPFAIL: run it again with `--resume`).
pub const SUSPENDED_EXIT_CODE: i32 = 75;

/// On the first SIGTERM or SIGINT, asks the run to checkpoint at the next micro-batch and
/// stop; a second one exits at once (status 130).
fn suspend_on_signal(control: &Control) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let control = control.clone();
    std::thread::Builder::new()
        .name("sftd-signals".into())
        .spawn(move || {
            rt.block_on(async {
                for _ in 0..2 {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    if control.is_suspended() {
                        eprintln!("second signal: exiting without a checkpoint");
                        std::process::exit(130);
                    }
                    eprintln!(
                        "signal received: checkpointing at the next micro-batch, then exiting"
                    );
                    control.suspend();
                }
            })
        })?;
    Ok(())
}

/// Runs one job from a JSON file, printing a progress bar and the final adapter's location.
/// SIGTERM/SIGINT checkpoint and exit with [`SUSPENDED_EXIT_CODE`].
pub fn train(args: TrainArgs) -> Result<()> {
    let (spec, config) = JobSpec::read_file(&args.job)?;
    let model_dir = resolve_model(&spec.model, &args.data_dir)?;
    let existing = |p: &str, what: &str| -> Result<PathBuf> {
        let p = PathBuf::from(p);
        if p.exists() {
            Ok(p)
        } else {
            bail!("{what} {} does not exist", p.display())
        }
    };
    let job = TrainJob {
        base_model_name: spec.model.clone(),
        training_file: existing(&spec.training_file, "training_file")?,
        validation_file: spec
            .validation_file
            .as_deref()
            .map(|p| existing(p, "validation_file"))
            .transpose()?,
        tool_eval_file: spec
            .tool_eval_file
            .as_deref()
            .map(|p| existing(p, "tool_eval_file"))
            .transpose()?,
        init_adapter: spec
            .init_adapter
            .as_deref()
            .map(|p| existing(p, "init_adapter"))
            .transpose()?,
        config,
        resume_from: if args.resume {
            let (found, torn) = checkpoint::latest_verified_checkpoint(&args.output);
            for reason in torn {
                eprintln!("warning: skipping a damaged checkpoint: {reason}");
            }
            found
        } else {
            None
        },
        output_dir: args.output.clone(),
        device: crate::train::device_from_str(&args.device)?,
        model_dir,
    };
    let report = Report::new(&args.log_format);
    let control = Control::new();
    suspend_on_signal(&control)?;
    let outcome = trainer::run(&job, &control, &mut |ev| report.event(ev))?;
    let suspended = matches!(outcome, Outcome::Suspended { .. });
    report.finish(match outcome {
        Outcome::Completed {
            adapter_dir,
            steps,
            trained_tokens,
        } => format!(
            "done: {steps} steps, {trained_tokens} tokens; adapter in {}",
            adapter_dir.display()
        ),
        Outcome::Suspended { checkpoint, step } => {
            format!(
                "suspended at step {step}; checkpoint {}; run again with --resume to continue",
                checkpoint.display()
            )
        }
        Outcome::Cancelled { step } => format!("cancelled at step {step}"),
    });
    if suspended {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(SUSPENDED_EXIT_CODE);
    }
    Ok(())
}

/// A model reference as the CLI accepts it: the demo model's name, any local model directory,
/// or a Hugging Face repo id (downloaded through the hub cache, honouring HF_TOKEN/HF_HOME/HF_ENDPOINT).
fn resolve_model(model: &str, data_dir: &Path) -> Result<PathBuf> {
    match crate::hub::CliModel::parse(model, data_dir)? {
        crate::hub::CliModel::Local(dir) => Ok(dir),
        crate::hub::CliModel::Hub(hub) => {
            eprintln!("fetching {model} from the Hugging Face hub…");
            Ok(tokio::runtime::Runtime::new()?.block_on(hub.resolve(model))?)
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoModelArgs {
    /// Directory to write config.json, model.safetensors and the tokenizer files into.
    pub dir: PathBuf,
    /// Hidden size (the demo model's when omitted; likewise below).
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Embedding rows; at least the tokenizer's size (e.g. 151936 for Qwen3's LM-head cost).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Random-init seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes the demo model, or a random Qwen3 of other dimensions (for benchmarks).
pub fn demo_model(args: DemoModelArgs) -> Result<()> {
    let d = crate::train::demo::DemoSize::DEMO;
    let size = crate::train::demo::DemoSize {
        hidden: args.hidden.unwrap_or(d.hidden),
        intermediate: args.intermediate.unwrap_or(d.intermediate),
        layers: args.layers.unwrap_or(d.layers),
        heads: args.heads.unwrap_or(d.heads),
        kv_heads: args.kv_heads.unwrap_or(d.kv_heads),
        head_dim: args.head_dim.unwrap_or(d.head_dim),
        min_vocab: args.vocab.unwrap_or(0),
        ..d
    };
    crate::train::demo::write_model(&args.dir, size, args.seed)?;
    println!(
        "wrote a random-init Qwen3 ({size:?}) to {}",
        args.dir.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory (omit for the base model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Text to run (tokenized without special-token additions).
    #[arg(long)]
    pub text_file: PathBuf,
    /// safetensors file receiving `input_ids` (T,) and `logits` (T, V) f32.
    #[arg(long)]
    pub out: PathBuf,
}

/// One forward pass, for comparing sftd's model against PEFT's.
pub fn logits(args: LogitsArgs) -> Result<()> {
    let dev = Device::Cpu;
    let lora = crate::train::spec::TrainConfig::default().lora;
    let (model, _) = match &args.adapter {
        Some(a) => trainer::build_model(&args.model, &dev, &lora, Some(a), 0)?,
        None => (
            crate::train::model::Qwen3::load(&args.model, DType::F32, &dev)?,
            lora,
        ),
    };
    let tok = tokenizers::Tokenizer::from_file(args.model.join("tokenizer.json"))
        .map_err(|e| anyhow!("loading tokenizer: {e}"))?;
    let text = std::fs::read_to_string(&args.text_file)?;
    let ids = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    let logits = model.logits(&model.pack(&[&ids])?)?;
    let n = ids.len();
    let out = HashMap::from([
        ("input_ids".to_string(), Tensor::from_vec(ids, n, &dev)?),
        ("logits".to_string(), logits.to_dtype(DType::F32)?),
    ]);
    candle_core::safetensors::save(&out, &args.out)?;
    println!("wrote {n} positions to {}", args.out.display());
    Ok(())
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Hugging Face model directory of the base model.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// New model directory (f32 safetensors plus the base's config and tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes `W + scaling · B A` for every adapted projection: a plain model transformers loads.
pub fn merge(args: MergeArgs) -> Result<()> {
    let dev = Device::Cpu;
    let adapter = checkpoint::load_adapter(&args.adapter, &dev)?;
    // The adapter's own r, alpha and rsLoRA flag (dropout plays no part in a merge).
    let scaling = LoraConfig {
        r: adapter.r as u32,
        alpha: adapter.alpha,
        dropout: 0.0,
        target_modules: adapter.target_modules.clone(),
        use_rslora: adapter.use_rslora,
    }
    .scaling();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in weight_files(&args.model)? {
        for (k, t) in candle_core::safetensors::load(&f, &dev)? {
            tensors.insert(k, t.to_dtype(DType::F32)?);
        }
    }
    let mut merged = 0;
    for (key, a) in &adapter.tensors {
        let Some(prefix) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = adapter
            .tensors
            .get(&format!("{prefix}.lora_B.weight"))
            .with_context(|| format!("{prefix} has lora_A but no lora_B"))?;
        let base_key = format!("{}.weight", prefix.trim_start_matches("base_model.model."));
        let w = tensors
            .get_mut(&base_key)
            .with_context(|| format!("base model has no {base_key}"))?;
        // (O, r) @ (r, I) -> (O, I)
        *w = (&*w + (b.matmul(a)? * scaling)?)?;
        merged += 1;
    }
    if merged == 0 {
        bail!(
            "{} holds no LoRA pairs",
            args.adapter.join(ADAPTER_CONFIG).display()
        );
    }
    std::fs::create_dir_all(&args.out)?;
    candle_core::safetensors::save(&tensors, args.out.join("model.safetensors"))?;
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        let src = args.model.join(f);
        if src.exists() {
            std::fs::copy(&src, args.out.join(f))?;
        }
    }
    let cfg_path = args.out.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg["torch_dtype"] = "float32".into();
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;
    println!("merged {merged} projections into {}", args.out.display());
    Ok(())
}
