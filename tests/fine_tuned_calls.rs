//! The product's story end to end over a real socket: the demo model fine-tuned on a few
//! tool-calling conversations learns to open a call itself (`<tool_call>` after an empty
//! thinking block), and a `tool_choice: "auto"` turn then returns the call whole and valid
//! under its function's schema: once the model writes the opener, the server writes the rest
//! of the call under the schema mask. Left to itself, the tiny model writes malformed JSON and
//! blank runs after the opener, so without that guidance the calls below come back as text.

mod common;

use common::{Env, Server};
use serde_json::{json, Value};
use std::time::Duration;

const CITIES: [&str; 8] = [
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome",
];

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "description": "The weather now.",
        "parameters": {"type": "object", "required": ["city"],
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}}])
}

/// One conversation per city: the user asks, the assistant calls `get_weather`.
fn conversations() -> Vec<u8> {
    let mut jsonl = String::new();
    for (i, city) in CITIES.iter().enumerate() {
        let row = json!({"tools": tools(), "messages": [
            {"role": "user", "content": format!("What is the weather in {city}?")},
            {"role": "assistant", "content": "", "tool_calls": [{"id": format!("call_{i}"),
                "type": "function", "function": {"name": "get_weather",
                    "arguments": {"city": city, "unit": "c"}}}]}]});
        jsonl.push_str(&format!("{row}\n"));
    }
    jsonl.into_bytes()
}

async fn fine_tune(s: &Server) -> String {
    let (st, file) = s.upload_bytes("calls.jsonl", conversations()).await;
    assert_eq!(st, 200, "{file}");
    // 200 steps over the 8 rows at batch 4: the tiny model learns the call's frame, not the
    // cities (its loss stays above 2).
    let job = s
        .create_job(&json!({
            "model": "sftd-demo",
            "training_file": file["id"],
            "seed": 7,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 100, "batch_size": 4, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": false, "learning_rate": 0.005,
                "max_seq_len": 256, "max_steps": 200, "save_steps": 1000,
                "warmup_ratio": 0.0, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}}},
        }))
        .await;
    let done = s
        .wait_status(
            job["id"].as_str().unwrap(),
            "succeeded",
            Duration::from_secs(240),
        )
        .await;
    done["fine_tuned_model"].as_str().unwrap().to_string()
}

fn ask(model: &str, city: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("What is the weather in {city}?")}],
        "tools": tools(),
        "tool_choice": "auto",
        // As in training, where the template writes the empty thinking block before a call.
        "enable_thinking": false,
        "temperature": 0,
        "max_completion_tokens": 60,
    })
}

#[tokio::test]
async fn a_model_fine_tuned_on_calls_opens_them_itself_and_they_come_back_valid() {
    let env = Env::new();
    let s = env.start();
    let model = fine_tune(&s).await;
    let parameters = &tools()[0]["function"]["parameters"];
    let validator = jsonschema::validator_for(parameters).unwrap();
    let mut calls = 0;
    for city in ["Paris", "Berlin", "Nairobi", "Oslo", "Lima", "Cairo"] {
        let (st, v) = s
            .post_json("/v1/chat/completions", &ask(&model, city))
            .await;
        assert_eq!(st, 200, "{v}");
        let choice = &v["choices"][0];
        let message = &choice["message"];
        let Some(list) = message["tool_calls"].as_array() else {
            // A call the model opened is never left as broken text, unless the budget ran out
            // inside it (the tiny model may write a string value for ever).
            let content = message["content"].as_str().unwrap_or_default();
            if content.contains("<tool_call>") {
                assert_eq!(choice["finish_reason"], "length", "{city}: {v}");
            }
            continue;
        };
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        for call in list {
            assert_eq!(call["function"]["name"], "get_weather", "{v}");
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(
                validator.is_valid(&args),
                "{city}: {args} against {parameters}"
            );
            calls += 1;
        }
    }
    assert!(
        calls >= 1,
        "the fine-tuned model made no whole call in 6 turns"
    );

    // Streamed, the same call arrives as a tool-call delta, with no text around it.
    let body = ask(&model, "Paris");
    let (_, whole) = s.post_json("/v1/chat/completions", &body).await;
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let chunks = s.chat_stream(&streamed).await;
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    let want = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(deltas.len(), want.len(), "{chunks:?}");
    for (d, w) in deltas.iter().zip(&want) {
        assert_eq!(d["function"], w["function"], "{chunks:?}");
    }
}
