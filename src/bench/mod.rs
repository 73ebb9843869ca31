//! `sftd bench`: training throughput, step time, peak RSS and MFU of the LoRA step on this
//! machine, on the same model, data and batch that `tools/bench/compare.py` gives transformers + PEFT.

mod device;
mod generate;
mod json_mask;

use crate::train::data::encode::{Encoder, Example};
use crate::train::data::template::ChatTemplate;
use crate::train::data::{parse_jsonl, Row};
use crate::train::device::DeviceInfo;
use crate::train::optim::AdamW;
use crate::train::precision::Precision;
use crate::train::spec::{LossOn, TrainConfig};
use crate::train::trainer::{build_model_in, make_batch, micro_step};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use device::{dense_peak_flops, DeviceMemorySampler};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--data`'s default: the bundled tool-calling rows, which `tools/bench/compare.py` reads too.
const DEFAULT_DATA: &str = "examples/tool_calls.jsonl";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model directory, or `sftd-demo`.
    #[arg(long, default_value = "sftd-demo")]
    pub model: String,
    /// JSONL rows to draw sequences from (in file order). The default, when run outside this
    /// repository (from the container image, say), is the copy of that file built into sftd.
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// Sequences per optimizer step (no gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Tokens per sequence: rows are truncated to this length.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Timed optimizer steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// LoRA rank (alpha = 2r, all-linear, as in compare.py).
    #[arg(long, default_value_t = 16)]
    pub rank: u32,
    /// LoRA dropout on the adapters' input. 0 by default, as in compare.py; training's default
    /// is 0.05.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Which tokens carry the loss: `assistant` (the training default, and compare.py's) or `all`.
    /// sftd runs the LM head only on labelled positions, so `all` is its slowest setting;
    /// transformers computes every position's logits either way.
    #[arg(long, default_value = "assistant", value_parser = ["assistant", "all"])]
    pub loss_on: String,
    /// Disable per-layer gradient checkpointing.
    #[arg(long)]
    pub no_checkpointing: bool,
    #[arg(long, env = "SFTD_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// `cpu`, `cuda:N` or `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Base-weight precision: `auto` (the device's best), `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    pub precision: Precision,
    /// Benchmark a generated random-init model of this shape instead of `--model` (written to
    /// `DATA_DIR/bench-models` on first use): `layers` = Qwen3-0.6B's layer shape (hidden 1024,
    /// intermediate 3072, 16/8 heads of 128), 8 layers, vocabulary 4096, tied, so the layers
    /// dominate as in real Qwen3 models; `head` = 4 such layers with Qwen3's full 151936-token
    /// tied vocabulary, where the LM head is 70 % of the weights; `layers-1.7b` = Qwen3-1.7B's
    /// layer shape (hidden 2048, intermediate 6144, 16/8 heads of 128), 4 layers, vocabulary 4096.
    #[arg(long, value_parser = ["layers", "head", "layers-1.7b"])]
    pub shape: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Benchmark generation instead (prefill and decode tokens/s, greedy, KV cache, batch 1):
    /// the prompt is the data's first chat row up to its first assistant turn.
    #[arg(long)]
    pub generate: bool,
    /// Benchmark the vocabulary mask of forced tool calls instead: milliseconds per mask over
    /// the model's vocabulary at the states a call's arguments go through, by the vocabulary's
    /// index and by reading every token (`--steps` timed runs each). Reads only the model's
    /// tokenizer, template and config.
    #[arg(long, conflicts_with = "generate")]
    pub json_mask: bool,
    /// Tokens generated per run with `--generate`.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub engine: &'static str,
    pub device: String,
    pub device_name: String,
    /// Base-weight dtype the step ran with.
    pub precision: &'static str,
    pub batch_size: usize,
    pub seq_len: usize,
    pub gradient_checkpointing: bool,
    pub lora_dropout: f64,
    pub loss_on: String,
    pub threads: usize,
    pub tokens_per_second: f64,
    pub ms_per_step: f64,
    pub mean_tokens_per_step: f64,
    /// Share of the tokens that carry a label (the positions the LM head runs on).
    pub labelled_fraction: f64,
    pub peak_rss_mb: f64,
    pub model_flops_per_token: f64,
    pub gemm_peak_gflops: f64,
    /// Where `gemm_peak_gflops` comes from: `measured` (f32 GEMM on this device) or the vendor's
    /// dense fp16/bf16 tensor-core figure for the GPU.
    pub peak_source: String,
    pub mfu: f64,
    /// GPU only: most device memory in use (total − free, sampled every 5 ms by the driver's
    /// count, so it includes the allocator's cached blocks and other processes).
    pub peak_device_memory_mb: Option<f64>,
    /// CPU model name, its SIMD extensions that matter here, the gemm kernel family in use, and
    /// the instruction set of sftd's own kernels (narrower than the CPU's under `SFTD_CPU_ISA`).
    pub cpu: String,
    pub isa: String,
    pub gemm_kernel: &'static str,
    pub sftd_kernels: &'static str,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let notes = crate::train::nn::kernel_isa().1.into_iter();
    for note in notes.chain(crate::train::nn::cuda_kernels::note()) {
        eprintln!("warning: {note}");
    }
    if args.json_mask {
        let model_dir = if args.model == crate::train::spec::DEMO_MODEL {
            crate::train::demo::ensure_demo_model(&args.data_dir)?
        } else {
            PathBuf::from(&args.model)
        };
        return json_mask::bench(&model_dir, args.steps, args.json);
    }
    if args.generate {
        return generate::bench(&generate::GenerateArgs {
            model: args.model.clone(),
            data_dir: args.data_dir.clone(),
            data: args.data.clone(),
            seq_len: args.seq_len,
            new_tokens: args.new_tokens,
            steps: args.steps,
            json: args.json,
        });
    }
    let report = run(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("| engine | batch | seq_len | loss on | ckpt | tok/s | ms/step | peak RSS MB | MFU | GEMM peak GFLOP/s |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1}% | {:.0} |",
            report.engine,
            report.batch_size,
            report.seq_len,
            report.loss_on,
            if report.gradient_checkpointing {
                "on"
            } else {
                "off"
            },
            report.tokens_per_second,
            report.ms_per_step,
            report.peak_rss_mb,
            report.mfu * 100.0,
            report.gemm_peak_gflops
        );
        if let Some(mb) = report.peak_device_memory_mb {
            println!(
                "{} ({}), precision {}, peak device memory {mb:.0} MB, peak: {}",
                report.device_name, report.device, report.precision, report.peak_source
            );
        }
        println!(
            "\nCPU: {}; ISA: {}; gemm kernels: {}; sftd kernels: {}",
            report.cpu, report.isa, report.gemm_kernel, report.sftd_kernels
        );
    }
    Ok(())
}

/// The rows of `data`; the default path falls back to the copy built into the binary (the same
/// bytes) when it is not there, so `sftd bench` runs from any directory.
fn read_rows(data: &Path) -> Result<Vec<(usize, Row)>> {
    let bytes = match std::fs::read(data) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && data == Path::new(DEFAULT_DATA) => {
            eprintln!("note: {DEFAULT_DATA} is not here; using the copy built into sftd");
            crate::train::demo::EXAMPLES.as_bytes().to_vec()
        }
        read => read.with_context(|| format!("reading {}", data.display()))?,
    };
    parse_jsonl(&bytes).map_err(|e| anyhow!("{} has invalid rows: {e:?}", data.display()))
}

fn run(args: &BenchArgs) -> Result<BenchReport> {
    let dev = crate::train::device_from_str(&args.device)?;
    let info = DeviceInfo::probe(&dev)?;
    let precision = args.precision.resolve(&info)?;
    let model_dir = if let Some(shape) = &args.shape {
        bench_model(&args.data_dir, shape)?
    } else if args.model == crate::train::spec::DEMO_MODEL {
        crate::train::demo::ensure_demo_model(&args.data_dir)?
    } else {
        PathBuf::from(&args.model)
    };
    let mut lora = TrainConfig::default().lora;
    lora.r = args.rank;
    lora.alpha = 2.0 * args.rank as f64;
    if !(0.0..1.0).contains(&args.lora_dropout) {
        bail!(
            "--lora-dropout must be in [0, 1), got {}",
            args.lora_dropout
        );
    }
    lora.dropout = args.lora_dropout;
    let (model, _) = build_model_in(&model_dir, &dev, precision.base_dtype, &lora, None, 0)?;
    let tok = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json"))
        .map_err(|e| anyhow!("loading tokenizer: {e}"))?;
    let template = ChatTemplate::from_model_dir(&model_dir)?;
    let rows = read_rows(&args.data)?;
    let enc = Encoder {
        tokenizer: &tok,
        template: &template,
        loss_on: if args.loss_on == "all" {
            LossOn::All
        } else {
            LossOn::Assistant
        },
        max_seq_len: args.seq_len,
    };
    // As training (and compare.py) do, rows left without a labelled token are skipped.
    let (usable, skipped) = enc.encode_all(&rows)?;
    if !skipped.is_empty() {
        eprintln!(
            "note: {} of {} rows have no labelled token within --seq-len {} and are skipped",
            skipped.len(),
            rows.len(),
            args.seq_len
        );
    }
    if usable.is_empty() {
        bail!(
            "no row of {} has a labelled token within --seq-len {} (loss on {}): raise \
             --seq-len, or pass --loss-on all",
            args.data.display(),
            args.seq_len,
            args.loss_on
        );
    }
    let needed = args.batch_size * (args.steps + 1);
    let examples: Vec<Example> = usable.into_iter().cycle().take(needed).collect();
    let mut opt = AdamW::new(model.lora_vars(), 0.0)?;
    // f16 runs scale the loss as training does (a constant here: the cost is the same).
    let loss_scale = if precision.loss_scaling {
        crate::train::loss_scale::INIT_SCALE
    } else {
        1.0
    };
    let sampler = info.is_cuda().then(|| DeviceMemorySampler::start(&dev));
    let mut timed = 0.0;
    let (mut tokens, mut targets) = (0usize, 0usize);
    for (step, batch) in examples.chunks(args.batch_size).enumerate() {
        let refs: Vec<&Example> = batch.iter().collect();
        let start = Instant::now();
        let b = make_batch(&model, &refs)?;
        let mut acc = HashMap::new();
        micro_step(
            &model,
            &b,
            loss_scale / b.n_targets as f64,
            // A fresh mask per step, as training draws them.
            (args.lora_dropout > 0.0).then_some(step as u64),
            !args.no_checkpointing,
            &mut acc,
        )?;
        let grads: Vec<Tensor> = opt
            .params
            .iter()
            .map(|(_, v)| {
                acc.remove(&v.id())
                    .expect("gradient")
                    .affine(1.0 / loss_scale, 0.0)
            })
            .collect::<candle_core::Result<_>>()?;
        opt.step(&grads, 1e-4)?;
        dev.synchronize()?;
        if step > 0 {
            timed += start.elapsed().as_secs_f64();
            tokens += b.n_tokens;
            targets += b.n_targets;
        }
    }
    let tokens_per_second = tokens as f64 / timed;
    let mean_len = tokens as f64 / (args.steps * args.batch_size) as f64;
    let cfg = &model.cfg;
    let d_attn = (cfg.num_attention_heads * cfg.head_dim()) as f64;
    // Forward and input-gradient GEMMs (2 + 2 FLOPs per weight per token; no weight gradients),
    // the LM head only at the labelled positions it runs on, and attention's score and value
    // products over the mean sequence.
    let head_params = (cfg.vocab_size * cfg.hidden_size) as f64;
    let labelled = targets as f64 / tokens as f64;
    let flops_per_token = 4.0 * (cfg.linear_params() as f64 - head_params)
        + 4.0 * head_params * labelled
        + 12.0 * cfg.num_hidden_layers as f64 * mean_len * d_attn;
    let peak_device_memory_mb = sampler.map(|s| s.stop() as f64 / 1e6);
    let (gemm, peak_source) = match dense_peak_flops(&info) {
        Some((flops, gpu)) => (flops, format!("vendor dense fp16/bf16 peak of the {gpu}")),
        None => (gemm_peak(&dev)?, "measured f32 GEMM".to_string()),
    };
    Ok(BenchReport {
        engine: "sftd (candle)",
        device: info.id.clone(),
        device_name: info.name.clone(),
        precision: precision.name(),
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        gradient_checkpointing: !args.no_checkpointing,
        lora_dropout: args.lora_dropout,
        loss_on: args.loss_on.clone(),
        threads: crate::train::nn::threads::count(),
        tokens_per_second,
        ms_per_step: timed * 1000.0 / args.steps as f64,
        mean_tokens_per_step: tokens as f64 / args.steps as f64,
        labelled_fraction: labelled,
        peak_rss_mb: peak_rss_mb(),
        model_flops_per_token: flops_per_token,
        gemm_peak_gflops: gemm / 1e9,
        peak_source,
        mfu: tokens_per_second * flops_per_token / gemm,
        peak_device_memory_mb,
        cpu: cpu_model(),
        isa: cpu_isa(),
        gemm_kernel: gemm_kernel(),
        sftd_kernels: crate::train::nn::kernels_on(&dev).0,
    })
}

/// Best f32 GEMM rate of (1024×1024)@(1024×3072) over 10 runs, in FLOP/s.
fn gemm_peak(dev: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), dev)?;
    let b = Tensor::randn(0f32, 1.0, (1024, 3072), dev)?;
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * 1024.0 * 1024.0 * 3072.0 / best)
}

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The random-init model of a `--shape`, generated into `DATA_DIR/bench-models` on first use.
fn bench_model(data_dir: &std::path::Path, shape: &str) -> Result<PathBuf> {
    use crate::train::demo::{write_model, DemoSize};
    // (directory, hidden, intermediate, layers, vocabulary); 16 query and 8 key/value heads of
    // 128 in all three, as in Qwen3-0.6B and -1.7B.
    let (name, hidden, intermediate, layers, vocab) = match shape {
        "layers" => ("qwen3-0.6b-layers-8l-v4096", 1024, 3072, 8, 4096),
        "head" => ("qwen3-0.6b-4l-v151936", 1024, 3072, 4, 151936),
        "layers-1.7b" => ("qwen3-1.7b-layers-4l-v4096", 2048, 6144, 4, 4096),
        other => bail!("unknown shape {other:?}"),
    };
    let dir = data_dir.join("bench-models").join(name);
    if !dir.join("model.safetensors").is_file() {
        let size = DemoSize {
            hidden,
            intermediate,
            layers,
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            min_vocab: vocab,
            ..DemoSize::DEMO
        };
        write_model(&dir, size, 0)?;
    }
    Ok(dir)
}

/// `model name` from /proc/cpuinfo.
pub(crate) fn cpu_model() -> String {
    cpuinfo_field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The CPU's SIMD extensions relevant to f32 GEMMs, from /proc/cpuinfo's flags.
fn cpu_isa() -> String {
    const KNOWN: [&str; 10] = [
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "neon",
    ];
    let flags = cpuinfo_field("flags")
        .or_else(|| cpuinfo_field("Features"))
        .unwrap_or_default();
    let have: Vec<&str> = flags.split_whitespace().collect();
    let list: Vec<&str> = KNOWN.into_iter().filter(|f| have.contains(f)).collect();
    list.join(" ")
}

fn cpuinfo_field(name: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.split(':').next().map(str::trim) == Some(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The f32 micro-kernel family the gemm crate picks on this CPU (it decides at run time).
fn gemm_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "fma (AVX2)";
        }
        "scalar"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "neon or scalar"
    }
}
