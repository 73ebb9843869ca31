//! Reading a JSONL file into tokenized examples, and the warning for rows that were skipped.

use crate::train::data::encode::{Encoder, Example};
use crate::train::data::template::ChatTemplate;
use crate::train::data::{parse_jsonl, RowError};
use crate::train::spec::TrainConfig;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

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
        // Usually a max_seq_len below the prompt (a system prompt with many tools is long).
        let fit = match enc.shortest_fit(&rows)? {
            Some(n) => format!(
                "; the shortest row needs max_seq_len >= {n} to keep one labelled token: raise \
                 max_seq_len or shorten the rows (tool definitions count)"
            ),
            None => "; no row has a labelled token at any length".into(),
        };
        bail!(
            "{} has no row with tokens to train on: all {} row(s) have no labelled token within \
             max_seq_len = {}{fit}",
            path.display(),
            rows.len(),
            cfg.max_seq_len
        );
    }
    Ok(Dataset { examples, skipped })
}

/// One warning for all rows of a file that had nothing to learn from.
pub(super) fn skipped_summary(name: &str, skipped: &[RowError]) -> Option<String> {
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
