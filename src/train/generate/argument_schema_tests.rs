//! The argument schema as the checker reads it: listed keys, required ones, value types and
//! listed values at the top level (this file) and nested (`nested_schema_tests.rs`).

use super::argument_schema::*;
use super::json_prefix::JsonPrefix;
use serde_json::{json, Value};

/// The top-level keys.
pub(super) fn top(s: &ArgumentSchema) -> &Keys {
    s.nodes[s.root as usize].keys.as_ref().unwrap()
}

/// The node of the top-level key `name`.
pub(super) fn node<'a>(s: &'a ArgumentSchema, name: &str) -> &'a ValueSchema {
    let keys = top(s);
    let i = keys.names.iter().position(|k| k == name).unwrap();
    &s.nodes[keys.values[i] as usize]
}

pub(super) fn schema(properties: Value) -> ArgumentSchema {
    ArgumentSchema::from_schema(&json!({"type": "object", "properties": properties})).unwrap()
}

/// Whether `text` is a whole object that `s` allows, each of its prefixes allowed too.
pub(super) fn whole(s: &ArgumentSchema, text: &str) -> bool {
    let prefixes_pass = text
        .char_indices()
        .all(|(i, _)| JsonPrefix::new().after(&text[..i], Some(s)).is_some());
    let done = JsonPrefix::new()
        .after(text, Some(s))
        .is_some_and(|p| p.is_done());
    prefixes_pass && done
}

pub(super) fn refused(s: &ArgumentSchema, text: &str) -> bool {
    JsonPrefix::new().after(text, Some(s)).is_none()
}

#[test]
fn with_keys_only_listed_keys_once_each_and_every_required_one() {
    let schema = serde_json::json!({"type": "object", "required": ["city", "a"],
        "properties": {"city": {}, "days": {}, "a": {}, "ab": {}}});
    let k = ArgumentSchema::from_schema(&schema).unwrap();
    let check = |t: &str| JsonPrefix::new().after(t, Some(&k));
    let whole = [
        r#"{"city": "Oslo", "a": 1}"#,
        r#"{"a": 1, "ab": [2], "days": 3, "city": {"free": {"x": 1}}}"#,
        r#"{"ab": 1, "a": 2, "city": "c"}"#,
    ];
    for o in whole {
        for (i, _) in o.char_indices().skip(1) {
            assert!(check(&o[..i]).is_some(), "{:?} refused", &o[..i]);
        }
        assert!(check(o).unwrap().is_done(), "{o}");
    }
    let refused = [
        r#"{"town"#,                                  // not a listed key
        r#"{"cityx"#,                                 // a listed key and more
        r#"{"cit":"#,                                 // a listed key's prefix
        r#"{"a": 1, "a""#,                            // a key twice
        r#"{"a\u0062"#,                               // escaped (keys never are)
        r#"{}"#,                                      // required keys missing
        r#"{"city": 1}"#,                             // "a" missing
        r#"{"city": 1, "days": 2, "a": 3, "ab": 4,"#, // no key left for the comma
    ];
    for r in refused {
        assert_eq!(check(r), None, "{r} accepted");
    }
    // Nested objects are free; a written key's prefix is refused once no listed key can
    // follow it (here "ab" is left, so "a" still leads somewhere).
    assert!(check(r#"{"a": 1, "a"#).is_some());
    assert!(check(r#"{"a": 1, "ab": 2, "a"#).is_none());
}

#[test]
fn schemas_that_do_not_list_their_keys_leave_them_free() {
    let free = [
        serde_json::json!({"type": "object"}),
        serde_json::json!({"type": "array", "properties": {"a": {}}}),
        serde_json::json!({"properties": {"a": {}}, "additionalProperties": true}),
        serde_json::json!({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}),
        serde_json::json!({"properties": {"a\"b": {}}}),
        serde_json::json!({"properties": {"a": {}}, "required": ["b"]}),
    ];
    for s in free {
        assert_eq!(ArgumentSchema::from_schema(&s), None, "{s}");
    }
    let listed =
        serde_json::json!({"properties": {"b": {}, "a": {}}, "additionalProperties": false});
    let k = ArgumentSchema::from_schema(&listed).unwrap();
    assert_eq!(
        (top(&k).names.clone(), top(&k).required),
        (vec!["a".into(), "b".into()], 0)
    );
    let none = serde_json::json!({"type": "object", "properties": {}});
    let k = ArgumentSchema::from_schema(&none).unwrap();
    assert!(JsonPrefix::new().after("{}", Some(&k)).unwrap().is_done());
    assert_eq!(
        JsonPrefix::new().after("{\"", Some(&k)),
        None,
        "no key to write"
    );
}

#[test]
fn each_type_takes_values_of_its_own_kind_only() {
    let values = [
        ("string", r#""Oslo""#),
        ("integer", "-12"),
        ("number", "2.5e-3"),
        ("boolean", "false"),
        ("null", "null"),
        ("object", r#"{"x": [1, "y"]}"#),
        ("array", r#"[1, {"z": null}]"#),
    ];
    for (ty, _) in values {
        let s = schema(json!({"v": {"type": ty}}));
        for (other, text) in values {
            let o = format!("{{\"v\": {text}}}");
            let fits = other == ty || (ty == "number" && other == "integer");
            assert_eq!(whole(&s, &o), fits, "type {ty}: {o}");
        }
    }
    let s = schema(json!({"v": {"type": "boolean"}}));
    assert!(whole(&s, r#"{"v": true}"#));
    let s = schema(json!({"v": {"type": ["string", "null"]}}));
    assert!(whole(&s, r#"{"v": "x"}"#) && whole(&s, r#"{"v": null}"#));
    assert!(refused(&s, r#"{"v": 1"#) && refused(&s, r#"{"v": t"#));
    let s = schema(json!({"v": {"type": ["integer", "string"]}}));
    assert!(whole(&s, r#"{"v": 7}"#) && refused(&s, r#"{"v": 7.5"#));
}

#[test]
fn integers_take_no_fraction_or_exponent() {
    let s = schema(json!({"n": {"type": "integer"}, "x": {"type": "number"}}));
    for ok in [r#"{"n": 0}"#, r#"{"n":-0 }"#, r#"{"n": 120, "x": 1.5E+2}"#] {
        assert!(whole(&s, ok), "{ok}");
    }
    let bad = [
        r#"{"n": 1."#,
        r#"{"n": 1e"#,
        r#"{"n": 1E"#,
        r#"{"n": 0.5"#,
        r#"{"n": -0e"#,
    ];
    for b in bad {
        assert!(refused(&s, b), "{b}");
    }
}

#[test]
fn listed_values_are_written_exactly_and_whole() {
    let s = schema(json!({
        "unit": {"type": "string", "enum": ["a", "ab", "daily"]},
        "n": {"enum": [1, 10, -2.5]},
        "any": {"enum": [true, null, {"x": [1, "y"]}, [2]]},
    }));
    let ok = [
        r#"{"unit": "a"}"#,
        r#"{"unit":"ab"}"#,
        r#"{"unit": "daily", "n": 10}"#,
        r#"{"n": 1 , "unit": "a"}"#,
        r#"{"n":1,"unit":"ab"}"#,
        r#"{"n":-2.5}"#,
        r#"{"any": true}"#,
        r#"{"any": null}"#,
        r#"{"any": {"x":[1,"y"]}}"#,
        r#"{"any": [2]}"#,
    ];
    for o in ok {
        assert!(whole(&s, o), "{o}");
    }
    let bad = [
        r#"{"unit": "abc"#,
        r#"{"unit": "b"#,
        r#"{"unit": "d""#,
        r#"{"unit": "\u0061"#,
        r#"{"unit": 1"#,
        r#"{"n": 2"#,
        r#"{"n": 100"#,
        r#"{"n": 1.0"#,
        r#"{"n": -2}"#,
        r#"{"n": "1"#,
        r#"{"any": false"#,
        r#"{"any": {"x": [1"#, // serde_json's compact text only
        r#"{"any": [2,"#,
        r#"{"any": [2]]"#,
    ];
    for b in bad {
        assert!(refused(&s, b), "{b}");
    }
}

#[test]
fn a_const_is_the_one_value_and_with_an_enum_must_be_in_it() {
    let s = schema(json!({
        "c": {"const": "fixed"},
        "d": {"const": 3, "enum": [3, 4]},
        "e": {"type": "string", "const": 5, "enum": [3]},
    }));
    assert!(whole(&s, r#"{"c": "fixed", "d": 3}"#));
    for b in [
        r#"{"c": "fixe""#,
        r#"{"c": "fixed!"#,
        r#"{"d": 4"#,
        r#"{"d": 30"#,
    ] {
        assert!(refused(&s, b), "{b}");
    }
    // No value can be both: the type alone is kept, so that the key can still be written.
    assert!(whole(&s, r#"{"e": "anything"}"#));
    assert!(refused(&s, r#"{"e": 5"#));
}

#[test]
fn keys_without_type_or_values_stay_free() {
    let s = schema(json!({"free": {"description": "anything"}, "n": {"type": "integer"}}));
    let ok = [
        r#"{"free": 1.5}"#,
        r#"{"free": "s"}"#,
        r#"{"free": [true, {"a": null}]}"#,
        r#"{"n": 3, "free": {"n": 0.5}}"#,
    ];
    for o in ok {
        assert!(whole(&s, o), "{o}");
    }
}

#[test]
fn with_values_keys_are_still_listed_once_each_and_required() {
    let s = ArgumentSchema::from_schema(&json!({"required": ["unit"],
        "properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": "integer"}}}))
    .unwrap();
    assert!(whole(&s, r#"{"n": 2, "unit": "f"}"#));
    let bad = [
        r#"{"n": 2}"#,
        r#"{"unit": "c", "unit""#,
        r#"{"unit": "c", "m"#,
        r#"{"n": 2, "unit": "f","#,
    ];
    for b in bad {
        assert!(refused(&s, b), "{b}");
    }
}

#[test]
fn combined_schemas_and_values_that_cannot_be_written_leave_the_value_free() {
    let s = schema(json!({
        "r": {"$ref": "#/$defs/x", "type": "string"},
        "a": {"anyOf": [{"type": "integer"}, {"type": "number"}]},
        "o": {"oneOf": [{"enum": [1]}]},
        "l": {"allOf": [{"type": "string"}], "enum": ["x"]},
        "u": {"type": "date"},
        "t": {"type": ["string", "nope"]},
        "big": {"type": "number", "enum": [1e300, "x"]},
        "typed": {"type": "string", "enum": ["y", 1, "x", "x"]},
    }));
    let at = |n: &str| node(&s, n);
    for n in ["r", "a", "o", "l", "u", "t"] {
        assert_eq!(at(n), &ValueSchema::FREE, "{n}");
    }
    assert!(whole(
        &s,
        r#"{"r": 1, "o": 2, "l": "y", "t": null, "a": 1.5}"#
    ));
    let big = at("big");
    assert_eq!(
        (big.types, big.one_of.len()),
        (NUMBER, 0),
        "1e300 cannot be written"
    );
    assert_eq!(at("typed").one_of, [r#""x""#, r#""y""#]);
}

/// `minLength` and `maxLength` count characters (code points): a multi-byte character or an
/// escape is one; a string closes only once it has its minimum and takes no character past its
/// maximum; bounds no string meets, or on keys, are not followed.
#[test]
fn a_strings_length_keeps_to_its_bounds_in_characters() {
    let s = schema(json!({
        "code": {"type": "string", "minLength": 2, "maxLength": 4},
        "empty": {"type": "string", "maxLength": 0},
        "odd": {"type": "string", "minLength": 5, "maxLength": 1},
        "list": {"type": "array", "items": {"type": "string", "maxLength": 1}},
    }));
    assert_eq!(
        (node(&s, "code").min_chars, node(&s, "code").max_chars),
        (2, 4)
    );
    assert_eq!(
        (node(&s, "odd").min_chars, node(&s, "odd").max_chars),
        (0, UNBOUNDED)
    );
    for ok in [
        r#"{"code": "ab"}"#,
        r#"{"code": "abcd"}"#,
        r#"{"code": "東京都"}"#,
        r#"{"code": "\n\u00e9é😀"}"#,
        r#"{"empty": ""}"#,
        r#"{"odd": "anything at all"}"#,
        r#"{"list": ["a", "", "😀"], "code": "ab"}"#,
    ] {
        assert!(whole(&s, ok), "{ok}");
    }
    for bad in [
        r#"{"code": "a""#,
        r#"{"code": """#,
        r#"{"code": "abcde"#,
        r#"{"code": "東京都大阪"#,
        r#"{"code": "ab\n\t\""#,
        r#"{"empty": "a"#,
        r#"{"list": ["ab"#,
    ] {
        assert!(refused(&s, bad), "{bad}");
    }
    // Past a bounded string, the next one is free again.
    assert!(whole(&s, r#"{"code": "ab", "odd": "", "list": []}"#));
}

/// `minItems` and `maxItems` bound an array's elements: a comma only where another element is
/// allowed, the closer only once the minimum is written, at any depth the schema follows;
/// bounds nothing meets are not followed.
#[test]
fn an_arrays_element_count_keeps_to_its_bounds() {
    let s = schema(json!({
        "pair": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer"}},
        "none": {"type": "array", "maxItems": 0},
        "some": {"type": "array", "minItems": 1},
        "odd": {"type": "array", "minItems": 3, "maxItems": 1},
        "grid": {"type": "array", "maxItems": 2,
            "items": {"type": "array", "minItems": 1, "maxItems": 1}},
    }));
    assert_eq!(
        (node(&s, "pair").min_items, node(&s, "pair").max_items),
        (2, 3)
    );
    assert_eq!(
        (node(&s, "odd").min_items, node(&s, "odd").max_items),
        (0, UNBOUNDED)
    );
    for ok in [
        r#"{"pair": [1, 2]}"#,
        r#"{"pair": [1, 2, 3]}"#,
        r#"{"none": []}"#,
        r#"{"some": [{"a": [1, 2]}]}"#,
        r#"{"odd": []}"#,
        r#"{"odd": [1, 2, 3, 4, 5]}"#,
        r#"{"grid": [[1], ["x"]], "pair": [0, 0]}"#,
    ] {
        assert!(whole(&s, ok), "{ok}");
    }
    for bad in [
        r#"{"pair": []"#,
        r#"{"pair": [1]"#,
        r#"{"pair": [1, 2, 3,"#,
        r#"{"none": [1"#,
        r#"{"some": []"#,
        r#"{"grid": [[]"#,
        r#"{"grid": [[1,"#,
        r#"{"grid": [[1], [2],"#,
    ] {
        assert!(refused(&s, bad), "{bad}");
    }
}

/// An integer's `minimum` and `maximum` (and their exclusive forms, draft 4's too): every
/// prefix written can still become an integer within them, and a number ends only within them.
#[test]
fn an_integers_value_keeps_to_its_bounds() {
    let s = schema(json!({
        "n": {"type": "integer", "minimum": 5, "maximum": 120},
        "t": {"type": "integer", "minimum": -40, "exclusiveMaximum": -4},
        "p": {"type": "integer", "exclusiveMinimum": 0},
        "d4": {"type": "integer", "minimum": 0, "exclusiveMinimum": true, "maximum": 2.5},
        "odd": {"type": "integer", "minimum": 3, "maximum": 2},
        "listed": {"type": "integer", "enum": [1, 500], "maximum": 10},
        "list": {"type": "array", "items": {"type": "integer", "maximum": 0}},
    }));
    assert_eq!((node(&s, "n").min_int, node(&s, "n").max_int), (5, 120));
    assert_eq!((node(&s, "t").min_int, node(&s, "t").max_int), (-40, -5));
    assert_eq!((node(&s, "d4").min_int, node(&s, "d4").max_int), (1, 2));
    assert_eq!(node(&s, "odd").min_int, i64::MIN);
    for ok in [
        r#"{"n": 5}"#,
        r#"{"n": 12}"#,
        r#"{"n": 120}"#,
        r#"{"t": -40}"#,
        r#"{"t": -5}"#,
        r#"{"t": -13}"#,
        r#"{"p": 1}"#,
        r#"{"p": 9223372036854775807}"#,
        r#"{"d4": 2}"#,
        r#"{"odd": -7}"#,
        r#"{"listed": 500}"#,
        r#"{"list": [0, -3, -0, -12345678901234567890]}"#,
    ] {
        assert!(whole(&s, ok), "{ok}");
    }
    for bad in [
        r#"{"n": 4}"#,
        r#"{"n": 121"#,
        r#"{"n": 3}"#,
        r#"{"n": 130"#,
        r#"{"n": 0"#,
        r#"{"n": -"#,
        r#"{"t": -4}"#,
        r#"{"t": -41"#,
        r#"{"t": -0"#,
        r#"{"t": 1"#,
        r#"{"p": 0"#,
        r#"{"p": -"#,
        r#"{"d4": 3"#,
        r#"{"list": [1"#,
    ] {
        assert!(refused(&s, bad), "{bad}");
    }
}

/// The integer bounds are exact: a prefix passes exactly when some integer within the bounds is
/// written so, and a number ends exactly on one (every text over `-0123456789` up to 4 bytes,
/// against the texts of every integer within the bounds).
#[test]
fn an_integer_prefix_passes_exactly_when_an_integer_within_bounds_begins_so() {
    let alphabet = b"-0123456789";
    let mut texts = vec![String::new()];
    for _ in 0..4 {
        let longer: Vec<String> = texts
            .iter()
            .filter(|t| t.len() == texts.last().unwrap().len())
            .flat_map(|t| alphabet.iter().map(move |&b| format!("{t}{}", b as char)))
            .collect();
        texts.extend(longer);
    }
    let bounds = [
        (5, 120),
        (-40, -5),
        (0, 0),
        (-3, 17),
        (100, 100),
        (-1, 1),
        (-999, -998),
    ];
    for (lo, hi) in bounds
        .into_iter()
        .chain([(19, 19), (-19, -19), (-100, -91)])
    {
        let s = schema(json!({"n": {"type": "integer", "minimum": lo, "maximum": hi}}));
        let mut written: Vec<String> = (lo..=hi).map(|i: i64| i.to_string()).collect();
        if (lo..=hi).contains(&0) {
            written.push("-0".into()); // JSON's other spelling of 0
        }
        for t in texts.iter().filter(|t| !t.is_empty()) {
            let begins = written.iter().any(|w| w.starts_with(t.as_str()));
            let passes = !refused(&s, &format!("{{\"n\": {t}"));
            assert_eq!(passes, begins, "{t:?} within {lo}..={hi}");
            let ends = written.contains(t);
            assert_eq!(
                whole(&s, &format!("{{\"n\": {t}}}")),
                ends,
                "{t:?}, whole, within {lo}..={hi}"
            );
        }
    }
}
