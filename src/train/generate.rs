//! Text generation for serving: a base model loaded once, LoRA adapters applied beside it (never
//! merged, so one base serves any number of adapters), a KV cache, greedy or seeded nucleus
//! sampling, and stopping on end-of-turn tokens, stop strings or the token budget.

use crate::train::checkpoint::load_adapter;
use crate::train::data::template::ChatTemplate;
use crate::train::model::qwen3::{AdapterWeights, KvCache, Qwen3Config, Tuning};
use crate::train::model::Qwen3;
use crate::train::tool_calls::after_reasoning;
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};
use tokenizers::Tokenizer;

mod argument_schema;
#[cfg(test)]
mod argument_schema_tests;
mod json_prefix;
#[cfg(test)]
mod json_prefix_tests;
mod json_scalars;
#[cfg(test)]
mod nested_schema_tests;
mod opening;
#[cfg(test)]
mod opening_tests;
mod sampling;
mod spelling;
mod stop;
mod vocab_mask;
pub use argument_schema::ArgumentSchema;
pub use opening::Lead;
use sampling::Sampler;
pub use sampling::{argmax, GuidedCalls, SamplingParams};
use stop::Emitted;
pub use vocab_mask::TokenTexts;

/// The tokens allowed after `prefix` of a forced call's JSON arguments (keeping to `schema`
/// when given), by the vocabulary's index or, `one_by_one`, by reading every token's text:
/// `sftd bench --json-mask` times both.
pub fn json_mask(
    format: &ChatFormat,
    prefix: &str,
    schema: Option<&ArgumentSchema>,
    one_by_one: bool,
) -> Result<Vec<u32>> {
    let json = json_prefix::JsonPrefix::new()
        .after(prefix, schema)
        .ok_or_else(|| anyhow!("no JSON object that the schema allows begins with {prefix:?}"))?;
    let vocab = format.token_texts();
    Ok(if one_by_one {
        vocab.json_tokens_one_by_one(json, schema)
    } else {
        vocab.json_tokens(json, schema)
    })
}

/// A prompt that leaves no room in the model's context (a client error, not a failure).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ContextExceeded(pub String);

/// How a model talks: tokenizer, chat template, end-of-turn tokens and context length. Shared
/// by a loaded serving copy and a training model of the same directory.
pub struct ChatFormat {
    pub dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Tokens that end a completion: `eos_token` and `generation_config.json`'s `eos_token_id`.
    pub stop_ids: Vec<u32>,
    /// Prompt plus completion positions (`max_position_embeddings`).
    pub context_len: usize,
    /// Each token's text, built on first use by [`ChatFormat::token_texts`].
    token_texts: OnceLock<TokenTexts>,
}

impl ChatFormat {
    pub fn load(dir: &Path) -> Result<Self> {
        let context_len = Qwen3Config::from_dir(dir)?.max_position_embeddings;
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow!("loading {}/tokenizer.json: {e}", dir.display()))?;
        let template = ChatTemplate::from_model_dir(dir)?;
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
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            template,
            stop_ids,
            context_len,
            token_texts: OnceLock::new(),
        })
    }

    /// Each token's bytes by id, indexed for masking the vocabulary by what the tokens would
    /// write. Added tokens (`<|im_end|>`, `<tool_call>`, …) and end-of-turn tokens are empty:
    /// they are markup, never content. A byte-level tokenizer's tokens (Qwen's) are read back to
    /// their exact bytes, part of a character included; others as their decoded text.
    /// Built once per format, on first use: one decode per token.
    pub fn token_texts(&self) -> &TokenTexts {
        self.token_texts.get_or_init(|| {
            let added = self.tokenizer.get_added_tokens_decoder();
            let byte_level = matches!(
                self.tokenizer.get_decoder(),
                Some(tokenizers::DecoderWrapper::ByteLevel(_))
            );
            TokenTexts::new(
                (0..self.tokenizer.get_vocab_size(true) as u32)
                    .map(|id| {
                        if added.contains_key(&id) || self.stop_ids.contains(&id) {
                            return Vec::new();
                        }
                        let exact = byte_level
                            .then(|| self.tokenizer.id_to_token(id))
                            .flatten()
                            .and_then(|t| vocab_mask::byte_level_bytes(&t));
                        exact.unwrap_or_else(|| {
                            let text = self.tokenizer.decode(&[id], false).unwrap_or_default();
                            text.into_bytes()
                        })
                    })
                    .collect(),
            )
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("detokenization failed: {e}"))
    }

    /// The completion budget: what is asked for (or the rest of the context), refused when the
    /// prompt and the budget do not fit the model's context.
    pub fn budget(&self, prompt_len: usize, asked: Option<usize>) -> Result<usize> {
        let ctx = self.context_len;
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

/// A base model loaded for serving: its weights (no LoRA attached) and its chat format. Requests
/// generate on it through the worker's `ServingModel`, which also serves a training model's
/// weights; both run [`generate`].
pub struct BaseModel {
    pub model: Qwen3,
    pub format: Arc<ChatFormat>,
}

impl BaseModel {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self {
            model: Qwen3::load(dir, DType::F32, device)?,
            format: Arc::new(ChatFormat::load(dir)?),
        })
    }
}

/// Completion positions the cache reserves room for up front (beyond, it grows by doubling):
/// enough for most answers without reserving the whole context for every request.
const RESERVED_NEW_TOKENS: usize = 512;

/// Generates a completion of `prompt` with `model` under `tuning`, handing each piece of text
/// that is final (it can no longer turn into a stop string) to `on_text`; `on_text` returning
/// `false` stops early. The completion begins with `params.opening` when it has one. The model
/// may be a serving copy or a model being trained (between its micro-batches): nothing here
/// tracks gradients or touches its weights.
pub fn generate(
    model: &Qwen3,
    tuning: Tuning<'_>,
    format: &ChatFormat,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    let max_new = format.budget(prompt.len(), params.max_new_tokens)?;
    let opening = opening::encode(format, &params.opening)?;
    // A tokenizer without the opener as one token writes its calls freely.
    let guided = match &params.guided_calls {
        Some(g) => match format.encode(&g.opener)?[..] {
            [opener] => Some((opener, opening::encode(format, &g.body)?)),
            _ => None,
        },
        None => None,
    };
    let mut sampler = Sampler::new(params);
    let mut reader = Reader {
        model,
        tuning,
        cache: KvCache::with_capacity(prompt.len() + max_new.min(RESERVED_NEW_TOKENS)),
        started: Instant::now(),
        prefill_seconds: None,
        unread: prompt.to_vec(),
    };
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = Emitted::default();
    let mut stopped = false;
    let mut text = String::new();
    // Stop strings are looked for only in what the model writes itself, after `forced_end`.
    let mut forced_end = 0;
    let mut finish = FinishReason::Length;
    // Text written for the model before its next token: the opening first, then the body of
    // each call it opens itself. It streams as it is written.
    let mut forced = Some(opening.as_slice());
    loop {
        if let Some(parts) = forced.take() {
            let ended = opening::write(
                parts,
                format,
                &mut reader,
                &mut sampler,
                &mut ids,
                max_new,
                &mut |ids| {
                    if let Ok(text) = format.decode(ids) {
                        stopped = !emitted.more(&text, &[], &mut on_text);
                    }
                    !stopped
                },
            )?;
            text = format.decode(&ids)?;
            forced_end = text.len();
            if ended || stopped {
                finish = FinishReason::Stop;
                break;
            }
        }
        if ids.len() >= max_new {
            break;
        }
        let next = sampler.next(&reader.read()?);
        if format.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        ids.push(next);
        reader.unread.push(next);
        text = format.decode(&ids)?;
        if let Some(at) = emitted.stop_in(&text, &params.stop, forced_end) {
            text.truncate(at);
            finish = FinishReason::Stop;
            break;
        }
        if !emitted.more(&text, &params.stop, &mut on_text) {
            stopped = true;
            finish = FinishReason::Stop;
            break;
        }
        // A call the model opens outside its leading thinking block (inside it, a `<tool_call>`
        // is talk about a call) is written on for it.
        if let Some((opener, body)) = &guided {
            if next == *opener && after_reasoning(&text).is_some() {
                forced = Some(body.as_slice());
            }
        }
    }
    // What is left: a partial character, or a tail that a stop string would have needed more.
    if !stopped && text.len() > emitted.0 {
        on_text(&text[emitted.0..]);
    }
    let prefill_seconds = reader.prefill_seconds.unwrap_or(0.0);
    Ok(Generation {
        text,
        completion_ids: ids,
        prompt_tokens: prompt.len(),
        finish,
        prefill_seconds,
        decode_seconds: reader.started.elapsed().as_secs_f64() - prefill_seconds,
    })
}

/// The model reading tokens into its KV cache: the prompt first, then each token written.
struct Reader<'a> {
    model: &'a Qwen3,
    tuning: Tuning<'a>,
    cache: KvCache,
    started: Instant,
    /// Time to the first logits: the prompt and any forced opening read in one pass.
    prefill_seconds: Option<f64>,
    /// Tokens the model has not read yet.
    unread: Vec<u32>,
}

impl Reader<'_> {
    /// Reads the unread tokens; the logits for the token after them.
    fn read(&mut self) -> Result<Vec<f32>> {
        let logits = self
            .model
            .forward_cached(&self.unread, &mut self.cache, self.tuning)?;
        self.unread.clear();
        self.prefill_seconds
            .get_or_insert_with(|| self.started.elapsed().as_secs_f64());
        Ok(logits.to_vec1::<f32>()?)
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

/// Base models, chat formats and adapters loaded once and kept: switching adapters over a loaded
/// base costs no reload. Bases and formats are keyed by directory, adapters by (base directory,
/// adapter directory, file mtime). Adapters prepared against a training model of a base serve
/// its loaded copy too (the same shapes).
pub struct ModelCache {
    device: Device,
    max_bases: usize,
    max_adapters: usize,
    bases: Mutex<Vec<(PathBuf, Arc<BaseModel>)>>,
    formats: Mutex<HashMap<PathBuf, Arc<ChatFormat>>>,
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
            formats: Mutex::new(HashMap::new()),
            adapters: Mutex::new(HashMap::new()),
        }
    }

    /// The base model in `dir`, loading it on first use (the least recently used one is
    /// dropped beyond `max_bases`). Blocking.
    pub fn base(&self, dir: &Path) -> Result<Arc<BaseModel>> {
        let mut bases = self.bases.lock().expect("model cache lock");
        if let Some(i) = bases.iter().position(|b| b.0 == dir) {
            let b = bases.remove(i);
            bases.push(b.clone());
            return Ok(b.1);
        }
        let b = Arc::new(
            BaseModel::load(dir, &self.device)
                .with_context(|| format!("loading the model in {}", dir.display()))?,
        );
        if bases.len() >= self.max_bases {
            bases.remove(0);
        }
        bases.push((dir.to_path_buf(), b.clone()));
        self.formats
            .lock()
            .expect("format cache lock")
            .insert(dir.to_path_buf(), b.format.clone());
        Ok(b)
    }

    /// The chat format of the model in `dir` (without loading its weights). Blocking.
    pub fn format(&self, dir: &Path) -> Result<Arc<ChatFormat>> {
        let mut formats = self.formats.lock().expect("format cache lock");
        if let Some(f) = formats.get(dir) {
            return Ok(f.clone());
        }
        if formats.len() >= self.max_bases * 4 {
            formats.clear();
        }
        let f = Arc::new(ChatFormat::load(dir)?);
        formats.insert(dir.to_path_buf(), f.clone());
        Ok(f)
    }

    /// The adapter in `dir` prepared for `model`, the base in `base_dir` (a loaded copy or a
    /// model being trained), loaded on first use. Blocking.
    pub fn adapter(
        &self,
        base_dir: &Path,
        model: &Qwen3,
        dir: &Path,
    ) -> Result<Arc<AdapterWeights>> {
        let mtime = std::fs::metadata(dir.join(crate::train::checkpoint::ADAPTER_WEIGHTS))
            .and_then(|m| m.modified())
            .ok();
        let key = (base_dir.to_path_buf(), dir.to_path_buf(), mtime);
        if let Some(a) = self.adapters.lock().expect("adapter cache lock").get(&key) {
            return Ok(a.clone());
        }
        let raw = load_adapter(dir, &self.device)?;
        let a = Arc::new(AdapterWeights::new(model, &raw)?);
        let mut adapters = self.adapters.lock().expect("adapter cache lock");
        if adapters.len() >= self.max_adapters {
            adapters.clear();
        }
        adapters.insert(key, a.clone());
        Ok(a)
    }
}
