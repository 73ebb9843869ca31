//! `/v1/chat/completions` and `/v1/models` over a real socket: plain and streamed completions
//! on the demo model, forced tool calls, request errors in OpenAI's shape, and a fine-tuned job's
//! model ids.

mod common;

use common::{example, tiny_job, Env, Server};
use serde_json::{json, Value};
use std::time::Duration;

fn hello(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0,
        "max_completion_tokens": 6,
    })
}

async fn chat(s: &Server, body: &Value) -> (u16, Value) {
    s.post_json("/v1/chat/completions", body).await
}

#[tokio::test]
async fn a_plain_completion_on_the_demo_model() {
    let env = Env::new();
    let s = env.start();
    let (st, v) = chat(&s, &hello("sftd-demo")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "sftd-demo");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&completion), "{usage}");
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(["stop", "length"].contains(&finish), "{finish}");
    if completion == 6 {
        assert_eq!(finish, "length");
    }
    // Greedy decoding is deterministic: the same request, the same answer.
    let (_, again) = chat(&s, &hello("sftd-demo")).await;
    assert_eq!(again["choices"][0]["message"], choice["message"]);
}

#[tokio::test]
async fn a_streamed_completion_ends_with_done_and_usage() {
    let env = Env::new();
    let s = env.start();
    let (_, whole) = chat(&s, &hello("sftd-demo")).await;
    let mut body = hello("sftd-demo");
    body["stream"] = true.into();
    body["stream_options"] = json!({"include_usage": true});
    let chunks = s.chat_stream(&body).await;
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let want = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    assert_eq!(text, want, "the streamed text is the whole completion's");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
}

/// The call a forced completion opens with: its tool call, or, when the budget ran out inside
/// the arguments, the function name in the text, which must open the call.
fn forced_name(v: &Value) -> String {
    let msg = &v["choices"][0]["message"];
    if let Some(calls) = msg["tool_calls"].as_array() {
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        return calls[0]["function"]["name"].as_str().unwrap().to_string();
    }
    let text = msg["content"].as_str().unwrap();
    let rest = text
        .strip_prefix("<tool_call>\n{\"name\": \"")
        .unwrap_or_else(|| panic!("not a call's opening: {text:?}"));
    let (name, after) = rest.split_once('"').unwrap();
    assert!(after.starts_with(", \"arguments\": "), "{text:?}");
    name.to_string()
}

#[tokio::test]
async fn tool_choice_required_or_named_forces_a_call() {
    let env = Env::new();
    let s = env.start();
    let mut body = hello("sftd-demo");
    body["max_completion_tokens"] = 24.into();
    body["tools"] = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
    ]);
    let (st, auto) = chat(&s, &body).await;
    assert_eq!(st, 200, "{auto}");

    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let (st, named) = chat(&s, &body).await;
    assert_eq!(st, 200, "{named}");
    assert_eq!(forced_name(&named), "get_time");
    // The opening's tokens are completion tokens, within the budget.
    let completion = named["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((5..=24).contains(&completion), "{named}");
    // A forced call skips thinking: the prompt is the non-thinking one.
    let mut no_thinking = body.clone();
    no_thinking["tool_choice"] = "auto".into();
    no_thinking["enable_thinking"] = false.into();
    let (_, v) = chat(&s, &no_thinking).await;
    assert_eq!(named["usage"]["prompt_tokens"], v["usage"]["prompt_tokens"]);
    assert!(
        named["usage"]["prompt_tokens"].as_u64() > auto["usage"]["prompt_tokens"].as_u64(),
        "the empty thinking block is in the prompt"
    );

    // "required": the model picks the function; sampled picks are always an offered one.
    body["tool_choice"] = "required".into();
    let (st, v) = chat(&s, &body).await;
    assert_eq!(st, 200, "{v}");
    assert!(["get_weather", "get_time"].contains(&forced_name(&v).as_str()));
    // The arguments are a JSON object with the function's keys, so every call that ends within
    // the budget is a call, with exactly its required key.
    body["temperature"] = 1.0.into();
    body["max_completion_tokens"] = 400.into();
    // With parallel calls (the default) the model may write more than one, each such a call;
    // with `parallel_tool_calls: false`, exactly one.
    let mut finished = 0;
    let mut most = 0;
    for (parallel, seeds) in [(true, 0..24), (false, 0..6)] {
        body["parallel_tool_calls"] = parallel.into();
        for seed in seeds {
            body["seed"] = seed.into();
            let (st, v) = chat(&s, &body).await;
            assert_eq!(st, 200, "{v}");
            assert!(["get_weather", "get_time"].contains(&forced_name(&v).as_str()));
            let Some(calls) = v["choices"][0]["message"]["tool_calls"].as_array() else {
                assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
                continue;
            };
            for call in calls {
                let args = call["function"]["arguments"].as_str().unwrap();
                let args: Value = serde_json::from_str(args).unwrap();
                let keys: Vec<&String> = args.as_object().unwrap().keys().collect();
                let want = match call["function"]["name"].as_str() {
                    Some("get_weather") => "city",
                    _ => "zone",
                };
                assert_eq!(keys, [want], "{v}");
            }
            if !parallel {
                assert_eq!(calls.len(), 1, "{v}");
                let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
                assert!(!text.contains("<tool_call>"), "{v}");
            }
            most = most.max(calls.len());
            finished += 1;
        }
    }
    assert!(
        finished > 0,
        "no forced call was finished within 120 tokens"
    );
    assert!(most > 1, "no turn held parallel calls");
    body["parallel_tool_calls"] = Value::Null;
    body["max_completion_tokens"] = 24.into();

    // Streamed, the same completion arrives: greedy, so the same text.
    let mut streamed = body.clone();
    streamed["temperature"] = 0.into();
    streamed["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    streamed["stream"] = true.into();
    let chunks = s.chat_stream(&streamed).await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    let msg = &named["choices"][0]["message"];
    assert_eq!(text, msg["content"].as_str().unwrap_or(""));
    assert_eq!(
        calls.len(),
        msg["tool_calls"].as_array().map_or(0, Vec::len)
    );

    // Impossible choices are 400s naming the parameter.
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_stock"}});
    let (st, v) = chat(&s, &body).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("tool_choice")),
        "{v}"
    );
    body["tools"] = json!([]);
    body["tool_choice"] = "required".into();
    let (st, v) = chat(&s, &body).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("tool_choice")),
        "{v}"
    );
}

/// A forced call's values keep to the function's schema: whenever the call finishes, `unit` is
/// one of its listed values, `days` an integer from 1 to 14, `note` 1 to 4 characters, and the
/// whole is valid under the schema, nested optional object included (by the `jsonschema`
/// crate).
#[tokio::test]
async fn a_forced_calls_values_keep_to_their_schema() {
    let env = Env::new();
    let s = env.start();
    let units = ["c", "celsius", "fahrenheit"];
    let mut body = hello("sftd-demo");
    body["temperature"] = 1.0.into();
    body["max_completion_tokens"] = 400.into();
    let parameters = json!({"type": "object", "required": ["unit", "days", "note"], "properties": {
        "unit": {"type": "string", "enum": units},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "note": {"type": "string", "minLength": 1, "maxLength": 4},
        "at": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["lat"],
            "properties": {"lat": {"type": "number"}, "tags": {"type": "array",
                "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}}}]}}});
    let validator = jsonschema::validator_for(&parameters).unwrap();
    body["tools"] = json!([{"type": "function", "function": {"name": "forecast",
        "parameters": parameters}}]);
    body["tool_choice"] = json!({"type": "function", "function": {"name": "forecast"}});
    let mut calls = 0;
    for seed in 0..6 {
        body["seed"] = seed.into();
        let (st, v) = chat(&s, &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(forced_name(&v), "forecast");
        let Some(c) = v["choices"][0]["message"]["tool_calls"].as_array() else {
            assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
            continue;
        };
        let args: Value = serde_json::from_str(c[0]["function"]["arguments"].as_str().unwrap())
            .expect("the arguments parse");
        let unit = args["unit"].as_str().unwrap_or_default();
        assert!(units.contains(&unit), "{v}");
        assert!(validator.is_valid(&args), "{v}");
        let note = args["note"].as_str().unwrap().chars().count();
        assert!((1..=4).contains(&note), "{v}");
        let days = args["days"].as_i64().unwrap_or_default();
        assert!((1..=14).contains(&days), "{v}");
        calls += 1;
    }
    assert!(calls > 0, "no forced call was finished within 120 tokens");
}

#[tokio::test]
async fn request_errors_have_openai_shape() {
    let env = Env::new();
    let s = env.start();
    let mut two = hello("sftd-demo");
    two["n"] = 2.into();
    let (st, v) = chat(&s, &two).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("n")), "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    // A hub id the test's (unreachable) hub cannot answer for is retryable, not "not found".
    let (st, v) = chat(&s, &hello("no-such-model")).await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "hub_unavailable");
    // Not a model name at all: the request is malformed (as on job creation).
    let (st, v) = chat(&s, &hello("not a model id")).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_model");
    assert_eq!(v["error"]["param"], "model");
    let (st, v) = chat(&s, &hello("ft:sftd-demo:x:ftjob-doesnotexist")).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // The demo model's context is 4096 positions.
    let long = "weather ".repeat(5000);
    let mut body = hello("sftd-demo");
    body["messages"] = json!([{"role": "user", "content": long}]);
    let (st, v) = chat(&s, &body).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let mut body = hello("sftd-demo");
    body["max_completion_tokens"] = 100_000.into();
    let (st, v) = chat(&s, &body).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );

    let (st, v) = s.get("/v1/models/no-such-model").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
}

#[tokio::test]
async fn a_fine_tuned_job_and_its_checkpoints_are_models() {
    let env = Env::new();
    let s = env.start();
    let file = s.upload(&example("tool_calls.jsonl")).await;
    let job = s.create_job(&tiny_job(&file, 4, 2)).await;
    let id = job["id"].as_str().unwrap();
    let done = s
        .wait_status(id, "succeeded", Duration::from_secs(300))
        .await;
    let name = done["fine_tuned_model"].as_str().unwrap().to_string();

    let (st, list) = s.get("/v1/models").await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let ckpt = format!("{name}:ckpt-step-2");
    for want in ["sftd-demo", name.as_str(), ckpt.as_str()] {
        assert!(ids.contains(&want), "{want} not in {ids:?}");
    }
    let (st, m) = s.get(&format!("/v1/models/{name}")).await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(
        (m["object"].as_str(), m["parent"].as_str()),
        (Some("model"), Some("sftd-demo"))
    );

    let (st, v) = chat(&s, &hello(&name)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], name.as_str());
    let (st, v) = chat(&s, &hello(&ckpt)).await;
    assert_eq!(st, 200, "{v}");
    // With tools offered, the response is either content or well-formed tool calls.
    let mut body = hello(&name);
    body["max_completion_tokens"] = 40.into();
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let (st, v) = chat(&s, &body).await;
    assert_eq!(st, 200, "{v}");
    let msg = &v["choices"][0]["message"];
    if let Some(calls) = msg["tool_calls"].as_array() {
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        for c in calls {
            assert_eq!(c["type"], "function");
            let args = c["function"]["arguments"].as_str().unwrap();
            serde_json::from_str::<Value>(args).unwrap();
        }
    }
    let (st, v) = chat(&s, &hello(&format!("{name}:ckpt-step-99"))).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
}

/// A node that trains nothing (`serve --no-worker`, the cluster's API node) still answers chat,
/// on its own device, with what a full node answers.
#[tokio::test]
async fn an_api_node_answers_chat_on_its_own_device() {
    let env = Env::new();
    let full = env.start();
    let (st, expected) = chat(&full, &hello("sftd-demo")).await;
    assert_eq!(st, 200, "{expected}");
    drop(full);
    let api = env.start_args(&["serve", "--no-worker"]);
    let ask = hello("sftd-demo");
    let (st, v) = tokio::time::timeout(Duration::from_secs(60), chat(&api, &ask))
        .await
        .expect("an API node answers chat instead of queueing it for a worker it has not");
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"], expected["choices"][0]["message"],
        "greedy, the same answer as a full node"
    );
    let mut streamed = hello("sftd-demo");
    streamed["stream"] = true.into();
    let chunks = tokio::time::timeout(Duration::from_secs(60), api.chat_stream(&streamed))
        .await
        .expect("a streamed answer too");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        expected["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
}

/// `response_format` makes the answer one JSON object (`json_object`), with the schema's keys
/// and value types at every depth (`json_schema`, checked by the `jsonschema` crate when
/// nested); the model writes it, sampled or greedy, and whenever the
/// budget lets it finish it parses. Formats sftd cannot follow are 400s naming the parameter.
#[tokio::test]
async fn response_format_makes_the_answer_a_json_object() {
    let env = Env::new();
    let s = env.start();
    let mut body = hello("sftd-demo");
    body["max_completion_tokens"] = 400.into();
    body["temperature"] = 1.0.into();
    let schema = json!({"type": "object", "additionalProperties": false,
        "required": ["city", "days"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}});
    // Nested: an object in the object, an array of listed values, an array of objects by `$ref`.
    let nested = json!({"type": "object", "required": ["trip"], "properties": {
        "trip": {"type": "object", "required": ["from", "days"], "properties": {
            "from": {"type": "string", "maxLength": 6}, "days": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"enum": ["weekday", "weekend"]}},
        "legs": {"type": "array", "items": {"$ref": "#/$defs/leg"}}},
        "$defs": {"leg": {"type": "object", "required": ["km"], "properties": {
            "km": {"type": "number"}, "mode": {"enum": ["car", "foot"]}}}}});
    let validator = jsonschema::validator_for(&nested).unwrap();
    let formats = [
        json!({"type": "json_object"}),
        json!({"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}),
        json!({"type": "json_schema", "json_schema": {"name": "trip", "schema": nested}}),
    ];
    for (keyed, format) in formats.iter().enumerate() {
        body["response_format"] = format.clone();
        let mut finished = 0;
        for seed in 0..6 {
            body["seed"] = seed.into();
            let (st, v) = chat(&s, &body).await;
            assert_eq!(st, 200, "{v}");
            let choice = &v["choices"][0];
            let content = choice["message"]["content"].as_str().unwrap();
            assert!(content.starts_with('{'), "{v}");
            if choice["finish_reason"] == "length" {
                continue;
            }
            assert_eq!(choice["finish_reason"], "stop", "{v}");
            let object: Value = serde_json::from_str(content).unwrap();
            if keyed == 1 {
                let mut keys: Vec<&String> = object.as_object().unwrap().keys().collect();
                keys.sort();
                assert_eq!(keys, ["city", "days"], "{v}");
                // An integer: serde_json reads one beyond i64/u64 as a whole f64.
                let days = &object["days"];
                let whole = days.is_i64()
                    || days.is_u64()
                    || days.as_f64().is_some_and(|d| d.fract() == 0.0);
                assert!(object["city"].is_string() && whole, "{v}");
            }
            if keyed == 2 {
                assert!(validator.is_valid(&object), "{v}");
            }
            finished += 1;
        }
        assert!(
            finished > 0,
            "{format}: no object finished within the budget"
        );
    }
    // Streamed, the object arrives in pieces as it is written: the same seed, the same text.
    body["response_format"] = json!({"type": "json_object"});
    body["max_completion_tokens"] = 48.into();
    // A seed whose object takes more than a few tokens (the tiny model often closes it at once).
    let mut whole = Value::Null;
    for seed in 0..16 {
        body["seed"] = seed.into();
        whole = chat(&s, &body).await.1;
        if whole["usage"]["completion_tokens"].as_u64() > Some(8) {
            break;
        }
    }
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let deltas: Vec<String> = s
        .chat_stream(&streamed)
        .await
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    assert!(deltas.len() > 3, "{deltas:?}");
    assert_eq!(
        deltas.concat(),
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    body["response_format"] = json!({"type": "text"});
    let (st, v) = chat(&s, &body).await;
    assert_eq!(st, 200, "{v}");

    for (format, choice) in [
        (json!({"type": "yaml"}), Value::Null),
        (json!({"type": "json_schema"}), Value::Null),
        (json!({"type": "json_object"}), json!("required")),
    ] {
        body["response_format"] = format.clone();
        body["tools"] = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        body["tool_choice"] = choice;
        let (st, v) = chat(&s, &body).await;
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some("response_format")),
            "{format}: {v}"
        );
    }
}
