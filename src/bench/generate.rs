//! `sftd bench --generate`: prefill and decode tokens/s of greedy generation (KV cache, batch 1)
//! on the same model and prompt that `tools/bench/generate_compare.py` gives transformers.

use crate::train::data::Row;
use crate::train::generate::{argmax, BaseModel};
use crate::train::model::qwen3::KvCache;
use anyhow::{bail, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct GenerateReport {
    pub engine: &'static str,
    pub threads: usize,
    /// The instruction set of sftd's own kernels (`SFTD_CPU_ISA` can narrow it).
    pub sftd_kernels: &'static str,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub runs: usize,
    pub prefill_tokens_per_second_best: f64,
    pub prefill_tokens_per_second_median: f64,
    pub decode_tokens_per_second_best: f64,
    pub decode_tokens_per_second_median: f64,
}

/// The first chat row's messages before its first assistant turn, rendered with the
/// generation prompt (what a chat request would send), truncated to `max_len` tokens.
pub fn prompt_ids(base: &BaseModel, data: &std::path::Path, max_len: usize) -> Result<Vec<u32>> {
    let rows = super::read_rows(data)?;
    let Some((messages, tools)) = rows.iter().find_map(|(_, r)| match r {
        Row::Chat { messages, tools } => Some((messages, tools)),
        _ => None,
    }) else {
        bail!("{} has no chat row", data.display());
    };
    let turn = messages
        .iter()
        .position(|m| m["role"] == "assistant")
        .unwrap_or(messages.len());
    let text =
        base.format
            .template
            .render_prompt(&messages[..turn], tools.as_deref(), true, None)?;
    let mut ids = base.format.encode(&text)?;
    ids.truncate(max_len);
    Ok(ids)
}

/// What `sftd bench --generate` measures with (the subset of the bench flags it reads).
pub struct GenerateArgs {
    pub model: String,
    pub data_dir: PathBuf,
    pub data: PathBuf,
    pub seq_len: usize,
    pub new_tokens: usize,
    pub steps: usize,
    pub json: bool,
}

pub fn bench(args: &GenerateArgs) -> Result<()> {
    let model_dir = if args.model == crate::train::spec::DEMO_MODEL {
        crate::train::demo::ensure_demo_model(&args.data_dir)?
    } else {
        PathBuf::from(&args.model)
    };
    let base = BaseModel::load(&model_dir, &Device::Cpu)?;
    let prompt = prompt_ids(&base, &args.data, args.seq_len)?;
    let new_tokens = args.new_tokens;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // One untimed warm-up run, then `steps` timed ones.
    for run in 0..=args.steps {
        let mut cache = KvCache::with_capacity(prompt.len() + new_tokens);
        let t = Instant::now();
        let mut logits = base.model.forward_cached(&prompt, &mut cache, None)?;
        let mut next = argmax(&logits.to_vec1::<f32>()?);
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        // Fixed length, end-of-turn tokens ignored, as generate_compare.py's min_new_tokens.
        for _ in 1..new_tokens {
            logits = base.model.forward_cached(&[next], &mut cache, None)?;
            next = argmax(&logits.to_vec1::<f32>()?);
        }
        let d = t.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push(prompt.len() as f64 / p);
            decode.push((new_tokens - 1) as f64 / d);
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let report = GenerateReport {
        engine: "sftd (candle)",
        threads: crate::train::nn::threads::count(),
        sftd_kernels: crate::train::nn::kernel_isa().0,
        prompt_tokens: prompt.len(),
        new_tokens,
        runs: args.steps,
        prefill_tokens_per_second_best: best(&prefill),
        prefill_tokens_per_second_median: median(&mut prefill),
        decode_tokens_per_second_best: best(&decode),
        decode_tokens_per_second_median: median(&mut decode),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "| engine | kernels | prompt | new | prefill tok/s best / median | decode tok/s best / median |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {:.0} / {:.0} | {:.1} / {:.1} |",
            report.engine,
            report.sftd_kernels,
            report.prompt_tokens,
            report.new_tokens,
            report.prefill_tokens_per_second_best,
            report.prefill_tokens_per_second_median,
            report.decode_tokens_per_second_best,
            report.decode_tokens_per_second_median
        );
    }
    Ok(())
}
