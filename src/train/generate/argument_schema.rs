//! What a forced call's arguments object may hold, read from the function's `parameters` schema:
//! its top-level keys, which are required, and each key's value type and `enum`/`const` values.

use serde_json::Value;

/// Value types, as bits: a key's `types` is the union of those its schema allows.
pub(super) const STRING: u8 = 1;
/// A JSON number without fraction or exponent.
pub(super) const INTEGER: u8 = 1 << 1;
/// Any JSON number, integers included.
pub(super) const NUMBER: u8 = 1 << 2;
pub(super) const BOOLEAN: u8 = 1 << 3;
pub(super) const NULL: u8 = 1 << 4;
pub(super) const OBJECT: u8 = 1 << 5;
pub(super) const ARRAY: u8 = 1 << 6;
pub(super) const ANY: u8 = (1 << 7) - 1;

/// The keys an arguments object may have: a function schema's `properties` names, sorted, which
/// of them are `required` (bit `i` for `names[i]`), and what each one's value may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentSchema {
    pub(super) names: Vec<String>,
    pub(super) required: u64,
    /// One per name.
    pub(super) values: Vec<ValueSchema>,
}

/// What one top-level value may be. Only its first byte and, for integers, its number are
/// checked against `types`; what is nested in it is free unless `one_of` spells it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ValueSchema {
    pub(super) types: u8,
    /// The `enum` (or `const`) values in serde_json's compact text, sorted; empty: any value.
    pub(super) one_of: Vec<String>,
}

impl ValueSchema {
    const FREE: Self = Self {
        types: ANY,
        one_of: Vec::new(),
    };
}

impl ArgumentSchema {
    /// The keys of a function's `parameters` schema, when it lists them: an object schema with
    /// `properties` that does not allow others (`additionalProperties` absent or false), at most
    /// 64 of them, each plain text (no quote, backslash or control character, so never escaped;
    /// shorter than 64 KiB, as the checker counts), and `required` naming only them. `None`
    /// otherwise: the object's keys and values are then free.
    ///
    /// `writable(types, text)`: whether the checker can write the listed value `text` as a value
    /// of `types` (it is [`super::json_prefix`]'s, passed in by `from_schema` there, so that this
    /// file does not import the checker that reads it).
    pub(super) fn read(schema: &Value, writable: &dyn Fn(u8, &str) -> bool) -> Option<Self> {
        if schema.get("type").is_some_and(|t| t != "object") {
            return None;
        }
        if schema
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false))
        {
            return None;
        }
        let properties = schema.get("properties")?.as_object()?;
        let mut names: Vec<String> = properties.keys().cloned().collect();
        names.sort();
        let plain = |n: &String| {
            n.len() < u16::MAX as usize && !n.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
        };
        if names.len() > 64 || !names.iter().all(plain) {
            return None;
        }
        let mut required = 0u64;
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let i = names.iter().position(|n| Some(n.as_str()) == r.as_str())?;
            required |= 1 << i;
        }
        let values = names
            .iter()
            .map(|n| value_schema(&properties[n], writable))
            .collect();
        Some(Self {
            names,
            required,
            values,
        })
    }

    pub(super) fn all(&self) -> u64 {
        match self.names.len() {
            64 => u64::MAX,
            n => (1 << n) - 1,
        }
    }

    /// Keys in `lo..hi`, as bits.
    pub(super) fn range(lo: u16, hi: u16) -> u64 {
        let below = |i: u16| if i >= 64 { u64::MAX } else { (1u64 << i) - 1 };
        below(hi) & !below(lo)
    }
}

/// The types a value beginning with `b` may have.
pub(super) fn types_beginning_with(b: u8) -> u8 {
    match b {
        b'"' => STRING,
        b'-' | b'0'..=b'9' => INTEGER | NUMBER,
        b't' | b'f' => BOOLEAN,
        b'n' => NULL,
        b'{' => OBJECT,
        b'[' => ARRAY,
        _ => 0,
    }
}

/// A property's `type` and `enum`/`const`. A property that combines schemas (`$ref`, `anyOf`,
/// `oneOf`, `allOf`) is free: following those is more than a byte-at-a-time check can hold, and
/// a sibling `type` may mean little beside a `$ref`. An unknown type name leaves the type free.
fn value_schema(p: &Value, writable: &dyn Fn(u8, &str) -> bool) -> ValueSchema {
    let combined = ["$ref", "anyOf", "oneOf", "allOf"];
    if !p.is_object() || combined.iter().any(|k| p.get(k).is_some()) {
        return ValueSchema::FREE;
    }
    let types = match p.get("type") {
        Some(Value::String(t)) => type_bits(t),
        Some(Value::Array(ts)) if !ts.is_empty() => ts
            .iter()
            .try_fold(0, |bits, t| Some(bits | type_bits(t.as_str()?)?)),
        _ => None,
    }
    .unwrap_or(ANY);
    let listed: Vec<&Value> = match (p.get("const"), p.get("enum").and_then(Value::as_array)) {
        (Some(c), Some(e)) => e.iter().filter(|v| *v == c).take(1).collect(),
        (Some(c), None) => vec![c],
        (None, Some(e)) => e.iter().collect(),
        (None, None) => vec![],
    };
    // The checker itself tells which listed values can be written as the type: one of another
    // type, or a number it cannot hold (1e300: three exponent digits), could never be finished.
    let writable = |t: &String| t.len() < u16::MAX as usize && writable(types, t);
    let mut one_of: Vec<String> = listed
        .into_iter()
        .map(Value::to_string)
        .filter(writable)
        .collect();
    one_of.sort();
    one_of.dedup();
    // None left (an empty enum, none of the type, none the checker can write) or more than the
    // checker counts: the type alone, rather than a key that can never be given a value.
    if one_of.len() >= u16::MAX as usize {
        one_of.clear();
    }
    ValueSchema { types, one_of }
}

fn type_bits(name: &str) -> Option<u8> {
    Some(match name {
        "string" => STRING,
        "integer" => INTEGER,
        "number" => NUMBER,
        "boolean" => BOOLEAN,
        "null" => NULL,
        "object" => OBJECT,
        "array" => ARRAY,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::json_prefix::JsonPrefix;
    use super::*;
    use serde_json::json;

    fn schema(properties: Value) -> ArgumentSchema {
        ArgumentSchema::from_schema(&json!({"type": "object", "properties": properties})).unwrap()
    }

    /// Whether `text` is a whole object that `s` allows, each of its prefixes allowed too.
    fn whole(s: &ArgumentSchema, text: &str) -> bool {
        let prefixes_pass = text
            .char_indices()
            .all(|(i, _)| JsonPrefix::new().after(&text[..i], Some(s)).is_some());
        let done = JsonPrefix::new()
            .after(text, Some(s))
            .is_some_and(|p| p.is_done());
        prefixes_pass && done
    }

    fn refused(s: &ArgumentSchema, text: &str) -> bool {
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
            (k.names.clone(), k.required),
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
    fn keys_without_type_or_values_and_nested_values_stay_free() {
        let s = schema(json!({
            "free": {"description": "anything"},
            "obj": {"type": "object", "properties": {"deep": {"type": "integer", "enum": [1]}}},
            "list": {"type": "array", "items": {"type": "integer"}},
            "n": {"type": "integer"},
        }));
        let ok = [
            r#"{"free": 1.5}"#,
            r#"{"free": "s"}"#,
            r#"{"free": [true, {"a": null}]}"#,
            r#"{"obj": {"deep": 2.5, "other": "x"}}"#,
            r#"{"list": [1.5, "x", {"y": 1e5}]}"#,
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
            "a": {"anyOf": [{"type": "string"}], "type": "string"},
            "o": {"oneOf": [{"enum": [1]}]},
            "l": {"allOf": [{"type": "string"}], "enum": ["x"]},
            "u": {"type": "date"},
            "t": {"type": ["string", "nope"]},
            "big": {"type": "number", "enum": [1e300, "x"]},
            "typed": {"type": "string", "enum": ["y", 1, "x", "x"]},
        }));
        let at = |n: &str| &s.values[s.names.iter().position(|k| k == n).unwrap()];
        for n in ["r", "a", "o", "l", "u", "t"] {
            assert_eq!(at(n), &ValueSchema::FREE, "{n}");
        }
        assert!(whole(&s, r#"{"r": 1, "o": 2, "l": "y", "t": null}"#));
        let big = at("big");
        assert_eq!(
            (big.types, big.one_of.len()),
            (NUMBER, 0),
            "1e300 cannot be written"
        );
        assert_eq!(at("typed").one_of, [r#""x""#, r#""y""#]);
    }
}
