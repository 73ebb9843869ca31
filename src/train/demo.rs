//! The built-in demo model: a small random-init Qwen3 with a byte-level BPE tokenizer trained on
//! the bundled examples, Qwen's special tokens and the Qwen3 chat template, written as an ordinary
//! Hugging Face model directory so it goes through the same loading code as a real checkpoint.

use crate::train::data::template::ChatTemplate;
use crate::train::data::{parse_jsonl, Row};
use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Qwen3's chat template (Apache-2.0, as shipped in Qwen3 tokenizer configs).
pub const QWEN3_CHAT_TEMPLATE: &str = include_str!("data/qwen3_chat_template.jinja");
/// The bundled tool-calling dataset the tokenizer is trained on.
pub const EXAMPLES: &str = include_str!("../../examples/tool_calls.jsonl");

/// Special tokens in Qwen3's order; the first three are `special` (skipped when decoding).
const ADDED: [(&str, bool); 9] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
    ("<think>", false),
    ("</think>", false),
];

/// Dimensions of a generated model.
#[derive(Debug, Clone, Copy)]
pub struct DemoSize {
    /// Learned BPE merges + bytes (the added tokens come on top).
    pub bpe_vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tie_embeddings: bool,
    /// Embedding rows at least this many (padding the vocabulary like real checkpoints do).
    pub min_vocab: usize,
}

impl DemoSize {
    /// `sftd-demo`: big enough to learn the tool-call format, small enough that the loss falls
    /// visibly within a minute on two CPU cores.
    pub const DEMO: Self = Self {
        bpe_vocab: 2048,
        hidden: 256,
        intermediate: 768,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        tie_embeddings: true,
        min_vocab: 0,
    };
    /// For tests: a few thousand parameters.
    pub const TINY: Self = Self {
        bpe_vocab: 400,
        hidden: 32,
        intermediate: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        tie_embeddings: true,
        min_vocab: 0,
    };
}

/// Writes the demo model (`DemoSize::DEMO`, seed 0) into `dir`.
pub fn write_demo_model(dir: &Path) -> Result<()> {
    write_model(dir, DemoSize::DEMO, 0)
}

/// `DATA_DIR/models/sftd-demo`, generated on first use. It is built in a uniquely named sibling
/// and renamed into place, so a crash never leaves a half-written model behind.
pub fn ensure_demo_model(data_dir: &Path) -> Result<std::path::PathBuf> {
    let models = data_dir.join("models");
    let dir = models.join(crate::train::spec::DEMO_MODEL);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&models)?;
    let tmp = models.join(format!(".demo-{}", uuid::Uuid::new_v4().simple()));
    let built = write_demo_model(&tmp).and_then(|()| Ok(std::fs::rename(&tmp, &dir)?));
    if built.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    // Another process sharing the data dir (a cluster) may have put the same model in place
    // first; the rename onto it then fails, and its copy is as good as ours.
    if built.is_err() && dir.join("config.json").is_file() {
        return Ok(dir);
    }
    built?;
    Ok(dir)
}

/// Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json into `dir`.
pub fn write_model(dir: &Path, size: DemoSize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tokenizer = train_tokenizer(size.bpe_vocab)?;
    let vocab = tokenizer.get_vocab_size(true).max(size.min_vocab);
    let id = |t: &str| tokenizer.token_to_id(t).expect("added token");
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("saving tokenizer: {e}"))?;
    let added: serde_json::Map<String, serde_json::Value> = ADDED
        .iter()
        .map(|(t, special)| {
            (
                id(t).to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": special}),
            )
        })
        .collect();
    let tok_cfg = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "bos_token": null,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_cfg)?,
    )?;
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "head_dim": size.head_dim,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rope_scaling": null,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": size.tie_embeddings,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "pad_token_id": id("<|endoftext|>"),
        "use_cache": true,
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": size.layers,
        "torch_dtype": "float32"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let weights = random_weights(size, vocab, seed)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}

/// Byte-level BPE trained on the bundled examples rendered with the chat template.
fn train_tokenizer(bpe_vocab: usize) -> Result<Tokenizer> {
    let template = ChatTemplate::new(
        Some(QWEN3_CHAT_TEMPLATE.to_string()),
        "<|im_end|>".into(),
        Some("<|endoftext|>".into()),
    )?;
    let rows = parse_jsonl(EXAMPLES.as_bytes())
        .map_err(|e| anyhow!("bundled examples are invalid: {e:?}"))?;
    let texts: Vec<String> = rows
        .iter()
        .map(|(_, row)| match row {
            Row::Chat { messages, tools } => template.render(messages, tools.as_deref()),
            Row::PromptCompletion { prompt, completion } => Ok(format!("{prompt}{completion}")),
            Row::Text(t) => Ok(t.clone()),
        })
        .collect::<Result<_>>()?;
    // The special tokens are added afterwards, so strip them from the training text.
    let texts: Vec<String> = texts
        .into_iter()
        .map(|t| ADDED.iter().fold(t, |t, (tok, _)| t.replace(tok, "\n")))
        .collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(bpe_vocab)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tokenizer
        .train(&mut trainer, texts.into_iter())
        .map_err(|e| anyhow!("training the demo tokenizer: {e}"))?;
    for (tok, special) in ADDED {
        let t = AddedToken::from(tok, special).normalized(false);
        if special {
            tokenizer
                .add_special_tokens([t])
                .map_err(|e| anyhow!("adding {tok}: {e}"))?;
        } else {
            tokenizer
                .add_tokens([t])
                .map_err(|e| anyhow!("adding {tok}: {e}"))?;
        }
    }
    Ok(tokenizer)
}

/// HF's init for Qwen3: N(0, 0.02) for embeddings and projections, ones for norms.
fn random_weights(s: DemoSize, vocab: usize, seed: u64) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02).expect("valid std");
    let mut randn = |shape: (usize, usize)| -> Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| normal.sample(&mut rng))
            .collect();
        Ok(Tensor::from_vec(data, shape, &dev)?)
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &dev);
    let (h, f, d) = (s.hidden, s.intermediate, s.head_dim);
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), randn((vocab, h))?);
    if !s.tie_embeddings {
        w.insert("lm_head.weight".to_string(), randn((vocab, h))?);
    }
    w.insert("model.norm.weight".to_string(), ones(h)?);
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", (s.heads * d, h)),
            ("self_attn.k_proj", (s.kv_heads * d, h)),
            ("self_attn.v_proj", (s.kv_heads * d, h)),
            ("self_attn.o_proj", (h, s.heads * d)),
            ("mlp.gate_proj", (f, h)),
            ("mlp.up_proj", (f, h)),
            ("mlp.down_proj", (h, f)),
        ] {
            w.insert(format!("{p}.{name}.weight"), randn(shape)?);
        }
        w.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
        w.insert(format!("{p}.self_attn.q_norm.weight"), ones(d)?);
        w.insert(format!("{p}.self_attn.k_norm.weight"), ones(d)?);
    }
    Ok(w)
}
