//! Forced openings on the tiny demo model: text read as the model's own, picks among choices,
//! JSON objects under the mask, rounds after `Again`, streaming, and the budget.

use super::json_prefix::JsonPrefix;
use super::opening::*;
use super::{
    generate, ArgumentSchema, BaseModel, FinishReason, Generation, GuidedCalls, SamplingParams,
};
use crate::train::demo::{write_model, DemoSize};
use crate::train::model::qwen3::{KvCache, Tuning};
use candle_core::Device;

const PROMPT: &str = "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n";

fn tiny() -> (tempfile::TempDir, BaseModel, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), DemoSize::TINY, 3).unwrap();
    let base = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
    let prompt = base.format.encode(PROMPT).unwrap();
    (dir, base, prompt)
}

fn run(base: &BaseModel, prompt: &[u32], params: &SamplingParams) -> Generation {
    streamed(base, prompt, params, |_| true)
}

/// [`run`], showing each piece of text to `on_text` as it is emitted.
fn streamed(
    base: &BaseModel,
    prompt: &[u32],
    params: &SamplingParams,
    on_text: impl FnMut(&str) -> bool,
) -> Generation {
    generate(
        &base.model,
        Tuning::Base,
        &base.format,
        prompt,
        params,
        on_text,
    )
    .unwrap()
}

fn with(mut params: SamplingParams, opening: Vec<Lead>) -> SamplingParams {
    params.opening = opening;
    params
}

/// Sampling at temperature 1 (the tiny model's choices vary with the seed).
fn sampled(seed: u64, max_new: usize, opening: Vec<Lead>) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        seed: Some(seed),
        max_new_tokens: Some(max_new),
        stop: vec![],
        opening,
        guided_calls: None,
    }
}

#[test]
fn forced_text_is_written_and_then_read_as_the_models_own() {
    let (_dir, base, prompt) = tiny();
    let forced = base.format.encode("It is").unwrap();
    let params = with(SamplingParams::greedy(12), vec![Lead::Text("It is".into())]);
    let mut pieces = String::new();
    let g = streamed(&base, &prompt, &params, |t| {
        pieces.push_str(t);
        true
    });
    assert!(g.text.starts_with("It is"), "{:?}", g.text);
    assert_eq!(pieces, g.text, "the opening is streamed like the rest");
    assert_eq!(g.completion_ids[..forced.len()], forced[..]);
    assert_eq!(g.prompt_tokens, prompt.len());
    // What follows is what the model writes after a prompt that ends with those tokens.
    let mut longer = prompt.clone();
    longer.extend(&forced);
    let free = run(&base, &longer, &SamplingParams::greedy(12 - forced.len()));
    assert_eq!(g.completion_ids[forced.len()..], free.completion_ids[..]);
    assert_eq!(g.finish, free.finish);
}

/// A forced JSON object streams as the model writes it, piece by piece, and a consumer
/// that stops taking text (a client gone) stops the opening at its next token.
#[test]
fn the_opening_streams_and_a_consumer_that_leaves_stops_it() {
    let (_dir, base, prompt) = tiny();
    let params = sampled(
        3,
        120,
        vec![Lead::Text("args: ".into()), Lead::JsonObject(vec![None])],
    );
    let mut pieces = Vec::new();
    let g = streamed(&base, &prompt, &params, |t| {
        pieces.push(t.to_string());
        true
    });
    assert!(pieces.len() > 5, "streamed, not whole: {pieces:?}");
    assert_eq!(pieces.concat(), g.text);
    let mut taken = 0;
    let cut = streamed(&base, &prompt, &params, |_| {
        taken += 1;
        taken < 3
    });
    assert_eq!(taken, 3);
    assert_eq!(cut.finish, FinishReason::Stop);
    assert!(
        cut.completion_ids.len() < g.completion_ids.len(),
        "{} of {} tokens",
        cut.completion_ids.len(),
        g.completion_ids.len()
    );
    assert_eq!(
        cut.completion_ids[..],
        g.completion_ids[..cut.completion_ids.len()]
    );
}

#[test]
fn a_greedy_pick_is_the_choice_the_model_ranks_first() {
    let (_dir, base, prompt) = tiny();
    let choices = ["alpha", "Paris", "weather"];
    let first: Vec<u32> = choices
        .iter()
        .map(|c| base.format.encode(c).unwrap()[0])
        .collect();
    assert!(first[0] != first[1] && first[1] != first[2] && first[0] != first[2]);
    let logits = base
        .model
        .forward_cached(&prompt, &mut KvCache::new(), Tuning::Base)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let best = (0..3)
        .max_by(|&a, &b| logits[first[a] as usize].total_cmp(&logits[first[b] as usize]))
        .unwrap();
    let opening = vec![Lead::OneOf(choices.iter().map(|c| c.to_string()).collect())];
    let g = run(&base, &prompt, &with(SamplingParams::greedy(6), opening));
    let picked = base.format.encode(choices[best]).unwrap();
    assert_eq!(g.completion_ids[..picked.len()], picked[..]);
    assert!(g.text.starts_with(choices[best]));
}

#[test]
fn sampled_picks_are_always_one_whole_choice_and_vary_with_the_seed() {
    let (_dir, base, prompt) = tiny();
    let choices = ["get_weather", "get_time", "lookup_city"];
    let encoded: Vec<Vec<u32>> = choices
        .iter()
        .map(|c| base.format.encode(c).unwrap())
        .collect();
    let mut picked = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let params = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            seed: Some(seed),
            max_new_tokens: Some(40),
            stop: vec![],
            opening: vec![
                Lead::Text("call ".into()),
                Lead::OneOf(choices.iter().map(|c| c.to_string()).collect()),
            ],
            guided_calls: None,
        };
        let g = run(&base, &prompt, &params);
        let rest = &g.completion_ids[base.format.encode("call ").unwrap().len()..];
        let which: Vec<usize> = (0..3).filter(|&i| rest.starts_with(&encoded[i])).collect();
        assert_eq!(which.len(), 1, "seed {seed}: {:?}", g.text);
        picked.insert(which[0]);
    }
    assert!(
        picked.len() > 1,
        "the pick is sampled, not fixed: {picked:?}"
    );
}

#[test]
fn markup_tokens_have_no_text_to_write_in_json() {
    let (_dir, base, _) = tiny();
    let vocab = base.format.token_texts();
    let texts = vocab.texts();
    let id = |t: &str| base.format.tokenizer.token_to_id(t).unwrap() as usize;
    for markup in ["<tool_call>", "</tool_call>", "<|im_end|>", "<|endoftext|>"] {
        assert!(texts[id(markup)].is_empty(), "{markup}");
    }
    let brace = base.format.encode("{").unwrap();
    assert_eq!(texts[brace[0] as usize], b"{");
    assert!(vocab
        .json_tokens(JsonPrefix::new(), None)
        .iter()
        .all(|&t| texts[t as usize].starts_with(b"{")));
}

/// A weak model writes whatever JSON it likes, but JSON it is: each completion that ends
/// its object within the budget holds one whole object, and the frame after it.
#[test]
fn a_json_object_lead_is_always_one_json_object() {
    let (_dir, base, prompt) = tiny();
    let mut whole = 0;
    for seed in 0..8 {
        let params = sampled(
            seed,
            160,
            vec![
                Lead::Text("args: ".into()),
                Lead::JsonObject(vec![None]),
                Lead::Text(" end".into()),
            ],
        );
        let g = run(&base, &prompt, &params);
        let body = g.text.strip_prefix("args: ").expect("the frame first");
        let mut read = serde_json::Deserializer::from_str(body).into_iter::<serde_json::Value>();
        match read.next() {
            Some(Ok(v)) => {
                assert!(v.is_object(), "seed {seed}: {body:?}");
                assert!(body[read.byte_offset()..].starts_with(" end"), "{body:?}");
                whole += 1;
            }
            // Only the budget may cut an object short.
            _ => {
                assert_eq!(g.completion_ids.len(), 160, "seed {seed}: {body:?}");
                assert!(JsonPrefix::new().after(body, None).is_some(), "{body:?}");
            }
        }
    }
    assert!(whole > 0, "no object was finished within the budget");
}

/// After `Again` the model either ends its turn or writes the text and every lead once
/// more: each completion is whole rounds (the last one possibly cut by the budget), and
/// across seeds the model both stops after one round and goes on to more.
#[test]
fn again_repeats_the_leads_until_the_model_ends_its_turn() {
    let (_dir, base, prompt) = tiny();
    let names = ["north", "south"];
    let mut rounds_seen = std::collections::BTreeSet::new();
    for seed in 0..24 {
        let params = sampled(
            seed,
            200,
            vec![
                Lead::Text("go ".into()),
                Lead::OneOf(names.iter().map(|n| format!("{n} ")).collect()),
                Lead::JsonObject(vec![None]),
                Lead::Text(" done".into()),
                Lead::Again("\n".into()),
            ],
        );
        let g = run(&base, &prompt, &params);
        let mut rest = g.text.as_str();
        let mut rounds = 0;
        // Only the budget cuts a round short, wherever it ends.
        let cut = || assert_eq!(g.completion_ids.len(), 200, "seed {seed}: {:?}", g.text);
        loop {
            let Some(after) = rest.strip_prefix("go ") else {
                assert!("go ".starts_with(rest), "each round opens with its text");
                cut();
                break;
            };
            let Some(name) = names.iter().find(|n| after.starts_with(&format!("{n} "))) else {
                assert!(
                    names.iter().any(|n| format!("{n} ").starts_with(after)),
                    "{after:?}"
                );
                cut();
                break;
            };
            rest = &after[name.len() + 1..];
            let mut read =
                serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
            if !matches!(read.next(), Some(Ok(v)) if v.is_object()) {
                cut();
                break;
            }
            rest = &rest[read.byte_offset()..];
            let Some(after) = rest.strip_prefix(" done") else {
                assert!(" done".starts_with(rest), "then the round's closing text");
                cut();
                break;
            };
            rest = after;
            rounds += 1;
            if rest.is_empty() {
                if g.finish == FinishReason::Stop {
                    rounds_seen.insert(rounds.min(2));
                }
                break;
            }
            rest = rest
                .strip_prefix('\n')
                .expect("another round after the text");
            // Whether or not the budget lets it finish, the model went on.
            rounds_seen.insert(2);
        }
    }
    assert_eq!(
        rounds_seen.into_iter().collect::<Vec<_>>(),
        [1, 2],
        "turns that end after one round and after more"
    );
}

/// With a key set per choice, the object has the keys of the choice the model picked.
#[test]
fn the_picked_choice_decides_the_objects_keys() {
    let (_dir, base, prompt) = tiny();
    let keys = |k: &str| {
        let schema = format!(r#"{{"properties": {{"{k}": {{}}}}, "required": ["{k}"]}}"#);
        ArgumentSchema::from_schema(&serde_json::from_str(&schema).unwrap())
    };
    let mut finished = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let params = sampled(
            seed,
            160,
            vec![
                Lead::OneOf(vec!["north ".into(), "south ".into()]),
                Lead::JsonObject(vec![keys("x"), keys("y")]),
                Lead::End,
            ],
        );
        let g = run(&base, &prompt, &params);
        let (key, body) = match g.text.strip_prefix("north ") {
            Some(body) => ("x", body),
            None => ("y", g.text.strip_prefix("south ").expect("a pick")),
        };
        if g.finish == FinishReason::Stop {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let written: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(written, [key], "seed {seed}: {body:?}");
            finished.insert(key);
        } else {
            assert_eq!(g.completion_ids.len(), 160, "only the budget cuts it short");
        }
    }
    assert_eq!(finished.len(), 2, "both picks finish: {finished:?}");
}

/// A JSON number written without fraction or exponent: serde_json parses it as an integer,
/// or as an f64 when it is too large for one or is `-0` (which `-0.0` cannot be told from).
fn is_integer(v: &serde_json::Value) -> bool {
    let huge_or_minus_zero =
        |f: f64| f.fract() == 0.0 && (f.abs() >= 9e18 || (f == 0.0 && f.is_sign_negative()));
    v.is_i64() || v.is_u64() || v.as_f64().is_some_and(huge_or_minus_zero)
}

/// The top-level values keep to their schema: every finished object has one of the listed
/// values for `unit` and an integer for `days`; one the budget cuts is a prefix of such.
#[test]
fn sampled_arguments_keep_to_their_types_and_listed_values() {
    let (_dir, base, prompt) = tiny();
    let units = ["c", "celsius", "fahrenheit"];
    let schema = ArgumentSchema::from_schema(&serde_json::json!({
        "type": "object", "required": ["unit", "days"], "properties": {
            "unit": {"type": "string", "enum": units},
            "days": {"type": "integer"},
            "note": {}}}));
    assert!(schema.is_some());
    let mut finished = 0;
    for seed in 0..12 {
        let params = sampled(
            seed,
            160,
            vec![
                Lead::Text("args: ".into()),
                Lead::JsonObject(vec![schema.clone()]),
                Lead::End,
            ],
        );
        let g = run(&base, &prompt, &params);
        let body = g.text.strip_prefix("args: ").expect("the frame first");
        if g.finish == FinishReason::Stop {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let unit = v["unit"].as_str().unwrap_or_default();
            assert!(units.contains(&unit), "seed {seed}: {body:?}");
            assert!(is_integer(&v["days"]), "seed {seed}: {body:?}");
            finished += 1;
        } else {
            assert_eq!(g.completion_ids.len(), 160, "only the budget cuts it short");
            let cut = JsonPrefix::new().after(body, schema.as_ref());
            assert!(cut.is_some(), "seed {seed}: {body:?}");
        }
    }
    assert!(finished > 0, "no object was finished within the budget");
}

#[test]
fn the_budget_cuts_the_opening_an_end_ends_it_and_choices_must_not_begin_one_another() {
    let (_dir, base, prompt) = tiny();
    let forced = base.format.encode("It is sunny in Oslo").unwrap();
    assert!(forced.len() > 2);
    let params = with(
        SamplingParams::greedy(2),
        vec![Lead::Text("It is sunny in Oslo".into())],
    );
    let g = run(&base, &prompt, &params);
    assert_eq!(g.completion_ids, forced[..2]);
    assert_eq!(g.finish, FinishReason::Length);
    // An opening that ends the completion ends it, unless the budget ends it first.
    let text = Lead::Text("It is sunny in Oslo".into());
    let ended = with(SamplingParams::greedy(40), vec![text.clone(), Lead::End]);
    let g = run(&base, &prompt, &ended);
    assert_eq!(
        (g.completion_ids, g.finish),
        (forced.clone(), FinishReason::Stop)
    );
    let cut = with(SamplingParams::greedy(2), vec![text, Lead::End]);
    let g = run(&base, &prompt, &cut);
    assert_eq!(
        (&g.completion_ids[..], g.finish),
        (&forced[..2], FinishReason::Length)
    );

    let same = encode(&base.format, &[Lead::OneOf(vec!["a".into(), "a".into()])]).unwrap();
    assert!(matches!(&same[..], [Part::Choose(c)] if c.len() == 1));
    let a = base.format.encode("a").unwrap();
    assert!(base.format.encode("a a").unwrap().starts_with(&a));
    let e = encode(&base.format, &[Lead::OneOf(vec!["a a".into(), "a".into()])]);
    assert!(e.is_err(), "\"a\" begins \"a a\"");
}

/// A call the model opens in a free turn is guided: once the model writes the opener itself
/// (here the token the tiny model writes first greedily after a forced `Calls:`, standing in for
/// `<tool_call>`; the opening keeps the text before it from being blank, which could still
/// become a thinking block), the body follows: the rest of the frame, an offered name, arguments its schema allows, the
/// frame's end; then the model writes freely again. Greedy, the completion is one such call
/// after another; sampled, every body in it is whole (or cut by the budget).
#[test]
fn a_call_the_model_opens_itself_is_written_under_the_mask() {
    let (_dir, base, prompt) = tiny();
    let format = &base.format;
    let opening = vec![Lead::Text("Calls:".into())];
    let forced = format.encode("Calls:").unwrap().len();
    let free = run(
        &base,
        &prompt,
        &with(SamplingParams::greedy(300), opening.clone()),
    );
    let first = &free.completion_ids[forced..forced + 1];
    let opener = format.decode(first).unwrap();
    assert_eq!(format.encode(&opener).unwrap(), first);
    // Each function's one key takes listed values only, so that every call can finish within
    // the budget (a free string the tiny model could write for ever).
    let listed = |key: &str, values: [&str; 2]| {
        ArgumentSchema::from_schema(&serde_json::json!({"type": "object", "required": [key],
            "properties": {key: {"enum": values}}}))
    };
    let schemas = vec![listed("unit", ["c", "f"]), listed("zone", ["utc", "local"])];
    const FRAME: &str = " {\"name\": \"";
    let body = vec![
        Lead::Text(FRAME.into()),
        Lead::OneOf(vec!["get_weather\"".into(), "get_time\"".into()]),
        Lead::Text(", \"arguments\": ".into()),
        Lead::JsonObject(schemas.clone()),
        Lead::Text("} END".into()),
    ];
    let guided = |mut p: SamplingParams| {
        p.opening = opening.clone();
        p.guided_calls = Some(GuidedCalls {
            opener: opener.clone(),
            body: body.clone(),
        });
        run(&base, &prompt, &p)
    };
    // Each body in `g`: the frame after the opener, a name, an object its schema allows, the end.
    let bodies = |g: &Generation| -> usize {
        let mut whole = 0;
        for (at, _) in g.text.match_indices(FRAME) {
            assert!(g.text[..at].ends_with(&opener), "{:?}", g.text);
            let call = &g.text[at + FRAME.len()..];
            let name = ["get_weather", "get_time"]
                .into_iter()
                .find(|n| call.starts_with(&format!("{n}\"")));
            let args = name.and_then(|n| call.strip_prefix(&format!("{n}\", \"arguments\": ")));
            let Some(args) = args else {
                assert_eq!(g.finish, FinishReason::Length, "{:?}", g.text);
                continue;
            };
            let (s, key) = match name {
                Some("get_weather") => (schemas[0].as_ref(), "unit"),
                _ => (schemas[1].as_ref(), "zone"),
            };
            let (mut json, mut end) = (JsonPrefix::new(), 0);
            for b in args.bytes() {
                if json.is_done() {
                    break;
                }
                json = json
                    .after_byte(b, s)
                    .expect("the arguments keep to the mask");
                end += 1;
            }
            if !json.is_done() {
                assert_eq!(g.finish, FinishReason::Length, "{:?}", g.text);
                continue;
            }
            let object: serde_json::Value = serde_json::from_str(&args[..end]).unwrap();
            let value = object[key].as_str().unwrap_or_default();
            assert!(["c", "f", "utc", "local"].contains(&value), "{object}");
            assert!(args[end..].starts_with("} END"), "{:?}", g.text);
            whole += 1;
        }
        whole
    };
    let g = guided(SamplingParams::greedy(300));
    assert!(
        g.text.starts_with(&format!("Calls:{opener}{FRAME}")),
        "{:?}",
        g.text
    );
    assert_ne!(g.text, free.text);
    let greedy_calls = bodies(&g);
    let sampled_calls: usize = (0..6)
        .map(|seed| bodies(&guided(sampled(seed, 160, vec![]))))
        .sum();
    assert!(
        greedy_calls >= 1 && sampled_calls >= 1,
        "whole calls: greedy {greedy_calls}, sampled {sampled_calls}"
    );
}

/// A `<tool_call>` inside the leading thinking block is talk about a call, which is not guided.
#[test]
fn only_a_leading_unclosed_thinking_block_is_reasoning() {
    use crate::train::tool_calls::after_reasoning;
    let in_reasoning = |t| after_reasoning(t).is_none();
    assert!(in_reasoning("<think>\nI could use <tool_call>"));
    assert!(in_reasoning("\n<think>"));
    assert!(!in_reasoning("<think>\n</think>\n\n<tool_call>"));
    assert!(!in_reasoning("Sure. <think> <tool_call>"));
    assert!(!in_reasoning("<tool_call>"));
}

/// Stop strings are looked for only in what the model writes: one that would begin in the forced
/// opening and end in the model's first token does not cut the completion there.
#[test]
fn a_stop_string_may_not_begin_in_forced_text() {
    let (_dir, base, prompt) = tiny();
    let opening = vec![Lead::Text("It is".into())];
    let free = run(
        &base,
        &prompt,
        &with(SamplingParams::greedy(12), opening.clone()),
    );
    let first = free.text["It is".len()..]
        .chars()
        .next()
        .expect("the model writes on");
    let mut params = with(SamplingParams::greedy(12), opening);
    params.stop = vec![format!("It is{first}")];
    let g = run(&base, &prompt, &params);
    assert_eq!(g.text, free.text);
}
