//! Rows → token ids with per-token label flags, following TRL: chat rows label the assistant
//! turns (or everything), prompt/completion labels the completion, text labels all of it.

use super::template::ChatTemplate;
use super::{Row, RowError};
use crate::train::spec::LossOn;
use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 1-based line in the source file.
    pub line: usize,
    pub ids: Vec<u32>,
    /// `labels[j]`: token j is a prediction target (for the position before it).
    pub labels: Vec<bool>,
}

impl Example {
    /// Positions whose next token is a target (TRL's shifted labels).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l).count()
    }
}

const ASSISTANT_OPEN: &str = "<|im_start|>assistant\n";
const TURN_CLOSE: &str = "<|im_end|>";

/// Byte ranges of every assistant turn: from right after `<|im_start|>assistant\n` through the
/// `<|im_end|>` closing it (the newline after it excluded).
pub fn assistant_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(ASSISTANT_OPEN) {
        let start = from + i + ASSISTANT_OPEN.len();
        let end = match text[start..].find(TURN_CLOSE) {
            Some(j) => start + j + TURN_CLOSE.len(),
            None => text.len(),
        };
        spans.push((start, end));
        from = end;
    }
    spans
}

pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub loss_on: LossOn,
    pub max_seq_len: usize,
}

impl Encoder<'_> {
    /// Tokenizes every row. Rows left with nothing to learn from after truncation are returned
    /// as errors (with their line) rather than silently dropped.
    pub fn encode_all(&self, rows: &[(usize, Row)]) -> Result<(Vec<Example>, Vec<RowError>)> {
        let mut out = Vec::with_capacity(rows.len());
        let mut skipped = Vec::new();
        for (line, row) in rows {
            let ex = self.encode(*line, row)?;
            if ex.n_targets() == 0 {
                skipped.push(RowError {
                    line: *line,
                    code: "no_trainable_tokens".into(),
                    message: format!(
                        "no labelled tokens left within max_seq_len = {}",
                        self.max_seq_len
                    ),
                });
            } else {
                out.push(ex);
            }
        }
        Ok((out, skipped))
    }

    /// The smallest `max_seq_len` that would keep a labelled token of at least one of `rows`
    /// (through the first labelled token after the first token), or `None` when none has one.
    pub fn shortest_fit(&self, rows: &[(usize, Row)]) -> Result<Option<usize>> {
        let mut shortest = None;
        for (line, row) in rows {
            let whole = self.encode_whole(*line, row)?;
            if let Some(j) = whole.labels.iter().skip(1).position(|&l| l) {
                shortest = Some(shortest.map_or(j + 2, |s: usize| s.min(j + 2)));
            }
        }
        Ok(shortest)
    }

    pub fn encode(&self, line: usize, row: &Row) -> Result<Example> {
        let mut ex = self.encode_whole(line, row)?;
        ex.ids.truncate(self.max_seq_len);
        ex.labels.truncate(self.max_seq_len);
        Ok(ex)
    }

    /// [`Encoder::encode`] without the truncation to `max_seq_len`.
    fn encode_whole(&self, line: usize, row: &Row) -> Result<Example> {
        let eos = &self.template.eos_token;
        // (text, byte ranges labelled)
        let (text, spans) = match row {
            Row::Chat { messages, tools } => {
                let text = self
                    .template
                    .render(messages, tools.as_deref())
                    .map_err(|e| anyhow!("line {line}: {e}"))?;
                let spans = match self.loss_on {
                    LossOn::Assistant => assistant_spans(&text),
                    LossOn::All => vec![(0, text.len())],
                };
                (text, spans)
            }
            Row::PromptCompletion { prompt, completion } => {
                let text = format!("{prompt}{completion}{eos}");
                let span = (prompt.len(), text.len());
                (text, vec![span])
            }
            Row::Text(t) => {
                let text = format!("{t}{eos}");
                let span = (0, text.len());
                (text, vec![span])
            }
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| anyhow!("line {line}: tokenization failed: {e}"))?;
        let ids = enc.get_ids().to_vec();
        let labels: Vec<bool> = enc
            .get_offsets()
            .iter()
            .map(|&(s, _)| spans.iter().any(|&(a, b)| s >= a && s < b))
            .collect();
        Ok(Example { line, ids, labels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_assistant_turns_through_im_end() {
        let t = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n";
        let s = assistant_spans(t);
        assert_eq!(s.len(), 1);
        assert_eq!(&t[s[0].0..s[0].1], "<think>\n\n</think>\n\nyo<|im_end|>");
    }
}
