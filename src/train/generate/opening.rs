//! A completion's forced opening: text written as if the model had written it, choices the
//! model picks among, and a JSON object the model writes, its next tokens restricted to those
//! that keep to them. `tool_choice: "required"` and a named function are built on it: the call's
//! frame is forced, the model picks the name and writes the arguments as JSON.

use super::argument_schema::ArgumentSchema;
use super::json_prefix::JsonPrefix;
use super::{ChatFormat, Reader, Sampler};
use anyhow::{bail, Result};

/// One part of an opening, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Lead {
    /// Written as is.
    Text(String),
    /// Exactly one of these, chosen by the model token by token; none may begin another.
    OneOf(Vec<String>),
    /// One JSON object, written by the model with every token masked that would make the text
    /// something no such object begins with. Its top-level keys and values: with one entry,
    /// that entry's schema (`None`: any); with one entry per choice of the `OneOf` before it,
    /// that of the choice the model picked. Ends where the object closes; the budget may end it
    /// first.
    JsonObject(Vec<Option<ArgumentSchema>>),
    /// The completion ends here, as if the model had ended its turn.
    End,
    /// The model picks: end its turn here (an end-of-turn token), or write this text and then
    /// the leads from the first again (another call after the one before). Only the budget
    /// bounds how often.
    Again(String),
}

/// An opening in token ids.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Part {
    Force(Vec<u32>),
    /// Token sequences of which none is a prefix of another, so the model's pick is always one
    /// whole choice; each with its index among the lead's choices.
    Choose(Vec<(Vec<u32>, usize)>),
    Json(Vec<Option<ArgumentSchema>>),
    End,
    /// The model ends its turn here, or goes on with this token (the next part forces it and
    /// the rest of its text, then [`Part::Restart`]).
    EndOr(u32),
    /// Back to the first part.
    Restart,
}

/// Encodes `leads` with the model's tokenizer. Each piece is encoded alone; the model then reads
/// the pieces' tokens one after another, as it would read its own.
pub(super) fn encode(format: &ChatFormat, leads: &[Lead]) -> Result<Vec<Part>> {
    let mut parts = Vec::with_capacity(leads.len());
    let mut last_choices = None;
    for lead in leads {
        let part = match lead {
            Lead::Text(t) => Part::Force(format.encode(t)?),
            Lead::OneOf(choices) => {
                let mut ids = Vec::with_capacity(choices.len());
                for (i, c) in choices.iter().enumerate() {
                    ids.push((format.encode(c)?, i));
                }
                ids.sort();
                ids.dedup_by(|a, b| a.0 == b.0);
                if ids.iter().any(|c| c.0.is_empty()) {
                    bail!("a forced choice is empty");
                }
                // Sorted, a sequence that begins another sits right before one that it begins.
                if ids.windows(2).any(|w| w[1].0.starts_with(&w[0].0)) {
                    bail!("one forced choice begins another: {choices:?}");
                }
                last_choices = Some(choices.len());
                Part::Choose(ids)
            }
            Lead::JsonObject(schemas) => {
                if schemas.len() != 1 && Some(schemas.len()) != last_choices {
                    bail!("a JSON object's schemas are one, or one per choice before it");
                }
                Part::Json(schemas.clone())
            }
            Lead::End => Part::End,
            Lead::Again(text) => {
                let ids = format.encode(text)?;
                match ids.first() {
                    None => bail!("the text before another round is empty"),
                    Some(t) if format.stop_ids.contains(t) => {
                        bail!("the text before another round begins with an end-of-turn token")
                    }
                    Some(&t) => parts.extend([Part::EndOr(t), Part::Force(ids)]),
                }
                Part::Restart
            }
        };
        parts.push(part);
    }
    Ok(parts)
}

/// The tokens that may follow the first `k` tokens of a pick, given the choices still open
/// (each with its index): every open choice is longer than `k`, as none begins another.
pub(super) fn next_tokens(open: &[&(Vec<u32>, usize)], k: usize) -> Vec<u32> {
    let mut next: Vec<u32> = open.iter().map(|c| c.0[k]).collect();
    next.sort_unstable();
    next.dedup();
    next
}

/// Writes the opening `parts` into `ids` (the model reading each token as its own), within
/// `max_new` tokens in all, showing `written` the ids after each token (`false` from it stops
/// the opening: the client is gone). `true` when the opening reached an [`Lead::End`] whole, the
/// model ended its turn at a [`Lead::Again`], or `written` stopped it: the completion is over.
pub(super) fn write(
    parts: &[Part],
    format: &ChatFormat,
    reader: &mut Reader<'_>,
    sampler: &mut Sampler,
    ids: &mut Vec<u32>,
    max_new: usize,
    written: &mut dyn FnMut(&[u32]) -> bool,
) -> Result<bool> {
    let mut push = |ids: &mut Vec<u32>, reader: &mut Reader<'_>, t: u32| {
        ids.push(t);
        reader.unread.push(t);
        written(ids)
    };
    // The index of the last choice made, which picks a JSON object's schema.
    let mut picked = 0;
    let mut at = 0;
    while let Some(part) = parts.get(at) {
        at += 1;
        match part {
            Part::Force(tokens) => {
                for &t in tokens {
                    if ids.len() == max_new {
                        return Ok(false);
                    }
                    if !push(ids, reader, t) {
                        return Ok(true);
                    }
                }
            }
            Part::Choose(choices) => {
                let mut open: Vec<&(Vec<u32>, usize)> = choices.iter().collect();
                // Every open choice is longer than `k` until one alone is left.
                let mut k = 0;
                while k < open[0].0.len() {
                    if ids.len() == max_new {
                        return Ok(false);
                    }
                    let next = match open.as_slice() {
                        [only] => only.0[k],
                        _ => sampler.next_among(&reader.read()?, &next_tokens(&open, k)),
                    };
                    open.retain(|c| c.0[k] == next);
                    if !push(ids, reader, next) {
                        return Ok(true);
                    }
                    k += 1;
                }
                picked = open[0].1;
            }
            Part::Json(schemas) => {
                let schema = schemas
                    .get(picked)
                    .or(schemas.first())
                    .and_then(Option::as_ref);
                let vocab = format.token_texts();
                let mut json = JsonPrefix::new();
                while !json.is_done() {
                    let allowed = vocab.json_tokens(json, schema);
                    // Only a vocabulary without single-byte tokens could leave nothing to write.
                    if ids.len() == max_new || allowed.is_empty() {
                        return Ok(false);
                    }
                    let next = match allowed[..] {
                        [only] => only,
                        _ => sampler.next_among(&reader.read()?, &allowed),
                    };
                    json = json
                        .after_bytes(&vocab.texts()[next as usize], schema)
                        .expect("an allowed token continues the object");
                    if !push(ids, reader, next) {
                        return Ok(true);
                    }
                }
            }
            Part::End => return Ok(true),
            Part::EndOr(token) => {
                if ids.len() == max_new {
                    return Ok(false);
                }
                let mut allowed = format.stop_ids.clone();
                allowed.push(*token);
                allowed.sort_unstable();
                allowed.dedup();
                if sampler.next_among(&reader.read()?, &allowed) != *token {
                    return Ok(true);
                }
            }
            Part::Restart => at = 0,
        }
    }
    Ok(false)
}
