//! `tool_choice`: which tools the prompt offers and how the completion must begin. `"auto"` (the
//! default) offers the tools and lets the model decide, `"none"` offers none, `"required"` and
//! `{"type": "function", "function": {"name": …}}` force a call by writing its frame: the model
//! picks among the offered names (`"required"`) and writes the arguments as a JSON object.

use super::invalid;
use crate::api::error::AppError;
use crate::train::generate::Lead;
use crate::train::tool_calls::{CALL_AFTER_ARGUMENTS, CALL_AFTER_NAME, CALL_BEFORE_NAME};
use serde_json::Value;

/// What a request's `tools` and `tool_choice` come to.
#[derive(Debug, PartialEq)]
pub(super) struct ToolUse {
    /// Tools the prompt offers (none with `"none"` or an empty list).
    pub tools: Option<Vec<Value>>,
    /// The forced opening of a call (empty unless one is required).
    pub opening: Vec<Lead>,
}

pub(super) fn resolve(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
) -> Result<ToolUse, AppError> {
    let tools = tools.filter(|t| !t.is_empty()).map(<[Value]>::to_vec);
    let free = |tools| {
        Ok(ToolUse {
            tools,
            opening: Vec::new(),
        })
    };
    let forced = |only: Option<&str>| -> Result<ToolUse, AppError> {
        let names = function_names(tools.as_deref().unwrap_or_default())?;
        if names.is_empty() {
            return Err(invalid(
                "tool_choice",
                "a required tool call needs at least one function in tools",
            ));
        }
        let names = match only {
            None => names,
            Some(n) if names.contains(&n) => vec![n],
            Some(n) => {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice names the function {n:?}, which is not in tools"),
                ))
            }
        };
        Ok(ToolUse {
            opening: call_opening(&names),
            tools: tools.clone(),
        })
    };
    match choice {
        None => free(tools),
        Some(Value::String(c)) if c == "auto" => free(tools),
        Some(Value::String(c)) if c == "none" => free(None),
        Some(Value::String(c)) if c == "required" => forced(None),
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) => forced(Some(name)),
                None => Err(invalid(
                    "tool_choice",
                    "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                )),
            }
        }
        Some(_) => Err(invalid(
            "tool_choice",
            "tool_choice is \"auto\", \"none\", \"required\" or {\"type\": \"function\", \
             \"function\": {\"name\": …}}",
        )),
    }
}

/// The completion that is one call to one of `names`: the frame is written for the model, which
/// picks the name when there are several (with what follows it, so that no pick begins another)
/// and writes the arguments as one JSON object; the call closed, the completion ends.
fn call_opening(names: &[&str]) -> Vec<Lead> {
    let mut leads = match names {
        [name] => vec![Lead::Text(format!(
            "{CALL_BEFORE_NAME}{name}{CALL_AFTER_NAME}"
        ))],
        _ => vec![
            Lead::Text(CALL_BEFORE_NAME.to_string()),
            Lead::OneOf(
                names
                    .iter()
                    .map(|n| format!("{n}{CALL_AFTER_NAME}"))
                    .collect(),
            ),
        ],
    };
    leads.push(Lead::JsonObject);
    leads.push(Lead::Text(CALL_AFTER_ARGUMENTS.to_string()));
    // The forced call is the answer: what a model would write after it is not asked for.
    leads.push(Lead::End);
    leads
}

/// The names of the function tools, each checked to be a name a call can be forced to: OpenAI's
/// 1 to 64 letters, digits, `_` and `-`, written into the call as they are.
fn function_names(tools: &[Value]) -> Result<Vec<&str>, AppError> {
    tools
        .iter()
        .enumerate()
        .filter(|(_, t)| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|(i, t)| {
            let name = t
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let plain = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if plain {
                Ok(name)
            } else {
                Err(invalid(
                    &format!("tools[{i}].function.name"),
                    "to force a call, every function name must be 1 to 64 letters, digits, \
                     underscores or dashes",
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;
    use serde_json::json;

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})
    }

    #[test]
    fn auto_and_none_force_nothing() {
        let tools = [tool("a"), tool("b")];
        for choice in [None, Some(json!("auto"))] {
            let u = resolve(Some(&tools), choice.as_ref()).unwrap();
            assert_eq!(u.tools.as_deref(), Some(&tools[..]));
            assert!(u.opening.is_empty());
        }
        let u = resolve(Some(&tools), Some(&json!("none"))).unwrap();
        assert_eq!(
            u,
            ToolUse {
                tools: None,
                opening: vec![]
            }
        );
        let u = resolve(Some(&[]), None).unwrap();
        assert_eq!(u.tools, None, "an empty list offers nothing");
    }

    #[test]
    fn required_picks_among_all_and_a_named_function_is_forced() {
        let tools = [tool("get_weather"), tool("get_time")];
        let u = resolve(Some(&tools), Some(&json!("required"))).unwrap();
        let picks = vec![
            format!("get_weather{CALL_AFTER_NAME}"),
            format!("get_time{CALL_AFTER_NAME}"),
        ];
        let end = Lead::Text(CALL_AFTER_ARGUMENTS.into());
        let want = vec![
            Lead::Text(CALL_BEFORE_NAME.into()),
            Lead::OneOf(picks),
            Lead::JsonObject,
            end.clone(),
            Lead::End,
        ];
        assert_eq!(u.opening, want);
        assert_eq!(
            u.tools.as_deref(),
            Some(&tools[..]),
            "every tool stays offered"
        );
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let u = resolve(Some(&tools), Some(&named)).unwrap();
        let whole = format!("{CALL_BEFORE_NAME}get_time{CALL_AFTER_NAME}");
        assert_eq!(
            u.opening,
            vec![Lead::Text(whole), Lead::JsonObject, end, Lead::End]
        );
    }

    #[test]
    fn impossible_choices_are_400s_naming_the_parameter() {
        let tools = [tool("get_weather")];
        let cases = [
            (Some(&[][..]), json!("required"), "tool_choice"),
            (None, json!("required"), "tool_choice"),
            (
                Some(&tools[..]),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (Some(&tools[..]), json!({"type": "function"}), "tool_choice"),
            (Some(&tools[..]), json!("always"), "tool_choice"),
            (
                Some(&[tool("say \"hi\"")][..]),
                json!("required"),
                "tools[0].function.name",
            ),
        ];
        for (tools, choice, param) in cases {
            let e = resolve(tools, Some(&choice)).unwrap_err();
            assert_eq!(e.param_name(), Some(param), "{choice}");
            assert_eq!(e.into_response().status(), 400, "{choice}");
        }
    }
}
