//! Text generation for serving: a base model loaded once, LoRA adapters applied beside it (never
//! merged, so one base serves any number of adapters), a KV cache, greedy or seeded nucleus
//! sampling, and stopping on end-of-turn tokens, stop strings or the token budget.

use crate::train::checkpoint::load_adapter;
use crate::train::data::template::ChatTemplate;
use crate::train::model::qwen3::{AdapterWeights, KvCache};
use crate::train::model::Qwen3;
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokenizers::Tokenizer;

/// A prompt that leaves no room in the model's context (a client error, not a failure).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ContextExceeded(pub String);

/// A base model ready to generate: weights, tokenizer, chat template and end-of-turn tokens.
pub struct BaseModel {
    pub dir: PathBuf,
    pub model: Qwen3,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Tokens that end a completion: `eos_token` and `generation_config.json`'s `eos_token_id`.
    pub stop_ids: Vec<u32>,
}

impl BaseModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let model = Qwen3::load(dir, DType::F32, device)?;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow!("loading {}/tokenizer.json: {e}", dir.display()))?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let stop_ids = stop_ids(dir, &tokenizer, &template);
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            template,
            stop_ids,
        })
    }

    /// The generation loop over this model.
    pub fn generator(&self) -> Generator<'_> {
        Generator {
            model: &self.model,
            tokenizer: &self.tokenizer,
            stop_ids: &self.stop_ids,
        }
    }

    /// The context length: prompt plus completion positions.
    pub fn context_len(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// See [`Generator::generate`].
    pub fn generate(
        &self,
        adapter: Option<&AdapterWeights>,
        prompt: &[u32],
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.generator().generate(adapter, prompt, params, on_text)
    }

    /// See [`Generator::budget`].
    pub fn budget(&self, prompt_len: usize, asked: Option<usize>) -> Result<usize> {
        self.generator().budget(prompt_len, asked)
    }
}

/// Tokens that end a completion: `<|im_end|>`, `<|endoftext|>`, the template's `eos_token` and
/// `generation_config.json`'s `eos_token_id` in `dir`.
pub fn stop_ids(dir: &Path, tokenizer: &Tokenizer, template: &ChatTemplate) -> Vec<u32> {
    let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>", template.eos_token.as_str()]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
        let cfg: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match &cfg["eos_token_id"] {
            serde_json::Value::Number(n) => stop_ids.extend(n.as_u64().map(|n| n as u32)),
            serde_json::Value::Array(a) => {
                stop_ids.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
            }
            _ => {}
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    stop_ids
}

/// What generation needs, borrowed: a served [`BaseModel`]'s parts, or the model a trainer is
/// training (its LoRA attached, so the adapter applies as trained, unmerged).
#[derive(Clone, Copy)]
pub struct Generator<'a> {
    pub model: &'a Qwen3,
    pub tokenizer: &'a Tokenizer,
    pub stop_ids: &'a [u32],
}

impl Generator<'_> {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenization failed: {e}"))
    }

    /// Generates a completion of `prompt`, handing each piece of text that is final (it can no
    /// longer turn into a stop string) to `on_text`; `on_text` returning `false` stops early.
    pub fn generate(
        &self,
        adapter: Option<&AdapterWeights>,
        prompt: &[u32],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let max_new = self.budget(prompt.len(), params.max_new_tokens)?;
        let mut sampler = Sampler::new(params);
        let mut cache = KvCache::new();
        let started = Instant::now();
        let mut logits = self.model.forward_cached(prompt, &mut cache, adapter)?;
        let prefill_seconds = started.elapsed().as_secs_f64();
        let mut ids: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut emitted = 0;
        let mut finish = FinishReason::Length;
        while ids.len() < max_new {
            let next = sampler.next(&logits.to_vec1::<f32>()?);
            if self.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            ids.push(next);
            text = self.decode(&ids)?;
            // Decoding more tokens only ever extends the text; clamp in case a tokenizer disagrees.
            emitted = emitted.min(text.len());
            while !text.is_char_boundary(emitted) {
                emitted -= 1;
            }
            if let Some(at) = find_stop(&text, &params.stop, emitted) {
                text.truncate(at);
                finish = FinishReason::Stop;
                break;
            }
            let ready = final_prefix_len(&text, &params.stop).max(emitted);
            if ready > emitted && !on_text(&text[emitted..ready]) {
                emitted = ready;
                finish = FinishReason::Stop;
                break;
            }
            emitted = ready;
            if ids.len() < max_new {
                logits = self.model.forward_cached(&[next], &mut cache, adapter)?;
            }
        }
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
        Ok(Generation {
            text,
            completion_ids: ids,
            prompt_tokens: prompt.len(),
            finish,
            prefill_seconds,
            decode_seconds: started.elapsed().as_secs_f64() - prefill_seconds,
        })
    }

    /// The completion budget: what is asked for (or the rest of the context), refused when the
    /// prompt and the budget do not fit the model's context.
    pub fn budget(&self, prompt_len: usize, asked: Option<usize>) -> Result<usize> {
        let ctx = self.model.cfg.max_position_embeddings;
        if prompt_len == 0 {
            return Err(ContextExceeded("the prompt is empty".into()).into());
        }
        if prompt_len >= ctx {
            return Err(ContextExceeded(format!(
                "the prompt is {prompt_len} tokens, but this model's context is {ctx} tokens \
                 (max_position_embeddings); shorten the messages"
            ))
            .into());
        }
        match asked {
            Some(n) if prompt_len + n > ctx => Err(ContextExceeded(format!(
                "the prompt ({prompt_len} tokens) plus max_completion_tokens ({n}) exceed this \
                 model's context of {ctx} tokens"
            ))
            .into()),
            Some(n) => Ok(n),
            None => Ok(ctx - prompt_len),
        }
    }
}

/// How to pick tokens and when to stop.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Seeds the sampler; `None` draws a seed.
    pub seed: Option<u64>,
    /// `None`: until an end-of-turn token or the end of the context.
    pub max_new_tokens: Option<usize>,
    /// Text that ends the completion (not included in it).
    pub stop: Vec<String>,
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            max_new_tokens: Some(max_new_tokens),
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// The token budget ran out.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The completion, without the end-of-turn token or stop string.
    pub text: String,
    pub completion_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: FinishReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Greedy (argmax, the first of equal maxima as torch does) or temperature + top-p sampling.
struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    fn new(p: &SamplingParams) -> Self {
        let seed = p.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    fn next(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= sum);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Nucleus: the fewest most likely tokens whose mass reaches top_p (at least one).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p.1;
            if mass as f64 >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Byte offset of the first stop string in `text` that ends after byte `from`.
fn find_stop(text: &str, stop: &[String], from: usize) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let start = from.saturating_sub(s.len() - 1);
            let start = (start..=from).find(|&i| text.is_char_boundary(i))?;
            text[start..].find(s.as_str()).map(|i| start + i)
        })
        .min()
}

/// How much of `text` is final: all but a trailing partial character (shown as U+FFFD while a
/// multi-byte character is incomplete) and a tail that could still grow into a stop string.
fn final_prefix_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let held = stop
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&n| s.is_char_boundary(n))
                .find(|&n| text[..end].ends_with(&s[..n]))
        })
        .max()
        .unwrap_or(0);
    end - held
}

/// Base models and adapters loaded once and kept: switching adapters over a loaded base costs
/// no reload. Bases are keyed by directory, adapters by (base, adapter directory, file mtime).
pub struct ModelCache {
    device: Device,
    max_bases: usize,
    max_adapters: usize,
    bases: Mutex<Vec<Arc<BaseModel>>>,
    adapters: Mutex<HashMap<AdapterKey, Arc<AdapterWeights>>>,
}

type AdapterKey = (PathBuf, PathBuf, Option<SystemTime>);

impl ModelCache {
    pub fn new(device: Device, max_bases: usize, max_adapters: usize) -> Self {
        Self {
            device,
            max_bases: max_bases.max(1),
            max_adapters: max_adapters.max(1),
            bases: Mutex::new(Vec::new()),
            adapters: Mutex::new(HashMap::new()),
        }
    }

    /// The base model in `dir`, loading it on first use (the least recently used one is
    /// dropped beyond `max_bases`). Blocking.
    pub fn base(&self, dir: &Path) -> Result<Arc<BaseModel>> {
        let mut bases = self.bases.lock().expect("model cache lock");
        if let Some(i) = bases.iter().position(|b| b.dir == dir) {
            let b = bases.remove(i);
            bases.push(b.clone());
            return Ok(b);
        }
        let b = Arc::new(
            BaseModel::load(dir, &self.device)
                .with_context(|| format!("loading the model in {}", dir.display()))?,
        );
        if bases.len() >= self.max_bases {
            bases.remove(0);
            let mut adapters = self.adapters.lock().expect("adapter cache lock");
            adapters.retain(|k, _| bases.iter().any(|b| b.dir == k.0));
        }
        bases.push(b.clone());
        Ok(b)
    }

    /// The adapter in `dir` prepared for `base`, loaded on first use. Blocking.
    pub fn adapter(&self, base: &BaseModel, dir: &Path) -> Result<Arc<AdapterWeights>> {
        let mtime = std::fs::metadata(dir.join(crate::train::checkpoint::ADAPTER_WEIGHTS))
            .and_then(|m| m.modified())
            .ok();
        let key = (base.dir.clone(), dir.to_path_buf(), mtime);
        if let Some(a) = self.adapters.lock().expect("adapter cache lock").get(&key) {
            return Ok(a.clone());
        }
        let raw = load_adapter(dir, &self.device)?;
        let a = Arc::new(AdapterWeights::new(&base.model, &raw)?);
        let mut adapters = self.adapters.lock().expect("adapter cache lock");
        if adapters.len() >= self.max_adapters {
            adapters.clear();
        }
        adapters.insert(key, a.clone());
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_pieces() {
        let stop = vec!["END".to_string()];
        assert_eq!(find_stop("abcEN", &stop, 3), None);
        assert_eq!(find_stop("abcEND", &stop, 5), Some(3));
        assert_eq!(
            find_stop("ENDabc", &stop, 6),
            None,
            "already emitted text is not searched"
        );
        assert_eq!(final_prefix_len("abcEN", &stop), 3);
        assert_eq!(final_prefix_len("abcx", &stop), 4);
        assert_eq!(final_prefix_len("ab\u{FFFD}", &[]), 2);
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_keeps_the_head() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        let mut s = Sampler::new(&SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            max_new_tokens: None,
            stop: vec![],
        });
        // Token 2 alone holds > 50% of the mass, so nucleus sampling can only pick it.
        for _ in 0..20 {
            assert_eq!(s.next(&[0.0, 0.0, 5.0, 0.0]), 2);
        }
        let mut s = Sampler::new(&SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: Some(7),
            max_new_tokens: None,
            stop: vec![],
        });
        let draws: std::collections::HashSet<u32> =
            (0..200).map(|_| s.next(&[0.0, 0.0, 0.0, 0.0])).collect();
        assert_eq!(draws.len(), 4, "a flat distribution draws every token");
    }
}
