//! `response_format`: `text` (the default) leaves the answer free; `json_object` makes it one
//! JSON object and `json_schema` one that keeps to the schema's top-level properties as a forced
//! call's arguments do (keys, required keys, value types, listed values), the model's tokens
//! masked as it writes.

use super::invalid;
use crate::api::error::AppError;
use crate::train::generate::{ArgumentSchema, Lead};
use serde_json::Value;

/// The forced opening `format` asks for: nothing, or one JSON object and the end of the turn.
pub(super) fn resolve(format: Option<&Value>) -> Result<Vec<Lead>, AppError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(Vec::new());
    };
    let object = |schema: Option<ArgumentSchema>| vec![Lead::JsonObject(vec![schema]), Lead::End];
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Vec::new()),
        Some("json_object") => Ok(object(None)),
        Some("json_schema") => {
            let Some(schema) = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .filter(|s| s.is_object())
            else {
                return Err(invalid(
                    "response_format",
                    "a json_schema response_format is {\"type\": \"json_schema\", \
                     \"json_schema\": {\"name\": …, \"schema\": {…}}}",
                ));
            };
            match schema.get("type") {
                None => {}
                Some(Value::String(t)) if t == "object" => {}
                Some(_) => {
                    return Err(invalid(
                        "response_format",
                        "the schema's top level must be an object (\"type\": \"object\")",
                    ))
                }
            }
            Ok(object(ArgumentSchema::from_schema(schema)))
        }
        _ => Err(invalid(
            "response_format",
            "response_format is {\"type\": \"text\"}, {\"type\": \"json_object\"} or \
             {\"type\": \"json_schema\", \"json_schema\": {…}}",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;
    use serde_json::json;

    #[test]
    fn text_and_absent_force_nothing() {
        assert_eq!(resolve(None).unwrap(), vec![]);
        assert_eq!(resolve(Some(&Value::Null)).unwrap(), vec![]);
        assert_eq!(resolve(Some(&json!({"type": "text"}))).unwrap(), vec![]);
    }

    #[test]
    fn json_formats_force_one_object_and_the_end() {
        let any = resolve(Some(&json!({"type": "json_object"}))).unwrap();
        assert_eq!(any, vec![Lead::JsonObject(vec![None]), Lead::End]);
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"], "additionalProperties": false});
        let format = json!({"type": "json_schema",
            "json_schema": {"name": "place", "schema": schema, "strict": true}});
        let keyed = resolve(Some(&format)).unwrap();
        let want = ArgumentSchema::from_schema(&schema);
        assert!(want.is_some());
        assert_eq!(keyed, vec![Lead::JsonObject(vec![want]), Lead::End]);
    }

    #[test]
    fn impossible_formats_are_400s_naming_the_parameter() {
        for format in [
            json!({"type": "yaml"}),
            json!("json_object"),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}),
        ] {
            let e = resolve(Some(&format)).unwrap_err().into_response();
            assert_eq!(e.status(), 400, "{format}");
        }
    }
}
