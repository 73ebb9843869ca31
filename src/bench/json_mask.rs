//! `sftd bench --json-mask`: the cost of masking a model's vocabulary before each token of a
//! forced tool call's arguments, by the vocabulary's index and by reading every token, at the
//! states a call goes through (outside the object, in keys, in string and number values, at the
//! top level and nested, in a string with a `maxLength`, in a bounded integer).

use crate::train::generate::{json_mask, ArgumentSchema, ChatFormat};
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct MaskCase {
    pub state: &'static str,
    /// The arguments written so far.
    pub prefix: &'static str,
    /// Whether the call's `parameters` schema is applied (keys, types, listed values).
    pub schema: bool,
    pub allowed_tokens: usize,
    pub indexed_ms_best: f64,
    pub indexed_ms_median: f64,
    pub one_by_one_ms_best: f64,
    pub one_by_one_ms_median: f64,
}

#[derive(Debug, Serialize)]
pub struct MaskReport {
    pub cpu: String,
    pub vocabulary: usize,
    /// Decoding and sorting every token's text once, on a model's first forced call.
    pub token_texts_seconds: f64,
    pub runs: usize,
    pub cases: Vec<MaskCase>,
}

const CASES: [(&str, &str, bool); 13] = [
    ("before the object", "", false),
    ("first key", "{\"", false),
    ("in a string value", "{\"city\": \"Os", false),
    ("in a number", "{\"days\": 1", false),
    ("after a value", "{\"city\": \"Oslo\"", false),
    ("first key", "{\"", true),
    ("in a string value", "{\"city\": \"Os", true),
    ("in a listed value", "{\"unit\": \"cel", true),
    ("nested key", "{\"trip\": {\"", true),
    ("in a nested string", "{\"trip\": {\"from\": \"Os", true),
    ("in a listed array item", "{\"tags\": [\"week", true),
    (
        "in a string of at most 8 characters",
        "{\"code\": \"Os",
        true,
    ),
    ("in an integer from 1 to 30", "{\"days\": 1", true),
];

pub fn bench(model_dir: &Path, runs: usize, as_json: bool) -> Result<()> {
    let format = ChatFormat::load(model_dir)?;
    let t = Instant::now();
    let vocabulary = format.token_texts().texts().len();
    let token_texts_seconds = t.elapsed().as_secs_f64();
    let schema = ArgumentSchema::from_schema(&json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 30},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "trip": {"type": "object", "required": ["from"], "properties": {
                "from": {"type": "string"}, "to": {"type": "string"}}},
            "tags": {"type": "array", "items": {"enum": ["weekday", "weekend"]}},
            "code": {"type": "string", "maxLength": 8},
        },
        "required": ["city"],
    }))
    .expect("a schema with listed properties");
    let runs = runs.max(1);
    let mut cases = Vec::new();
    for (state, prefix, with_schema) in CASES {
        let args = with_schema.then_some(&schema);
        let timed = |one_by_one: bool| -> Result<(Vec<u32>, f64, f64)> {
            let mut ms = Vec::with_capacity(runs);
            let mut allowed = json_mask(&format, prefix, args, one_by_one)?;
            for _ in 0..runs {
                let t = Instant::now();
                allowed = json_mask(&format, prefix, args, one_by_one)?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            ms.sort_by(f64::total_cmp);
            Ok((allowed, ms[0], ms[ms.len() / 2]))
        };
        let (indexed, indexed_ms_best, indexed_ms_median) = timed(false)?;
        let (read, one_by_one_ms_best, one_by_one_ms_median) = timed(true)?;
        if indexed != read {
            bail!(
                "{state} ({prefix:?}): the index allows {} tokens, reading each {}",
                indexed.len(),
                read.len()
            );
        }
        cases.push(MaskCase {
            state,
            prefix,
            schema: with_schema,
            allowed_tokens: indexed.len(),
            indexed_ms_best,
            indexed_ms_median,
            one_by_one_ms_best,
            one_by_one_ms_median,
        });
    }
    let report = MaskReport {
        cpu: super::cpu_model(),
        vocabulary,
        token_texts_seconds,
        runs,
        cases,
    };
    if as_json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{} tokens; their texts decoded and sorted in {:.2} s (once per model); {} runs per \
         case; CPU: {}\n",
        report.vocabulary, report.token_texts_seconds, report.runs, report.cpu
    );
    println!("| state | arguments so far | schema | allowed | indexed ms best / median | one by one ms best / median |");
    println!("|---|---|---|---|---|---|");
    for c in &report.cases {
        println!(
            "| {} | `{}` | {} | {} | {:.3} / {:.3} | {:.3} / {:.3} |",
            c.state,
            c.prefix,
            if c.schema { "yes" } else { "no" },
            c.allowed_tokens,
            c.indexed_ms_best,
            c.indexed_ms_median,
            c.one_by_one_ms_best,
            c.one_by_one_ms_median
        );
    }
    Ok(())
}
