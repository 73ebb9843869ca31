//! `tool_choice`: which tools the prompt offers and how the completion must begin. `"auto"` (the
//! default) offers the tools and lets the model decide, `"none"` offers none, `"required"` and
//! `{"type": "function", "function": {"name": …}}` force a call by writing its frame: the model
//! picks among the offered names (`"required"`) and writes the arguments as a JSON object. With
//! `"required"` and `parallel_tool_calls` (OpenAI's default) the model may then write further
//! calls, each forced the same way, or end its turn. In an `"auto"` turn a call the model opens
//! itself is guided the same way once it has written `<tool_call>`.

use super::invalid;
use crate::api::error::AppError;
use crate::train::generate::{ArgumentSchema, GuidedCalls, Lead};
use crate::train::tool_calls::{CALL_AFTER_ARGUMENTS, CALL_AFTER_NAME, CALL_BEFORE_NAME};
use serde_json::Value;

/// What a request's `tools` and `tool_choice` come to.
#[derive(Debug, PartialEq)]
pub(super) struct ToolUse {
    /// Tools the prompt offers (none with `"none"` or an empty list).
    pub tools: Option<Vec<Value>>,
    /// The forced opening of a call (empty unless one is required).
    pub opening: Vec<Lead>,
    /// In a free turn with tools, how a call the model opens is written.
    pub guided: Option<GuidedCalls>,
}

/// The token that opens a call in Qwen3's template, which the call's frame begins with.
const CALL_OPENER: &str = "<tool_call>";

pub(super) fn resolve(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: bool,
) -> Result<ToolUse, AppError> {
    let tools = tools.filter(|t| !t.is_empty()).map(<[Value]>::to_vec);
    let free = |tools: Option<Vec<Value>>| {
        Ok(ToolUse {
            guided: tools.as_deref().and_then(guided_calls),
            tools,
            opening: Vec::new(),
        })
    };
    let forced = |only: Option<&str>| -> Result<ToolUse, AppError> {
        let functions = functions(tools.as_deref().unwrap_or_default())?;
        if functions.is_empty() {
            return Err(invalid(
                "tool_choice",
                "a required tool call needs at least one function in tools",
            ));
        }
        let functions = match only {
            None => functions,
            Some(n) => match functions.into_iter().find(|f| f.0 == n) {
                Some(f) => vec![f],
                None => {
                    return Err(invalid(
                        "tool_choice",
                        format!("tool_choice names the function {n:?}, which is not in tools"),
                    ))
                }
            },
        };
        // A named function is one call to it, as OpenAI forces it.
        let more = parallel && only.is_none();
        Ok(ToolUse {
            opening: call_opening(functions, more),
            tools: tools.clone(),
            guided: None,
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

/// The completion that is a call to one of `functions`: the frame is written for the model,
/// which picks the function when there are several (the name with what follows it, so that no
/// pick begins another) and writes the arguments as one JSON object, with that function's keys
/// and their values' types and listed values when its schema lists them; the call closed, the
/// completion ends, or with `more` the model picks between ending its turn and another call
/// (on a line of its own, as Qwen3's template writes parallel calls).
fn call_opening(functions: Vec<(&str, Option<ArgumentSchema>)>, more: bool) -> Vec<Lead> {
    let mut leads = call(CALL_BEFORE_NAME, functions);
    // The forced calls are the answer: what a model would write after them is not asked for.
    leads.push(if more {
        Lead::Again("\n".to_string())
    } else {
        Lead::End
    });
    leads
}

/// One call written from `before` (the frame up to the name) on: the name (picked by the model
/// among several), the arguments as a JSON object under the picked function's schema, the end
/// of the frame.
fn call(before: &str, functions: Vec<(&str, Option<ArgumentSchema>)>) -> Vec<Lead> {
    let (names, schemas): (Vec<&str>, Vec<Option<ArgumentSchema>>) = functions.into_iter().unzip();
    let mut leads = match names[..] {
        [name] => vec![Lead::Text(format!("{before}{name}{CALL_AFTER_NAME}"))],
        _ => vec![
            Lead::Text(before.to_string()),
            Lead::OneOf(
                names
                    .iter()
                    .map(|n| format!("{n}{CALL_AFTER_NAME}"))
                    .collect(),
            ),
        ],
    };
    leads.push(Lead::JsonObject(schemas));
    leads.push(Lead::Text(CALL_AFTER_ARGUMENTS.to_string()));
    leads
}

/// A free turn's calls, guided once the model has opened one: the rest of the frame is written
/// for it, it picks an offered function and writes arguments its schema allows. `None` (calls
/// stay free text) when a function's name is not one a call can be forced to.
fn guided_calls(tools: &[Value]) -> Option<GuidedCalls> {
    let functions = functions(tools).ok().filter(|f| !f.is_empty())?;
    let after_opener = CALL_BEFORE_NAME
        .strip_prefix(CALL_OPENER)
        .expect("a call's frame begins with its opener");
    Some(GuidedCalls {
        opener: CALL_OPENER.to_string(),
        body: call(after_opener, functions),
    })
}

/// The function tools: each name, checked to be one a call can be forced to (OpenAI's 1 to 64
/// letters, digits, `_` and `-`, written into the call as they are), and the arguments its
/// `parameters` schema allows, when it lists its keys.
fn functions(tools: &[Value]) -> Result<Vec<(&str, Option<ArgumentSchema>)>, AppError> {
    tools
        .iter()
        .enumerate()
        .filter(|(_, t)| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|(i, t)| {
            let function = t.get("function").unwrap_or(&Value::Null);
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let plain = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !plain {
                return Err(invalid(
                    &format!("tools[{i}].function.name"),
                    "to force a call, every function name must be 1 to 64 letters, digits, \
                     underscores or dashes",
                ));
            }
            let schema = function
                .get("parameters")
                .and_then(ArgumentSchema::from_schema);
            Ok((name, schema))
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
    fn auto_and_none_force_nothing_and_auto_guides_the_calls_the_model_opens() {
        let tools = [tool("a"), tool("b")];
        for choice in [None, Some(json!("auto"))] {
            let u = resolve(Some(&tools), choice.as_ref(), true).unwrap();
            assert_eq!(u.tools.as_deref(), Some(&tools[..]));
            assert!(u.opening.is_empty());
            let guided = u.guided.unwrap();
            assert_eq!(guided.opener, "<tool_call>");
            // The forced frame, less the opener the model wrote itself, and no End or Again:
            // the model goes on freely after the call.
            let required = resolve(Some(&tools), Some(&json!("required")), false).unwrap();
            let mut expected = required.opening[..required.opening.len() - 1].to_vec();
            expected[0] = Lead::Text("\n{\"name\": \"".into());
            assert_eq!(guided.body, expected);
        }
        let u = resolve(Some(&tools), Some(&json!("none")), true).unwrap();
        assert_eq!(
            u,
            ToolUse {
                tools: None,
                opening: vec![],
                guided: None,
            }
        );
        // A name a call cannot be forced to leaves the turn's calls free, without an error.
        let odd = resolve(Some(&[tool("say hi")]), None, true).unwrap();
        assert_eq!((odd.tools.is_some(), odd.guided), (true, None));
        let u = resolve(Some(&[]), None, true).unwrap();
        assert_eq!(u.tools, None, "an empty list offers nothing");
    }

    #[test]
    fn required_picks_among_all_and_a_named_function_is_forced() {
        let tools = [tool("get_weather"), tool("get_time")];
        let u = resolve(Some(&tools), Some(&json!("required")), false).unwrap();
        let picks = vec![
            format!("get_weather{CALL_AFTER_NAME}"),
            format!("get_time{CALL_AFTER_NAME}"),
        ];
        let end = Lead::Text(CALL_AFTER_ARGUMENTS.into());
        let want = vec![
            Lead::Text(CALL_BEFORE_NAME.into()),
            Lead::OneOf(picks),
            Lead::JsonObject(vec![None, None]),
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
        let u = resolve(Some(&tools), Some(&named), true).unwrap();
        let whole = format!("{CALL_BEFORE_NAME}get_time{CALL_AFTER_NAME}");
        assert_eq!(
            u.opening,
            vec![
                Lead::Text(whole),
                Lead::JsonObject(vec![None]),
                end,
                Lead::End
            ]
        );
    }

    /// With parallel calls (OpenAI's default) a required call may be followed by others; a
    /// named function is called once either way.
    #[test]
    fn parallel_calls_let_the_model_write_another_or_end() {
        let tools = [tool("get_weather"), tool("get_time")];
        let u = resolve(Some(&tools), Some(&json!("required")), true).unwrap();
        assert_eq!(u.opening.last(), Some(&Lead::Again("\n".into())));
        assert_eq!(u.opening[0], Lead::Text(CALL_BEFORE_NAME.into()));
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let u = resolve(Some(&tools), Some(&named), true).unwrap();
        assert_eq!(u.opening.last(), Some(&Lead::End));
    }

    #[test]
    fn a_schema_that_lists_its_properties_gives_the_arguments_keys() {
        let params = json!({"type": "object", "required": ["city"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}});
        let tools = [json!({"type": "function",
            "function": {"name": "get_weather", "parameters": params}})];
        let u = resolve(Some(&tools), Some(&json!("required")), true).unwrap();
        let schema = ArgumentSchema::from_schema(&params);
        assert!(schema.is_some());
        assert_eq!(u.opening[1], Lead::JsonObject(vec![schema]));
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
            let e = resolve(tools, Some(&choice), true).unwrap_err();
            assert_eq!(e.param_name(), Some(param), "{choice}");
            assert_eq!(e.into_response().status(), 400, "{choice}");
        }
    }
}
