//! `POST /v1/chat/completions` in OpenAI's shape: the request is validated here, the prompt is
//! rendered with the model's own chat template (as in training), generation runs on the worker
//! thread that owns the device (between a training job's micro-batches), and `<tool_call>` blocks come back as OpenAI `tool_calls`, whole or streamed as
//! `chat.completion.chunk` server-sent events ending in `data: [DONE]`.

mod response_format;
mod tool_choice;

use super::error::{AppError, AppJson};
use super::models::{resolve, Models};
use super::AppState;
use crate::train::generate::{ContextExceeded, FinishReason, Generation, SamplingParams};
use crate::train::tool_calls::{after_reasoning, parse_assistant, parse_text, AssistantTurn};
use crate::worker::DeviceLoan;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

pub fn routes(models: Models) -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(create))
        .layer(Extension(models))
}

/// The request fields sftd reads; others the SDKs send (`user`, `metadata`, …) are ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// Whether a turn may hold several calls (OpenAI's default: true). `false`: at most one.
    parallel_tool_calls: Option<bool>,
    /// `text`, `json_object` or `json_schema`: the answer as one JSON object.
    #[serde(default)]
    response_format: Option<Value>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    logprobs: Option<bool>,
    /// sftd: a PEFT adapter directory under `SFTD_MODEL_DIRS`, applied to the base `model`.
    adapter: Option<String>,
    /// sftd / Qwen3: passed to the chat template (`false` adds an empty thinking block).
    enable_thinking: Option<bool>,
    /// vLLM's spelling of template arguments; `enable_thinking` is read from it too.
    chat_template_kwargs: Option<Value>,
    /// sftd: end the prompt with the assistant header (default true).
    add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What the request asks of the engine, after validation.
struct Plan {
    messages: Vec<Value>,
    /// Tools offered to the model (none with `tool_choice: "none"`); a forced call's opening is
    /// in `params`.
    tools: Option<Vec<Value>>,
    params: SamplingParams,
    add_generation_prompt: bool,
    enable_thinking: Option<bool>,
    /// `parallel_tool_calls: false` in a turn the model writes freely: generation ends once its
    /// first call is closed.
    first_call_ends: bool,
}

fn invalid(param: &str, message: impl Into<String>) -> AppError {
    AppError::bad_request(message).param(param)
}

fn plan(r: &ChatRequest) -> Result<Plan, AppError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(invalid("n", "only n = 1 is supported"));
    }
    if r.logprobs == Some(true) {
        return Err(invalid("logprobs", "logprobs are not supported"));
    }
    let temperature = r.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = r.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("top_p", "top_p must be in (0, 1]"));
    }
    let max_new_tokens = match (r.max_completion_tokens, r.max_tokens) {
        (Some(0), _) => return Err(invalid("max_completion_tokens", "must be at least 1")),
        (None, Some(0)) => return Err(invalid("max_tokens", "must be at least 1")),
        (a, b) => a.or(b).map(|n| n as usize),
    };
    let stop = match &r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(_)) => return Err(invalid("stop", "at most 4 stop sequences")),
    };
    if r.stream_options.is_some() && r.stream != Some(true) {
        return Err(invalid(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    let parallel = r.parallel_tool_calls.unwrap_or(true);
    let tool_use = tool_choice::resolve(r.tools.as_deref(), r.tool_choice.as_ref(), parallel)?;
    let json_answer = response_format::resolve(r.response_format.as_ref())?;
    if !json_answer.is_empty() && !tool_use.opening.is_empty() {
        return Err(invalid(
            "response_format",
            "a JSON response_format and a forced tool call cannot both begin the answer",
        ));
    }
    // A JSON answer is never a call, so nothing the model writes is guided into one.
    let (opening, guided_calls) = if json_answer.is_empty() {
        (tool_use.opening, tool_use.guided)
    } else {
        (json_answer, None)
    };
    // A forced call or object begins the answer, so there is no thinking to do: the template's
    // non-thinking form (Qwen3: an empty thinking block) unless the client asks otherwise.
    let forced = !opening.is_empty();
    // A forced call already stops after one (its opening ends the completion).
    let first_call_ends = !parallel && !forced && tool_use.tools.is_some();
    let enable_thinking = r
        .enable_thinking
        .or_else(|| {
            r.chat_template_kwargs
                .as_ref()
                .and_then(|k| k["enable_thinking"].as_bool())
        })
        .or(forced.then_some(false));
    Ok(Plan {
        messages: template_messages(&r.messages)?,
        tools: tool_use.tools,
        params: SamplingParams {
            temperature,
            top_p,
            seed: r.seed.map(|s| s as u64),
            max_new_tokens,
            stop,
            opening,
            guided_calls,
        },
        add_generation_prompt: r.add_generation_prompt.unwrap_or(true),
        enable_thinking,
        first_call_ends,
    })
}

/// OpenAI messages in the form the chat template reads: `developer` is `system`, content parts
/// are joined into one string, a null content is empty.
fn template_messages(messages: &[Value]) -> Result<Vec<Value>, AppError> {
    if messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |what: &str| invalid(&format!("messages[{i}]"), what.to_string());
            let mut m = m
                .as_object()
                .cloned()
                .ok_or_else(|| bad("must be an object"))?;
            let role = match m.get("role").and_then(Value::as_str) {
                Some("developer") => "system".to_string(),
                Some(r @ ("system" | "user" | "assistant" | "tool")) => r.to_string(),
                _ => {
                    return Err(bad(
                        "role must be system, developer, user, assistant or tool",
                    ))
                }
            };
            m.insert("role".into(), role.into());
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(bad("only text content parts are supported")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(_) => return Err(bad("content must be a string or a list of parts")),
            };
            m.insert("content".into(), content.into());
            Ok(Value::Object(m))
        })
        .collect()
}

async fn create(
    State(s): State<AppState>,
    Extension(models): Extension<Models>,
    AppJson(req): AppJson<ChatRequest>,
) -> Result<Response, AppError> {
    let plan = plan(&req)?;
    let resolved = resolve(&s, &models, &req.model, req.adapter.as_deref()).await?;
    let meta = Meta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: crate::store::now(),
        model: req.model.clone(),
        tools: plan.tools.is_some(),
        one_call: req.parallel_tool_calls == Some(false),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let (done, job) = oneshot::channel();
    let queued = s.worker.on_device(Box::new(move |loan: &DeviceLoan<'_>| {
        let _ = done.send(run(loan, resolved, plan, tx));
    }));
    if !queued {
        return Err(AppError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the worker that owns the device is not running; see the server log",
        ));
    }
    if req.stream == Some(true) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return stream(meta, job, rx, include_usage).await;
    }
    let generation = job.await.map_err(not_run)??;
    let turn = parse(&meta, &generation.text);
    Ok(Json(completion(&meta, &turn, &generation)).into_response())
}

/// What the blocking side sends while it runs.
enum Piece {
    /// The prompt was accepted; generation has begun.
    Started,
    Text(String),
}

/// A task dropped before it ran (the worker stopped, or the task panicked).
fn not_run(_: oneshot::error::RecvError) -> AppError {
    AppError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "the generation did not run: the worker stopped or failed; see the server log",
    )
}

/// Generates on the worker thread with the device lent to it: the running job's own model
/// when the request uses its base, else a loaded serving copy. Blocking.
fn run(
    loan: &DeviceLoan<'_>,
    resolved: super::models::Resolved,
    plan: Plan,
    tx: mpsc::UnboundedSender<Piece>,
) -> Result<Generation, AppError> {
    let base = loan
        .model(&resolved.base_dir)
        .map_err(|e| AppError::internal(format!("{e:#}")))?;
    let adapter = match &resolved.adapter_dir {
        Some(dir) => Some(base.adapter(dir).map_err(|e| {
            AppError::bad_request(format!("the adapter cannot be used with this model: {e:#}"))
                .code("invalid_adapter")
        })?),
        None => None,
    };
    let prompt = base
        .format
        .template
        .render_prompt(
            &plan.messages,
            plan.tools.as_deref(),
            plan.add_generation_prompt,
            plan.enable_thinking,
        )
        .map_err(|e| invalid("messages", format!("{e:#}")))?;
    let ids = base.format.encode(&prompt).map_err(AppError::internal)?;
    let refused = |e: anyhow::Error| match e.downcast::<ContextExceeded>() {
        Ok(c) => invalid("messages", c.0).code("context_length_exceeded"),
        Err(e) => AppError::internal(format!("{e:#}")),
    };
    // Checked before the stream starts, so a prompt that does not fit is an ordinary 400.
    base.format
        .budget(ids.len(), plan.params.max_new_tokens)
        .map_err(refused)?;
    let _ = tx.send(Piece::Started);
    let mut first_call = FirstCall::default();
    base.generate(adapter.as_deref(), &ids, &plan.params, |t| {
        let wanted = tx.send(Piece::Text(t.to_string())).is_ok();
        wanted && !(plan.first_call_ends && first_call.closed_by(t))
    })
    .map_err(refused)
}

struct Meta {
    id: String,
    created: i64,
    model: String,
    tools: bool,
    /// `parallel_tool_calls: false`: a turn holds at most its first call.
    one_call: bool,
}

/// Follows a completion piece by piece for the end of its first tool call (after any reasoning
/// block, where a `</tool_call>` is only talk about one).
#[derive(Default)]
struct FirstCall {
    text: String,
}

impl FirstCall {
    /// Adds `piece`; whether the text so far holds a closed call.
    fn closed_by(&mut self, piece: &str) -> bool {
        self.text.push_str(piece);
        after_reasoning(&self.text).is_some_and(|answer| answer.contains("</tool_call>"))
    }
}

fn parse(meta: &Meta, text: &str) -> AssistantTurn {
    if !meta.tools {
        // No tools were offered: calls the model writes anyway stay text.
        return parse_text(text);
    }
    let mut turn = parse_assistant(text);
    if meta.one_call {
        // A forced call already stops after one; a free turn keeps its first.
        turn.tool_calls.truncate(1);
    }
    turn
}

fn finish_reason(turn: &AssistantTurn, g: &Generation) -> &'static str {
    match (turn.tool_calls.is_empty(), g.finish) {
        (false, _) => "tool_calls",
        (true, FinishReason::Stop) => "stop",
        (true, FinishReason::Length) => "length",
    }
}

fn tool_calls_json(turn: &AssistantTurn, with_index: bool) -> Vec<Value> {
    turn.tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "id": format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if with_index {
                v["index"] = i.into();
            }
            v
        })
        .collect()
}

fn usage(g: &Generation) -> Value {
    let completion = g.completion_ids.len();
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": g.prompt_tokens + completion,
    })
}

fn completion(meta: &Meta, turn: &AssistantTurn, g: &Generation) -> Value {
    let mut message = json!({"role": "assistant", "content": turn.content, "refusal": null});
    if !turn.tool_calls.is_empty() {
        message["tool_calls"] = tool_calls_json(turn, false).into();
    }
    if let Some(r) = &turn.reasoning {
        message["reasoning_content"] = r.clone().into();
    }
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(turn, g),
        }],
        "usage": usage(g),
    })
}

fn chunk(meta: &Meta, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// The content a partial completion can already show: after a closed thinking block, before
/// any `<tool_call>` (when tools were offered), without trailing whitespace or a tail that may
/// still become a tag. Only ever grows as the text grows.
fn visible_content(text: &str, tools: bool) -> &str {
    let Some(rest) = after_reasoning(text) else {
        return "";
    };
    let rest = rest.trim_start();
    let mut end = rest.len();
    if tools {
        if let Some(i) = rest.find("<tool_call>") {
            end = i;
        } else if let Some(i) = rest.rfind('<') {
            if "<tool_call>".starts_with(&rest[i..]) {
                end = i;
            }
        }
    }
    rest[..end].trim_end()
}

/// Streams chunks as the text arrives: role first, content deltas, then the tool calls (once
/// the whole turn is known), the finish reason, usage when asked, and `[DONE]`. Errors before
/// the first token are ordinary error responses.
async fn stream(
    meta: Meta,
    job: oneshot::Receiver<Result<Generation, AppError>>,
    mut rx: mpsc::UnboundedReceiver<Piece>,
    include_usage: bool,
) -> Result<Response, AppError> {
    if rx.recv().await.is_none() {
        // The sender is gone before generation began: the job's error is the answer.
        job.await.map_err(not_run)??;
        return Err(AppError::internal("generation ended before it started"));
    }
    let (out, body) = mpsc::channel::<Result<String, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let role = chunk(&meta, json!({"role": "assistant", "content": ""}), None);
        let _ = out.send(Ok(sse(&role))).await;
        let mut text = String::new();
        let mut sent = String::new();
        while let Some(piece) = rx.recv().await {
            let Piece::Text(t) = piece else { continue };
            text.push_str(&t);
            let shown = visible_content(&text, meta.tools);
            if shown.len() > sent.len() && shown.starts_with(sent.as_str()) {
                let delta = chunk(&meta, json!({"content": &shown[sent.len()..]}), None);
                sent = shown.to_string();
                if out.send(Ok(sse(&delta))).await.is_err() {
                    return; // The client left; the generator stops at its next token.
                }
            }
        }
        let g = match job.await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                // Already logged by AppError::internal; the stream ends in the error's shape.
                let status = e.into_response().status();
                let message = format!("generation failed (HTTP {status}); see the server log");
                let _ = out
                    .send(Ok(sse(&json!({"error": {"message": message,
                        "type": "server_error", "param": null, "code": null}}))))
                    .await;
                return;
            }
            Err(_) => {
                tracing::error!("the generation task ended without a result");
                return;
            }
        };
        let turn = parse(&meta, &g.text);
        let mut tail = Vec::new();
        let content = turn.content.clone().unwrap_or_default();
        if let Some(rest) = content
            .strip_prefix(sent.as_str())
            .filter(|r| !r.is_empty())
        {
            tail.push(chunk(&meta, json!({"content": rest}), None));
        }
        if !turn.tool_calls.is_empty() {
            let calls = tool_calls_json(&turn, true);
            tail.push(chunk(&meta, json!({"tool_calls": calls}), None));
        }
        tail.push(chunk(&meta, json!({}), Some(finish_reason(&turn, &g))));
        if include_usage {
            let mut u = chunk(&meta, json!({}), None);
            u["choices"] = json!([]);
            u["usage"] = usage(&g);
            tail.push(u);
        }
        for c in tail {
            let _ = out.send(Ok(sse(&c))).await;
        }
        let _ = out.send(Ok("data: [DONE]\n\n".to_string())).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests;
