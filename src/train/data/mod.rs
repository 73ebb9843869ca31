//! Training data: JSONL rows in the conversational, prompt/completion and text formats, validated
//! line by line, rendered with the model's chat template and tokenized with label masks.

pub mod encode;
pub mod template;
mod validate;

pub use validate::{InvalidDataset, JsonlValidator, MAX_KEPT_ERRORS};

use serde::Serialize;
use serde_json::{Map, Value};

/// One usable dataset row.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// OpenAI/TRL conversational: `messages` and optional `tools` (JSON schemas).
    Chat {
        messages: Vec<Value>,
        tools: Option<Vec<Value>>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text(String),
}

/// A rejected line (1-based), with an OpenAI-style code.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowError {
    pub line: usize,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSummary {
    pub rows: usize,
}

/// Longest accepted line, in bytes.
pub const MAX_LINE_BYTES: usize = 8 << 20;

const MESSAGE_KEYS: [&str; 7] = [
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "reasoning_content",
    "thinking",
];

fn err(line: usize, code: &str, message: impl Into<String>) -> RowError {
    RowError {
        line,
        code: code.to_string(),
        message: message.into(),
    }
}

/// Parses a whole JSONL file. Blank lines are skipped; every bad line is reported.
pub fn parse_jsonl(bytes: &[u8]) -> Result<Vec<(usize, Row)>, Vec<RowError>> {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match parse_line(line, raw) {
            Ok(row) => rows.push((line, row)),
            Err(e) => errors.push(e),
        }
    }
    if rows.is_empty() && errors.is_empty() {
        errors.push(err(1, "empty_file", "the file contains no rows"));
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors)
    }
}

fn line_too_long(line: usize, len: usize) -> RowError {
    err(
        line,
        "line_too_long",
        format!("line is {len} bytes; the limit is {MAX_LINE_BYTES}"),
    )
}

fn parse_line(line: usize, raw: &[u8]) -> Result<Row, RowError> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(line_too_long(line, raw.len()));
    }
    let text = std::str::from_utf8(raw).map_err(|e| {
        err(
            line,
            "invalid_utf8",
            format!("line is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| err(line, "invalid_json", format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(err(line, "data_type", "each line must be a JSON object"));
    };
    if obj.contains_key("messages") {
        parse_chat(line, obj)
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        let get = |k: &str| match obj.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(err(
                line,
                "missing_content",
                format!("\"{k}\" must be a string"),
            )),
        };
        let (prompt, completion) = (get("prompt")?, get("completion")?);
        if completion.is_empty() {
            return Err(err(line, "missing_content", "\"completion\" is empty"));
        }
        Ok(Row::PromptCompletion { prompt, completion })
    } else if let Some(t) = obj.get("text") {
        match t {
            Value::String(s) if !s.is_empty() => Ok(Row::Text(s.clone())),
            _ => Err(err(
                line,
                "missing_content",
                "\"text\" must be a non-empty string",
            )),
        }
    } else {
        Err(err(
            line,
            "missing_messages_list",
            "expected \"messages\" (chat), \"prompt\"/\"completion\", or \"text\"",
        ))
    }
}

fn parse_chat(line: usize, mut obj: Map<String, Value>) -> Result<Row, RowError> {
    let Some(Value::Array(messages)) = obj.remove("messages") else {
        return Err(err(
            line,
            "missing_messages_list",
            "\"messages\" must be a list",
        ));
    };
    if messages.is_empty() {
        return Err(err(line, "missing_messages_list", "\"messages\" is empty"));
    }
    let tools = match obj.remove("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(t),
        // TRL accepts tools serialised as a JSON string.
        Some(Value::String(s)) => match serde_json::from_str(&s) {
            Ok(Value::Array(t)) => Some(t),
            _ => {
                return Err(err(
                    line,
                    "invalid_tools",
                    "\"tools\" string is not a JSON list",
                ))
            }
        },
        Some(_) => return Err(err(line, "invalid_tools", "\"tools\" must be a list")),
    };
    if let Some(tools) = &tools {
        if tools.iter().any(|t| !t.is_object()) {
            return Err(err(
                line,
                "invalid_tools",
                "every tool must be a JSON object",
            ));
        }
    }
    let mut has_assistant = false;
    for (j, m) in messages.iter().enumerate() {
        let at = |msg: String| format!("messages[{j}]: {msg}");
        let Value::Object(m) = m else {
            return Err(err(line, "data_type", at("must be an object".into())));
        };
        if let Some(k) = m.keys().find(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
            return Err(err(
                line,
                "message_unrecognized_key",
                at(format!("unrecognized key {k:?}")),
            ));
        }
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(err(
                    line,
                    "message_missing_key",
                    at("missing \"role\"".into()),
                ))
            }
        };
        if !["system", "user", "assistant", "tool"].contains(&role) {
            return Err(err(
                line,
                "unrecognized_role",
                at(format!("unrecognized role {role:?}")),
            ));
        }
        let tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(c)) if role == "assistant" => c.as_slice(),
            Some(_) => {
                return Err(err(
                    line,
                    "invalid_tool_calls",
                    at("\"tool_calls\" must be a list on an assistant message".into()),
                ))
            }
        };
        match m.get("content") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) if role == "assistant" && !tool_calls.is_empty() => {}
            Some(Value::Array(_)) | Some(Value::Object(_)) => {
                return Err(err(
                    line,
                    "invalid_content_type",
                    at("\"content\" must be a string".into()),
                ))
            }
            _ => {
                return Err(err(
                    line,
                    "missing_content",
                    at("missing \"content\"".into()),
                ))
            }
        }
        for (c, call) in tool_calls.iter().enumerate() {
            let f = call.get("function").unwrap_or(call);
            if !matches!(f.get("name"), Some(Value::String(_))) {
                return Err(err(
                    line,
                    "invalid_tool_calls",
                    at(format!("tool_calls[{c}] has no function name")),
                ));
            }
            match f.get("arguments") {
                Some(Value::Object(_)) => {}
                Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => {}
                _ => {
                    return Err(err(
                        line,
                        "tool_call_arguments_not_json",
                        at(format!(
                        "tool_calls[{c}].arguments must be a JSON object or a string holding JSON"
                    )),
                    ))
                }
            }
        }
        has_assistant |= role == "assistant";
    }
    if !has_assistant {
        return Err(err(
            line,
            "example_missing_assistant_message",
            "the conversation has no assistant message to learn from",
        ));
    }
    Ok(Row::Chat { messages, tools })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(s: &str) -> Vec<(usize, String)> {
        parse_jsonl(s.as_bytes())
            .unwrap_err()
            .into_iter()
            .map(|e| (e.line, e.code))
            .collect()
    }

    #[test]
    fn accepts_three_formats_and_skips_blank_lines() {
        let s = r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}

{"prompt":"a","completion":"b"}
{"text":"plain"}
"#;
        let rows = parse_jsonl(s.as_bytes()).unwrap();
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3, 4]);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_code() {
        let s = concat!(
            "{not json\n",
            "[1,2]\n",
            "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}\n",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n",
            "{\"messages\":[{\"role\":\"user\"},{\"role\":\"assistant\",\"content\":\"x\"}]}\n",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{oops\"}}]}]}\n",
            "{\"foo\":1}\n",
        );
        assert_eq!(
            codes(s),
            vec![
                (1, "invalid_json".into()),
                (2, "data_type".into()),
                (3, "unrecognized_role".into()),
                (4, "example_missing_assistant_message".into()),
                (5, "missing_content".into()),
                (6, "tool_call_arguments_not_json".into()),
                (7, "missing_messages_list".into()),
            ]
        );
    }

    #[test]
    fn non_utf8_and_empty_files_are_rejected() {
        assert_eq!(codes("\n\n"), vec![(1, "empty_file".into())]);
        let bad = parse_jsonl(b"{\"text\":\"\xff\"}\n").unwrap_err();
        assert_eq!(bad[0].code, "invalid_utf8");
    }
}
