//! The checker below the top level: nested objects' keys, arrays' items, listed values at any
//! depth, `$ref`s (recursive ones too), the depth past which values are free, and objects
//! written at random under a schema, each checked by an independent JSON Schema validator.

use super::argument_schema::*;
use super::argument_schema_tests::{node, refused, whole};
use super::json_prefix::{JsonPrefix, SCHEMA_DEPTH};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn read(schema: &Value) -> ArgumentSchema {
    ArgumentSchema::from_schema(schema).unwrap()
}

fn trips() -> Value {
    json!({"type": "object", "required": ["trip"], "properties": {
        "trip": {"type": "object", "required": ["from"], "properties": {
            "from": {"type": "string"}, "stops": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "ab"]}},
        "legs": {"type": "array", "items": {"type": "object", "required": ["km"], "properties": {
            "km": {"type": "number"}, "mode": {"enum": ["car", "foot"]}}}},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "note": {"anyOf": [{"type": "string", "enum": ["a", "c"]}, {"type": "null"}]},
        "size": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    }})
}

fn tree() -> Value {
    json!({
        "type": "object", "required": ["root"],
        "properties": {"root": {"$ref": "#/$defs/node"}, "unit": {"$ref": "#/definitions/unit"}},
        "$defs": {"node": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 2},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "definitions": {"unit": {"enum": ["c", "f"]}},
    })
}

/// Strings with length bounds, arrays with element counts and bounded integers, at the top,
/// in arrays and in a nested object.
fn lengths() -> Value {
    json!({"type": "object", "required": ["from"], "properties": {
        "from": {"type": "string", "minLength": 2, "maxLength": 3},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 1},
            "minItems": 1, "maxItems": 2},
        "trip": {"type": "object", "properties": {"name": {"type": "string", "minLength": 1}}},
        "grid": {"type": "array", "maxItems": 3,
            "items": {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 17},
                "minItems": 2}},
        "stops": {"type": "integer", "exclusiveMinimum": 0, "maximum": 71},
    }})
}

#[test]
fn nested_objects_and_arrays_keep_to_their_schemas() {
    let s = read(&trips());
    let ok = [
        r#"{"trip": {"from": "Oslo"}}"#,
        r#"{"trip": {"stops": 2, "from": "x"}, "tags": ["a", "ab", "a"], "legs": []}"#,
        r#"{"legs": [{"km": 1.5, "mode": "car"}, {"km": 3}], "trip": {"from": ""}}"#,
        r#"{"grid": [[1, -2], [], [0]], "trip": {"from": "a"}}"#,
    ];
    for o in ok {
        assert!(whole(&s, o), "{o}");
    }
    let bad = [
        r#"{"trip": {"to"#,                       // a key the nested object does not list
        r#"{"trip": {}"#,                         // its required key missing
        r#"{"trip": {"from": 1"#,                 // a string's place
        r#"{"trip": {"from": "x", "from""#,       // a key twice
        r#"{"trip": {"from": "x", "stops": 1.5"#, // an integer's place
        r#"{"trip": ["#,                          // an object's place
        r#"{"tags": ["b"#,                        // not a listed item
        r#"{"tags": ["a", 1"#,                    // an item of another type
        r#"{"legs": [{"mode": "car"}"#,           // an item missing its required key
        r#"{"legs": [{"km": 1}, 2"#,              // items are objects
        r#"{"legs": [{"km": 1, "mode": "bus"#,    // not a listed value, two levels down
        r#"{"grid": [[1.5"#,                      // integers in arrays in arrays
        r#"{"grid": [1"#,                         // arrays of arrays
        r#"{"trip": {"from": "x"}, "tags": {"#,
    ];
    for b in bad {
        assert!(refused(&s, b), "{b}");
    }
}

#[test]
fn references_are_followed_recursive_ones_too() {
    let s = read(&tree());
    let deep = r#"{"root": {"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]}, "unit": "f"}"#;
    assert!(whole(&s, deep));
    for b in [
        r#"{"root": {"name": "a", "children": [{"x"#,
        r#"{"root": {"name": "a", "children": [{"children": []}"#,
        r#"{"root": {"name": "a", "children": [{"name": 1"#,
        r#"{"unit": "k"#,
    ] {
        assert!(refused(&s, b), "{b}");
    }
    // The document itself, by `#`.
    let s = read(&json!({"type": "object", "properties": {
        "next": {"$ref": "#"}, "v": {"type": "integer"}}}));
    assert!(whole(&s, r#"{"next": {"next": {"v": 1}}, "v": 2}"#));
    assert!(refused(&s, r#"{"next": {"v": 1.5"#) && refused(&s, r#"{"next": {"w"#));
    // A reference outside the document, or to nothing, leaves its value free; keywords beside a
    // reference are not read (the reference alone allows more, never less).
    let s = read(&json!({"properties": {
        "far": {"$ref": "https://example.com/s.json"},
        "gone": {"$ref": "#/$defs/missing"},
        "typed": {"$ref": "#/$defs/n", "description": "a count", "type": "string"}},
        "$defs": {"n": {"type": "integer"}}}));
    assert_eq!(node(&s, "far"), &ValueSchema::FREE);
    assert_eq!(node(&s, "gone"), &ValueSchema::FREE);
    assert_eq!(node(&s, "typed").types, INTEGER);
    // The top level by reference.
    let s = read(&json!({"$ref": "#/$defs/args", "$defs": {"args": {
        "type": "object", "required": ["a"], "properties": {"a": {"type": "boolean"}}}}}));
    assert!(whole(&s, r#"{"a": true}"#) && refused(&s, "{}") && refused(&s, r#"{"a": 1"#));
}

#[test]
fn alternatives_of_other_types_are_picked_by_the_first_byte() {
    let s = read(&json!({"type": "object", "properties": {
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
        "leg": {"anyOf": [{"$ref": "#/$defs/leg"}, {"type": "null"}]},
        "n": {"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["a", "b"]}]},
        "list": {"anyOf": [{"type": "array", "items": {"type": "boolean"}}, {"type": "string"}]},
    }, "$defs": {"leg": {"type": "object", "required": ["km"], "properties": {
        "km": {"type": "number"}}}}}));
    let ok = [
        r#"{"note": "x", "leg": {"km": 2.5}, "n": 3, "list": [true]}"#,
        r#"{"note": null, "leg": null, "n": "b", "list": "all"}"#,
    ];
    for o in ok {
        assert!(whole(&s, o), "{o}");
    }
    for b in [
        r#"{"note": 1"#,
        r#"{"leg": {"x"#,
        r#"{"leg": {}"#,
        r#"{"leg": true"#,
        r#"{"n": 1.5"#,
        r#"{"n": "c"#,
        r#"{"n": null"#,
        r#"{"list": [1"#,
    ] {
        assert!(refused(&s, b), "{b}");
    }
    // Alternatives a first byte cannot tell apart, or one of any type, leave the value free;
    // so does a union that refers to itself.
    let s = read(&json!({"properties": {
        "objects": {"anyOf": [
            {"type": "object", "properties": {"a": {}}},
            {"type": "object", "properties": {"b": {}}}]},
        "numbers": {"anyOf": [{"type": "integer"}, {"type": "number"}]},
        "untyped": {"anyOf": [{"enum": [1]}, {"type": "string"}]},
        "looped": {"$ref": "#/$defs/u"},
    }, "$defs": {"u": {"anyOf": [{"$ref": "#/$defs/u"}, {"type": "null"}]}}}));
    for n in ["objects", "numbers", "untyped", "looped"] {
        assert_eq!(node(&s, n), &ValueSchema::FREE, "{n}");
    }
}

#[test]
fn past_the_schema_depth_values_are_free() {
    let mut schema = json!({"type": "integer"});
    for _ in 0..SCHEMA_DEPTH + 2 {
        schema = json!({"type": "object", "properties": {"a": schema}});
    }
    let s = read(&schema);
    let opened = |levels: usize| "{\"a\": ".repeat(levels);
    // The container at depth SCHEMA_DEPTH still lists its key; one deeper is free.
    assert!(refused(&s, &format!("{}{{\"b\"", opened(SCHEMA_DEPTH - 1))));
    let deeper = format!(
        "{}{{\"b\": 1.5}}{}",
        opened(SCHEMA_DEPTH),
        "}".repeat(SCHEMA_DEPTH)
    );
    assert!(whole(&s, &deeper), "{deeper}");
}

#[test]
fn plain_text_is_read_only_where_no_nested_key_or_value_is_spelled() {
    let s = read(&trips());
    let at = |t: &str| JsonPrefix::new().after(t, Some(&s)).unwrap();
    assert!(at(r#"{"trip": {"fr"#).plain_text(Some(&s)).is_none());
    assert!(at(r#"{"trip": {"from": "Os"#)
        .plain_text(Some(&s))
        .is_some());
    assert!(at(r#"{"tags": ["a"#).plain_text(Some(&s)).is_none());
    assert!(at(r#"{"legs": [{"mode": "f"#)
        .plain_text(Some(&s))
        .is_none());
}

/// How deep containers nest in `v` (an object of scalars: 1).
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The pieces `state` may take next, each with the state after it.
fn allowed<'p>(
    pieces: &[&'p str],
    state: JsonPrefix,
    schema: &ArgumentSchema,
) -> Vec<(&'p str, JsonPrefix)> {
    pieces
        .iter()
        .filter_map(|p| Some((*p, state.after(p, Some(schema))?)))
        .collect()
}

/// Random walks over a small vocabulary, each token taken only where the checker allows it,
/// closers preferred as a walk grows long: every walk that finishes parses and, where it nests
/// no deeper than the checker follows a schema, is valid under it by the `jsonschema` crate
/// (string lengths included; whose integers include `1.0` and whose objects take
/// unlisted keys where `additionalProperties` is absent, both of which the checker refuses:
/// stricter, never looser).
#[test]
fn objects_written_under_a_schema_are_valid_under_it() {
    let names = [
        "from", "stops", "trip", "tags", "legs", "grid", "km", "mode", "root", "name", "children",
        "unit", "a", "ab", "car", "foot", "c", "f", "note", "size",
    ];
    let mut pieces = vec![
        "{", "}", "[", "]", ",", ":", " ", "\"", "\"a", "b", "x\"", "0", "-", "1", ".5", "e2", "7",
        "true", "false", "null", "\\n", "\"a\"", "\"ab\"", "\"car\"", "\"foot\"", "\"c\"", "\"f\"",
        "\"fr", "om\"", "\"na", "me\"",
    ];
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let closing: Vec<String> = names.iter().map(|n| format!("{n}\"")).collect();
    pieces.extend(quoted.iter().chain(&closing).map(String::as_str));
    let closers = ["}", "]", "\"", "x\"", "0", "null", "\"a\"", "\"c\""];
    for schema in [trips(), tree(), lengths()] {
        let checker = read(&schema);
        let validator = jsonschema::validator_for(&schema).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let (mut finished, mut tokens) = (0, 0);
        for _ in 0..400 {
            let mut state = JsonPrefix::new();
            let mut text = String::new();
            for step in 0..300 {
                let late = rng.random_bool((step as f64 / 80.0).min(0.9));
                let mut options = if late {
                    allowed(&closers, state, &checker)
                } else {
                    vec![]
                };
                if options.is_empty() {
                    options = allowed(&pieces, state, &checker);
                }
                if options.is_empty() {
                    break;
                }
                let (piece, next) = options[rng.random_range(0..options.len())];
                text.push_str(piece);
                state = next;
                tokens += 1;
                if state.is_done() {
                    break;
                }
            }
            if state.is_done() {
                let value: Value = serde_json::from_str(&text).expect("a finished object parses");
                if depth(&value) <= SCHEMA_DEPTH {
                    assert!(validator.is_valid(&value), "{text}");
                    finished += 1;
                }
            }
        }
        assert!(
            finished >= 300,
            "{finished} of 400 walks finished ({tokens} tokens)"
        );
    }
}

/// A request's schema is read on a server thread: a chain of thousands of references, each
/// through an object, a union and an array, is read within a 2 MiB stack (a tokio worker's;
/// past 64 schemas deep the rest is free), and a large `enum` references lead to is held once.
#[test]
fn hostile_schemas_are_read_in_bounded_stack_and_memory() {
    let chain = |n: usize, link: &dyn Fn(usize) -> Value, end: Value| {
        let mut defs = serde_json::Map::new();
        for i in 0..n {
            defs.insert(format!("d{i}"), link(i + 1));
        }
        defs.insert(format!("d{n}"), end);
        json!({"properties": {"a": {"$ref": "#/$defs/d0"}}, "$defs": defs})
    };
    let next = |i: usize| format!("#/$defs/d{i}");
    let deep = chain(
        5000,
        &|i| {
            json!({"type": "object", "properties": {"x": {"anyOf": [
                {"type": "array", "items": {"$ref": next(i)}}, {"type": "null"}]}}})
        },
        json!({"type": "integer"}),
    );
    let read_on_small_stack = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || read(&deep).nodes.len())
        .unwrap()
        .join();
    assert!(read_on_small_stack.is_ok_and(|n| n <= 4100));

    let values: Vec<String> = (0..2000).map(|i| format!("value {i}")).collect();
    // 50 references in a row (within the depth read), each once a copy of the enum.
    let refs = chain(50, &|i| json!({"$ref": next(i)}), json!({"enum": values}));
    let s = read(&refs);
    let held: usize = s.nodes.iter().map(|n| n.one_of.len()).sum();
    assert_eq!(held, 2000);
    assert!(whole(&s, r#"{"a": "value 1999"}"#) && refused(&s, r#"{"a": "other"#));
}
