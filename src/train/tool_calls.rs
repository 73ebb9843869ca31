//! Reading a generated assistant turn the way Qwen3's chat template writes one: an optional
//! `<think>…</think>` block, free text, and `<tool_call>{"name": …, "arguments": …}</tool_call>`
//! blocks. Anything that does not parse as a whole stays text. And the opening that forces a
//! call, written the same way.

use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One function call: arguments as the JSON text OpenAI's `function.arguments` carries.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A parsed assistant turn.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AssistantTurn {
    /// Text outside the calls and the thinking block, trimmed; `None` when empty.
    pub content: Option<String>,
    /// The inside of a leading non-empty `<think>` block.
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

/// How Qwen3's chat template writes a call, around the function's name and its arguments: the
/// frame a forced call is written in.
pub const CALL_BEFORE_NAME: &str = "<tool_call>\n{\"name\": \"";
pub const CALL_AFTER_NAME: &str = "\", \"arguments\": ";
pub const CALL_AFTER_ARGUMENTS: &str = "}\n</tool_call>";

/// Splits `text` into thinking, content and tool calls. When any `<tool_call>` block is
/// unterminated or its body is not `{"name": string, "arguments": object|JSON string}`, no calls
/// are returned and the whole text (after thinking) is content.
pub fn parse_assistant(text: &str) -> AssistantTurn {
    let (reasoning, rest) = split_thinking(text);
    match parse_calls(rest) {
        Some((content, tool_calls)) => AssistantTurn {
            tool_calls,
            ..text_turn(reasoning, &content)
        },
        None => text_turn(reasoning, rest),
    }
}

/// A turn read without calls, as when none were offered: the thinking block, and everything
/// after it as content, `<tool_call>` blocks included.
pub fn parse_text(text: &str) -> AssistantTurn {
    let (reasoning, rest) = split_thinking(text);
    text_turn(reasoning, rest)
}

/// A turn of `reasoning` and then `content` (trimmed; empty is none), without calls.
fn text_turn(reasoning: Option<String>, content: &str) -> AssistantTurn {
    let content = content.trim();
    AssistantTurn {
        content: (!content.is_empty()).then(|| content.to_string()),
        reasoning,
        tool_calls: Vec::new(),
    }
}

/// What a growing completion says after its reasoning block: `None` while it is (or may yet
/// become) inside a leading `<think>…</think>`.
pub fn after_reasoning(text: &str) -> Option<&str> {
    let t = text.trim_start();
    if "<think>".starts_with(t) {
        return None;
    }
    match t.strip_prefix("<think>") {
        Some(body) => body.split_once("</think>").map(|(_, rest)| rest),
        None => Some(t),
    }
}

fn split_thinking(text: &str) -> (Option<String>, &str) {
    let trimmed = text.trim_start();
    if let Some(body) = trimmed.strip_prefix("<think>") {
        if let Some(end) = body.find("</think>") {
            let inner = body[..end].trim();
            let reasoning = (!inner.is_empty()).then(|| inner.to_string());
            return (reasoning, &body[end + "</think>".len()..]);
        }
    }
    (None, text)
}

/// `(text outside the blocks, calls)`, or `None` when a block is malformed.
fn parse_calls(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let end = after.find(CLOSE)?;
        calls.push(parse_call(after[..end].trim())?);
        rest = &after[end + CLOSE.len()..];
    }
    content.push_str(rest);
    Some((content, calls))
}

fn parse_call(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        None => "{}".to_string(),
        Some(a @ Value::Object(_)) => a.to_string(),
        // Some models write the arguments already encoded; keep them when they are JSON.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_call_becomes_a_tool_call() {
        let t = parse_assistant(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(t.content, None);
        assert_eq!(
            t.tool_calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]
        );
    }

    #[test]
    fn several_calls_and_surrounding_text() {
        let t = parse_assistant(
            "<think>\n\n</think>\n\nChecking both.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>",
        );
        assert_eq!(t.reasoning, None);
        assert_eq!(t.content.as_deref(), Some("Checking both."));
        let names: Vec<_> = t.tool_calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(t.tool_calls[1].arguments, r#"{"x": 1}"#);
    }

    #[test]
    fn malformed_json_stays_content() {
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": }\n</tool_call>";
        let t = parse_assistant(text);
        assert!(t.tool_calls.is_empty());
        assert_eq!(t.content.as_deref(), Some(text));
        // Unterminated block (the budget ran out mid-call), and a call without a name.
        let cut = "<tool_call>\n{\"name\": \"a\"";
        assert_eq!(parse_assistant(cut).content.as_deref(), Some(cut));
        let nameless = "<tool_call>{\"arguments\": {}}</tool_call>";
        assert!(parse_assistant(nameless).tool_calls.is_empty());
    }

    #[test]
    fn a_forced_opening_and_the_arguments_after_it_parse_as_that_call() {
        let text = format!(
            "{CALL_BEFORE_NAME}get_time{CALL_AFTER_NAME}{{\"zone\": \"CET\"}}}}\n</tool_call>"
        );
        let t = parse_assistant(&text);
        let call = ToolCall {
            name: "get_time".into(),
            arguments: r#"{"zone":"CET"}"#.into(),
        };
        assert_eq!(t.tool_calls, vec![call]);
        assert_eq!(t.content, None);
    }

    #[test]
    fn thinking_is_split_off() {
        let t = parse_assistant("<think>\nsunny?\n</think>\n\nIt is sunny.");
        assert_eq!(t.reasoning.as_deref(), Some("sunny?"));
        assert_eq!(t.content.as_deref(), Some("It is sunny."));
    }

    #[test]
    fn read_as_text_calls_stay_content_and_only_a_closed_block_is_reasoning() {
        let call = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let t = parse_text(&format!("<think>\nhm\n</think>\n\n{call}\n"));
        assert_eq!(t.reasoning.as_deref(), Some("hm"));
        assert_eq!(t.content.as_deref(), Some(call));
        assert!(t.tool_calls.is_empty());
        let open = "<think>\nstill thinking";
        assert_eq!(parse_text(open).content.as_deref(), Some(open));
        assert_eq!(parse_text(open).reasoning, None);
        assert_eq!(parse_text("<think></think>\n \n"), AssistantTurn::default());
    }
}
