//! Tool-call evaluation: held-out assistant turns as cases (the conversation before the turn, and
//! the turn as reference), each generated turn scored against its reference, and the scores
//! summed into the accuracies the trainer reports (definitions in docs/tool-eval.md).

use crate::train::data::Row;
use crate::train::tool_calls::parse_assistant;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

/// What the reference assistant turn did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// One or more function calls (several: parallel calls in one turn).
    Calls(Vec<ExpectedCall>),
    /// An answer, a question or a refusal: no call.
    NoCall,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedCall {
    pub name: String,
    /// Parsed: the data may carry arguments as an object or as a string holding JSON.
    pub arguments: Value,
}

/// One held-out turn to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// 1-based line of the row in its file.
    pub line: usize,
    /// The messages before the reference turn.
    pub prefix: Vec<Value>,
    pub tools: Option<Vec<Value>>,
    pub reference: Reference,
}

/// Whether any row offers tools or calls one: without, the evaluation has nothing to measure.
pub fn has_tools(rows: &[(usize, Row)]) -> bool {
    rows.iter().any(|(_, r)| match r {
        Row::Chat { messages, tools } => {
            tools.as_ref().is_some_and(|t| !t.is_empty())
                || messages.iter().any(|m| !calls_of(m).is_empty())
        }
        _ => false,
    })
}

/// Every assistant turn of the conversational rows (after at least one other message), in file
/// order, at most `max`.
pub fn cases(rows: &[(usize, Row)], max: usize) -> Vec<Case> {
    let mut out = Vec::new();
    for (line, row) in rows {
        let Row::Chat { messages, tools } = row else {
            continue;
        };
        for (i, m) in messages.iter().enumerate().skip(1) {
            if out.len() >= max {
                return out;
            }
            if m.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let calls = calls_of(m);
            out.push(Case {
                line: *line,
                prefix: messages[..i].to_vec(),
                tools: tools.clone(),
                reference: if calls.is_empty() {
                    Reference::NoCall
                } else {
                    Reference::Calls(calls)
                },
            });
        }
    }
    out
}

/// The calls of an assistant message, in either of the shapes the data accepts
/// (`{"function": {"name", "arguments"}}` or `{"name", "arguments"}`).
fn calls_of(message: &Value) -> Vec<ExpectedCall> {
    let Some(calls) = message.get("tool_calls").and_then(Value::as_array) else {
        return Vec::new();
    };
    calls
        .iter()
        .filter_map(|c| {
            let f = c.get("function").unwrap_or(c);
            let name = f.get("name")?.as_str()?.to_string();
            let arguments = match f.get("arguments") {
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(Value::String(s)) => serde_json::from_str(s).ok()?,
                Some(v) => v.clone(),
            };
            Some(ExpectedCall { name, arguments })
        })
        .collect()
}

/// The functions a case offers, each with its `parameters` compiled as a JSON Schema (`None`:
/// any object will do, also when the schema does not compile, as nothing can be judged by it).
#[derive(Default)]
pub struct Offered(HashMap<String, Option<jsonschema::Validator>>);

impl Offered {
    pub fn new(tools: Option<&[Value]>) -> Self {
        let mut by_name = HashMap::new();
        for t in tools.into_iter().flatten() {
            let f = t.get("function").unwrap_or(t);
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                continue;
            };
            let validator = f
                .get("parameters")
                .and_then(|p| jsonschema::validator_for(p).ok());
            by_name.insert(name.to_string(), validator);
        }
        Self(by_name)
    }

    /// Whether `arguments` (a call's parsed arguments) is an object that the offered function
    /// `name` accepts.
    fn accepts(&self, name: &str, arguments: &Value) -> bool {
        let Some(validator) = self.0.get(name) else {
            return false;
        };
        arguments.is_object() && validator.as_ref().is_none_or(|v| v.is_valid(arguments))
    }
}

/// How one generated turn compares with its reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseScore {
    /// The reference calls: whether the output parsed as calls, named the same functions, and
    /// also passed equal arguments; and whether each of its calls named an offered function with
    /// arguments valid under that function's schema.
    Call {
        json_valid: bool,
        name_right: bool,
        args_exact: bool,
        args_valid: bool,
    },
    /// The reference does not call: whether the output did not start a call either.
    NoCall { no_call: bool },
}

/// Scores `generated` (the raw completion text) against `reference`, and its calls against the
/// functions `offered`. Calls are compared as multisets, so parallel calls may come in any order.
pub fn score(reference: &Reference, offered: &Offered, generated: &str) -> CaseScore {
    let turn = parse_assistant(generated);
    match reference {
        Reference::NoCall => CaseScore::NoCall {
            // A malformed `<tool_call>` block is still an attempt to call.
            no_call: turn.tool_calls.is_empty() && !generated.contains("<tool_call>"),
        },
        Reference::Calls(expected) => {
            let json_valid = !turn.tool_calls.is_empty();
            let mut got_names: Vec<&str> =
                turn.tool_calls.iter().map(|c| c.name.as_str()).collect();
            let mut want_names: Vec<&str> = expected.iter().map(|c| c.name.as_str()).collect();
            got_names.sort_unstable();
            want_names.sort_unstable();
            let name_right = json_valid && got_names == want_names;
            // A call's arguments parsed once (the parser kept only JSON ones).
            let calls: Vec<(&str, Value)> = turn
                .tool_calls
                .iter()
                .map(|c| {
                    let args = serde_json::from_str(&c.arguments).unwrap_or(Value::Null);
                    (c.name.as_str(), args)
                })
                .collect();
            let args_exact = name_right && {
                let mut unmatched: Vec<&(&str, Value)> = calls.iter().collect();
                expected.iter().all(|e| {
                    let hit = unmatched
                        .iter()
                        .position(|(n, a)| *n == e.name && json_eq(a, &e.arguments));
                    hit.map(|i| unmatched.swap_remove(i)).is_some()
                })
            };
            let args_valid = json_valid && calls.iter().all(|(n, a)| offered.accepts(n, a));
            CaseScore::Call {
                json_valid,
                name_right,
                args_exact,
                args_valid,
            }
        }
    }
}

/// Equality of JSON values: objects regardless of key order, numbers by value (`1` equals `1.0`).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// One evaluation's results (field names are the event-stream contract: openapi.yaml).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolEvalMetrics {
    pub step: u64,
    /// Cases generated: call cases + no-call cases.
    pub tool_eval_examples: u64,
    /// Cases whose reference turn calls at least one function (the denominator of the first three
    /// accuracies).
    pub tool_call_examples: u64,
    /// Call cases whose output named the same functions (as a multiset) ÷ call cases.
    pub tool_name_accuracy: Option<f64>,
    /// Call cases whose output had the same calls with equal JSON arguments ÷ call cases.
    pub tool_args_exact: Option<f64>,
    /// Call cases whose output parsed as one or more well-formed calls ÷ call cases.
    pub tool_json_valid: Option<f64>,
    /// Call cases whose output's calls each named an offered function with arguments valid
    /// under its `parameters` schema ÷ call cases (absent from evaluations before 2026-12-04).
    #[serde(default)]
    pub tool_args_valid: Option<f64>,
    /// No-call cases whose output started no `<tool_call>` ÷ no-call cases.
    pub no_call_accuracy: Option<f64>,
    /// Wall-clock seconds the evaluation took (generation included).
    pub tool_eval_seconds: f64,
}

impl ToolEvalMetrics {
    /// One line: the accuracies as percentages (`-` where a rate has no cases).
    pub fn summary(&self) -> String {
        let pct = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.1}%", 100.0 * r));
        format!(
            "tool calls over {} held-out turns ({} calling): name {}, arguments exact {}, valid JSON {}, arguments valid {}, no call {} ({:.1} s)",
            self.tool_eval_examples,
            self.tool_call_examples,
            pct(self.tool_name_accuracy),
            pct(self.tool_args_exact),
            pct(self.tool_json_valid),
            pct(self.tool_args_valid),
            pct(self.no_call_accuracy),
            self.tool_eval_seconds
        )
    }

    /// Sums `scores` into rates; a rate whose denominator is zero is `None`.
    pub fn from_scores(step: u64, scores: &[CaseScore], seconds: f64) -> Self {
        let (mut calls, mut json, mut name, mut args, mut valid) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut no_calls, mut no_call_ok) = (0u64, 0u64);
        for s in scores {
            match *s {
                CaseScore::Call {
                    json_valid,
                    name_right,
                    args_exact,
                    args_valid,
                } => {
                    calls += 1;
                    json += json_valid as u64;
                    name += name_right as u64;
                    args += args_exact as u64;
                    valid += args_valid as u64;
                }
                CaseScore::NoCall { no_call } => {
                    no_calls += 1;
                    no_call_ok += no_call as u64;
                }
            }
        }
        let rate = |n: u64, d: u64| (d > 0).then(|| n as f64 / d as f64);
        Self {
            step,
            tool_eval_examples: calls + no_calls,
            tool_call_examples: calls,
            tool_name_accuracy: rate(name, calls),
            tool_args_exact: rate(args, calls),
            tool_json_valid: rate(json, calls),
            tool_args_valid: rate(valid, calls),
            no_call_accuracy: rate(no_call_ok, no_calls),
            tool_eval_seconds: seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather(city: &str) -> Reference {
        Reference::Calls(vec![ExpectedCall {
            name: "get_weather".into(),
            arguments: json!({"city": city, "unit": "celsius"}),
        }])
    }

    fn call(name: &str, args: &str) -> String {
        format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>")
    }

    fn scored(r: &Reference, text: &str) -> (bool, bool, bool) {
        match score(r, &Offered::default(), text) {
            CaseScore::Call {
                json_valid,
                name_right,
                args_exact,
                ..
            } => (json_valid, name_right, args_exact),
            s => panic!("{s:?}"),
        }
    }

    /// Whether `text`'s calls are valid under the functions `tools` offers.
    fn args_valid(tools: &Value, text: &str) -> bool {
        let offered = Offered::new(tools.as_array().map(Vec::as_slice));
        match score(&weather("Oslo"), &offered, text) {
            CaseScore::Call { args_valid, .. } => args_valid,
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn arguments_are_valid_when_each_call_keeps_to_its_functions_schema() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "required": ["city"], "additionalProperties": false,
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                    "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
            {"type": "function", "function": {"name": "now"}},
            {"type": "function", "function": {"name": "odd", "parameters": {"type": 5}}},
        ]);
        let valid = [
            call("get_weather", r#"{"city": "Oslo"}"#),
            call("get_weather", r#""{\"city\": \"Oslo\", \"days\": 3}""#),
            format!(
                "{}\n{}",
                call("get_weather", r#"{"city": "a"}"#),
                call("now", "{}")
            ),
            call("now", r#"{"anything": [1]}"#),
            call("odd", r#"{"x": 1}"#), // a schema that does not compile judges nothing
        ];
        for t in &valid {
            assert!(args_valid(&tools, t), "{t}");
        }
        let invalid = [
            call("get_weather", r#"{"days": 3}"#), // required key missing
            call("get_weather", r#"{"city": 3}"#), // wrong type
            call("get_weather", r#"{"city": "a", "unit": "k"}"#), // not a listed value
            call("get_weather", r#"{"city": "a", "country": "b"}"#), // not a listed key
            call("web_search", r#"{"q": "x"}"#),   // not offered
            format!("{}\n{}", call("now", "{}"), call("get_weather", "{}")),
            "no call at all".to_string(),
            "<tool_call>\n{\"name\": \"now\"".to_string(),
        ];
        for t in &invalid {
            assert!(!args_valid(&tools, t), "{t}");
        }
        assert!(
            !args_valid(&Value::Null, &call("now", "{}")),
            "nothing offered"
        );
        let offered = Offered::new(tools.as_array().map(Vec::as_slice));
        assert!(offered.0["odd"].is_none() && offered.0["get_weather"].is_some());
    }

    #[test]
    fn a_right_call_scores_everything_even_with_other_key_order_and_thinking() {
        let text = format!(
            "<think>\n\n</think>\n\n{}",
            call("get_weather", r#"{"unit": "celsius", "city": "Zürich"}"#)
        );
        assert_eq!(scored(&weather("Zürich"), &text), (true, true, true));
        // Arguments written as a JSON string, and 20 vs 20.0, are the same values.
        let r = Reference::Calls(vec![ExpectedCall {
            name: "calculate".into(),
            arguments: json!({"x": 20}),
        }]);
        assert_eq!(
            scored(&r, &call("calculate", r#""{\"x\": 20.0}""#)),
            (true, true, true)
        );
    }

    #[test]
    fn wrong_name_wrong_args_and_invalid_json() {
        let r = weather("Paris");
        let wrong_name = call("web_search", r#"{"city": "Paris", "unit": "celsius"}"#);
        assert_eq!(scored(&r, &wrong_name), (true, false, false));
        let wrong_args = call("get_weather", r#"{"city": "Lyon", "unit": "celsius"}"#);
        assert_eq!(scored(&r, &wrong_args), (true, true, false));
        let missing_arg = call("get_weather", r#"{"city": "Paris"}"#);
        assert_eq!(scored(&r, &missing_arg), (true, true, false));
        let broken =
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>";
        assert_eq!(scored(&r, broken), (false, false, false));
        // The budget ran out inside the call.
        assert_eq!(
            scored(&r, "<tool_call>\n{\"name\": \"get_weather\""),
            (false, false, false)
        );
    }

    #[test]
    fn answering_instead_of_calling_and_calling_instead_of_answering() {
        assert_eq!(
            scored(&weather("Paris"), "It is sunny in Paris."),
            (false, false, false)
        );
        let no_call = |t: &str| score(&Reference::NoCall, &Offered::default(), t);
        assert_eq!(
            no_call("Which city do you mean?"),
            CaseScore::NoCall { no_call: true }
        );
        assert_eq!(
            no_call(&call("get_weather", "{}")),
            CaseScore::NoCall { no_call: false }
        );
        assert_eq!(
            no_call("Sure. <tool_call>{\"name\": "),
            CaseScore::NoCall { no_call: false },
            "a malformed call is still a call"
        );
    }

    #[test]
    fn parallel_calls_match_as_multisets() {
        let r = Reference::Calls(vec![
            ExpectedCall {
                name: "get_weather".into(),
                arguments: json!({"city": "Paris"}),
            },
            ExpectedCall {
                name: "get_weather".into(),
                arguments: json!({"city": "Oslo"}),
            },
        ]);
        let both = format!(
            "{}\n{}",
            call("get_weather", r#"{"city": "Oslo"}"#),
            call("get_weather", r#"{"city": "Paris"}"#)
        );
        assert_eq!(scored(&r, &both), (true, true, true));
        let twice = format!(
            "{}\n{}",
            call("get_weather", r#"{"city": "Oslo"}"#),
            call("get_weather", r#"{"city": "Oslo"}"#)
        );
        assert_eq!(scored(&r, &twice), (true, true, false));
        let one = call("get_weather", r#"{"city": "Oslo"}"#);
        assert_eq!(scored(&r, &one), (true, false, false), "one of two calls");
    }

    #[test]
    fn rates_have_their_own_denominators() {
        let c = |j, n, a, v| CaseScore::Call {
            json_valid: j,
            name_right: n,
            args_exact: a,
            args_valid: v,
        };
        let scores = [
            c(true, true, true, true),
            c(true, true, false, false),
            c(true, false, false, true),
            c(false, false, false, false),
            CaseScore::NoCall { no_call: true },
            CaseScore::NoCall { no_call: false },
            CaseScore::NoCall { no_call: true },
        ];
        let m = ToolEvalMetrics::from_scores(7, &scores, 1.5);
        assert_eq!((m.tool_eval_examples, m.tool_call_examples), (7, 4));
        assert_eq!(m.tool_json_valid, Some(0.75));
        assert_eq!(m.tool_name_accuracy, Some(0.5));
        assert_eq!(m.tool_args_exact, Some(0.25));
        assert_eq!(m.tool_args_valid, Some(0.5));
        assert_eq!(m.no_call_accuracy, Some(2.0 / 3.0));
        let only_answers = ToolEvalMetrics::from_scores(1, &scores[4..], 0.0);
        assert_eq!(only_answers.tool_name_accuracy, None);
        assert_eq!(only_answers.tool_call_examples, 0);
    }

    #[test]
    fn cases_are_every_assistant_turn_in_file_order() {
        let rows = crate::train::data::parse_jsonl(
            br#"{"messages":[{"role":"user","content":"weather in Oslo?"},{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Oslo\"}"}}]},{"role":"tool","content":"3C"},{"role":"assistant","content":"3 degrees."}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}}]}
{"prompt":"a","completion":"b"}
{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}
"#,
        )
        .unwrap();
        assert!(has_tools(&rows));
        let all = cases(&rows, 64);
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[0].reference,
            Reference::Calls(vec![ExpectedCall {
                name: "get_weather".into(),
                arguments: json!({"city": "Oslo"})
            }])
        );
        assert_eq!(all[0].prefix.len(), 1);
        assert_eq!(
            (all[1].reference.clone(), all[1].prefix.len()),
            (Reference::NoCall, 3)
        );
        assert_eq!((all[2].line, all[2].tools.clone()), (3, None));
        assert_eq!(cases(&rows, 2).len(), 2);
        assert!(!has_tools(&rows[2..]));
    }
}
