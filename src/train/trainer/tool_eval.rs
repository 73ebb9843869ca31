//! The tool-call evaluation of the model being trained: each held-out turn's prompt rendered with
//! the chat template, a greedy completion generated with the LoRA as trained (attached, unmerged,
//! KV cache), and scored against the reference turn.

use crate::train::data::parse_jsonl;
use crate::train::data::template::ChatTemplate;
use crate::train::events::Control;
use crate::train::generate::{generate, ChatFormat, SamplingParams};
use crate::train::model::qwen3::Tuning;
use crate::train::model::Qwen3;
use crate::train::tool_eval::{cases, has_tools, score, Offered, Reference, ToolEvalMetrics};
use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::time::Instant;
use tokenizers::Tokenizer;

/// The prepared cases of one run: prompts tokenized (and offered schemas compiled) once,
/// generated at every evaluation.
pub(super) struct ToolEval {
    prompts: Vec<(Vec<u32>, Reference, Offered)>,
    format: ChatFormat,
    max_new_tokens: usize,
}

/// How preparing went: the evaluation (when there is anything to evaluate) and a line to log.
pub(super) struct Prepared {
    pub eval: Option<ToolEval>,
    pub message: String,
}

impl ToolEval {
    /// Reads the cases of `path`. With `explicit` false (the validation file stands in) a file
    /// without tools is not evaluated. Cases whose prompt and budget overflow `context` tokens are
    /// skipped.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prepare(
        path: &Path,
        explicit: bool,
        model_dir: &Path,
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        max_examples: usize,
        max_new_tokens: usize,
        context: usize,
    ) -> Result<Prepared> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let rows = parse_jsonl(&bytes).map_err(|errs| {
            let first = errs
                .first()
                .map(|e| format!("line {}: {}", e.line, e.message));
            anyhow!(
                "{} has {} invalid line(s): {}",
                path.display(),
                errs.len(),
                first.unwrap_or_default()
            )
        })?;
        if !explicit && !has_tools(&rows) {
            return Ok(Prepared {
                eval: None,
                message: "tool-call evaluation off: the validation file offers no tools".into(),
            });
        }
        let all = cases(&rows, max_examples);
        let mut prompts = Vec::with_capacity(all.len());
        let mut too_long = 0;
        for c in &all {
            let text = template.render_prompt(&c.prefix, c.tools.as_deref(), true, None)?;
            let ids = tokenizer
                .encode(text, false)
                .map_err(|e| anyhow!("tokenization failed: {e}"))?
                .get_ids()
                .to_vec();
            if ids.len() + max_new_tokens > context {
                too_long += 1;
                continue;
            }
            prompts.push((ids, c.reference.clone(), Offered::new(c.tools.as_deref())));
        }
        let calls = prompts
            .iter()
            .filter(|(_, r, _)| matches!(r, Reference::Calls(_)))
            .count();
        let mut message = format!(
            "tool-call evaluation: {} held-out assistant turns ({calls} calling a tool), greedy, at most {max_new_tokens} new tokens each",
            prompts.len()
        );
        if too_long > 0 {
            message.push_str(&format!(
                "; {too_long} skipped (prompt + budget over the model's {context}-token context)"
            ));
        }
        if prompts.is_empty() {
            return Ok(Prepared {
                eval: None,
                message,
            });
        }
        let eval = Some(ToolEval {
            prompts,
            format: ChatFormat::load(model_dir)?,
            max_new_tokens,
        });
        Ok(Prepared { eval, message })
    }

    /// Generates every case with `model` as it stands and scores it; `None` when `control` asks
    /// the run to stop before the last case (checked between cases).
    pub(super) fn run(
        &self,
        model: &Qwen3,
        step: u64,
        control: &Control,
    ) -> Result<Option<ToolEvalMetrics>> {
        let started = Instant::now();
        let params = SamplingParams::greedy(self.max_new_tokens);
        let mut scores = Vec::with_capacity(self.prompts.len());
        for (ids, reference, offered) in &self.prompts {
            if control.is_cancelled() || control.is_suspended() {
                return Ok(None);
            }
            let out = generate(model, Tuning::Attached, &self.format, ids, &params, |_| {
                true
            })?;
            scores.push(score(reference, offered, &out.text));
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(Some(ToolEvalMetrics::from_scores(step, &scores, seconds)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::build::build_model_in;
    use crate::train::checkpoint::{load_adapter, save_adapter};
    use crate::train::demo::{write_model, DemoSize};
    use crate::train::generate::{generate, BaseModel, SamplingParams};
    use crate::train::model::qwen3::{AdapterWeights, KvCache, Tuning};
    use crate::train::spec::{LoraConfig, ALL_LINEAR};
    use candle_core::{DType, Device, Tensor};

    /// The evaluation generates with the LoRA attached as it trains; serving loads the saved
    /// adapter beside the base. Both must be the same model.
    #[test]
    fn the_attached_adapter_generates_what_the_saved_adapter_serves() {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("model");
        write_model(&model_dir, DemoSize::TINY, 3).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
        };
        let dev = Device::Cpu;
        let (trained, _) = build_model_in(&model_dir, &dev, DType::F32, &lora, None, 5).unwrap();
        let params = trained.lora_vars();
        for (key, var) in &params {
            if key.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 0.5, var.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        let adapter_dir = dir.path().join("adapter");
        save_adapter(&adapter_dir, &params, &lora, "tiny").unwrap();
        let base = BaseModel::load(&model_dir, &dev).unwrap();
        let served =
            AdapterWeights::new(&base.model, &load_adapter(&adapter_dir, &dev).unwrap()).unwrap();
        let prompt = base
            .format
            .encode("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n")
            .unwrap();

        let logits = |m: &crate::train::model::Qwen3, t: Tuning<'_>| {
            m.forward_cached(&prompt, &mut KvCache::new(), t)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let as_trained = logits(&trained, Tuning::Attached);
        let as_served = logits(&base.model, Tuning::Adapter(&served));
        let without = logits(&base.model, Tuning::Base);
        assert!(
            max_diff(&as_trained, &as_served) < 1e-4,
            "dropout off, nothing merged"
        );
        assert!(
            max_diff(&as_trained, &without) > 1e-2,
            "the adapter matters"
        );

        let params = SamplingParams::greedy(12);
        let a = generate(
            &trained,
            Tuning::Attached,
            &base.format,
            &prompt,
            &params,
            |_| true,
        )
        .unwrap();
        let b = generate(
            &base.model,
            Tuning::Adapter(&served),
            &base.format,
            &prompt,
            &params,
            |_| true,
        )
        .unwrap();
        assert_eq!(a.completion_ids, b.completion_ids);
    }
}
