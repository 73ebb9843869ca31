//! The JSON prefix checker on objects, prefixes and bytes no object may hold: syntax, bounds,
//! UTF-8, and the keys, types and listed values an argument schema asks for.

use super::json_prefix::*;

fn check(text: &str) -> Option<JsonPrefix> {
    JsonPrefix::new().after(text, None)
}

#[test]
fn every_prefix_of_an_object_passes_and_only_the_whole_is_done() {
    let objects = [
        r#"{}"#,
        r#"{"city": "Oslo", "days": 3}"#,
        "{\n  \"a\": [1, -0.5, 2e10, 3.25E-2, true, false, null, [], {}],\n  \"b\": {\"c\": []}\n}",
        r#"{"s": "quote \" slash \\ \/ \b\f\n\r\t \u00e9 \uD7FF \uE000 é 😀"}"#,
        r#"{"n":0,"m":-12,"k":[[[{"x":[0.0]}]]]}"#,
    ];
    for o in objects {
        serde_json::from_str::<serde_json::Value>(o).expect("a valid object");
        for (i, _) in o.char_indices().skip(1) {
            let p = check(&o[..i]).unwrap_or_else(|| panic!("{:?} refused", &o[..i]));
            assert!(!p.is_done(), "{:?} is not whole", &o[..i]);
        }
        assert!(check(o).unwrap().is_done(), "{o}");
        assert_eq!(check(&format!("{o} ")), None, "nothing after the object");
    }
}

#[test]
fn what_no_json_object_begins_with_is_refused() {
    let bad = [
        "[",
        "\"a\"",
        "1",
        " {",
        "{a",
        "{\"a\" 1",
        "{\"a\":}",
        "{\"a\":1,}",
        "{\"a\":01",
        "{\"a\":-}",
        "{\"a\":1.}",
        "{\"a\":1e}",
        "{\"a\":.5",
        "{\"a\":tru}",
        "{\"a\":nul ",
        "{\"a\":[1,]",
        "{\"a\":[}",
        "{\"a\":{]",
        "{\"a\":\"\\x\"",
        "{\"a\":\"\\u12g",
        "{\"a\":\"line\nbreak\"",
        "{,",
        "{\"a\":\"\\uD83D",
        "{\"a\":\"\\udc00",
        "{\"a\"::",
        "{\"a\":1 2",
    ];
    for b in bad {
        assert_eq!(check(b), None, "{b:?} accepted");
    }
    assert!(check(&format!("{}{}", "{\"a\":".repeat(63), "1")).is_some());
    assert_eq!(check(&"{\"a\":".repeat(65)), None, "nesting is bounded");
    for gap in ["", " ", "\t", "\n", "\n    ", "\n\t"] {
        let text = format!("{{\"a\":{gap}1}}");
        assert!(check(&text).unwrap().is_done(), "{text:?} refused");
    }
    for gap in ["  ", " \n", "\n\n", "\r\n", "\n     ", "\t "] {
        let text = format!("{{\"a\":{gap}1}}");
        assert_eq!(check(&text), None, "{text:?} accepted: blanks are bounded");
    }
    assert!(check("{\"a\": \"                                           \"}").is_some());
}

/// Blanks between tokens as serializers write them pass at every depth (compact, Python's
/// separators, pretty-printed with 2 or 4 spaces or tabs); longer runs, blank lines and
/// indentation past four bytes per open container do not.
#[test]
fn blanks_are_what_serializers_write_and_no_more() {
    use serde::Serialize;
    use serde_json::ser::{PrettyFormatter, Serializer};
    let value =
        serde_json::json!({"a": [1, {"b": [true, null, "x y"]}], "c": {"d": {"e": [[2.5]]}}});
    let pretty = |indent: &[u8]| {
        let mut out = Vec::new();
        let mut ser = Serializer::with_formatter(&mut out, PrettyFormatter::with_indent(indent));
        value.serialize(&mut ser).unwrap();
        String::from_utf8(out).unwrap()
    };
    let python = r#"{"a": [1, {"b": [true, null, "x y"]}], "c": {"d": {"e": [[2.5]]}}}"#;
    for text in [
        value.to_string(),
        python.to_string(),
        pretty(b"  "),
        pretty(b"    "),
        pretty(b"\t"),
    ] {
        let p = check(&text).unwrap_or_else(|| panic!("{text:?} refused"));
        assert!(p.is_done(), "{text:?}");
    }
    // Three containers open: up to twelve bytes of indentation.
    let deep = |indent: usize| format!("{{\"a\": {{\"b\": [\n{}1]}}}}", " ".repeat(indent));
    assert!(check(&deep(12)).unwrap().is_done());
    assert_eq!(
        check(&deep(13)),
        None,
        "indentation is bounded by the depth"
    );
    assert_eq!(
        check("{\"a\":\n        1}"),
        None,
        "one container: four bytes"
    );
}

/// Strings hold whole, valid UTF-8 characters, however the bytes come: a character split
/// over tokens goes on, a quote inside one, an overlong form, a surrogate or a code point
/// past U+10FFFF does not.
#[test]
fn strings_hold_only_valid_utf8() {
    let open = JsonPrefix::new().after("{\"a\": \"", None).unwrap();
    let bytes = |b: &[u8]| open.after_bytes(b, None);
    let east = "東".as_bytes();
    let split = bytes(&east[..1]).and_then(|p| p.after_bytes(&east[1..], None));
    assert_eq!(split, bytes(east));
    assert!(bytes(east).unwrap().plain_text(None).is_some());
    assert!(bytes(&east[..2]).unwrap().plain_text(None).is_none());
    assert!(
        bytes(&[east[0], b'"']).is_none(),
        "a quote inside a character"
    );
    assert!(bytes(&east[1..]).is_none(), "a continuation without a lead");
    for bad in [
        &[0xC0, 0x80][..],
        &[0xC1, 0xBF],
        &[0xE0, 0x80, 0x80],
        &[0xED, 0xA0, 0x80],
        &[0xF0, 0x80, 0x80, 0x80],
        &[0xF4, 0x90, 0x80, 0x80],
        &[0xF5, 0x80, 0x80, 0x80],
        &[0xFF],
    ] {
        assert!(bytes(bad).is_none(), "{bad:x?}");
    }
    for good in ["é", "東京", "😀", "\u{10FFFF}", "\u{E000}", "\u{D7FF}"] {
        let whole = bytes(good.as_bytes()).and_then(|p| p.after("\"}", None));
        assert!(whole.is_some_and(|p| p.is_done()), "{good:?}");
    }
}

#[test]
fn numbers_end_at_the_first_byte_that_cannot_extend_them() {
    for (text, done) in [
        ("{\"a\":10}", true),
        ("{\"a\":-0}", true),
        ("{\"a\":1.5e+3}", true),
        ("{\"a\":[0,1]}", true),
        ("{\"a\":12", false),
    ] {
        assert_eq!(check(text).map(|p| p.is_done()), Some(done), "{text}");
    }
    // Bounded so that a parser can hold every number written.
    let big = format!("{{\"a\": -{}.5e-99}}", "9".repeat(200));
    serde_json::from_str::<serde_json::Value>(&big).unwrap();
    assert!(check(&big).unwrap().is_done());
    assert_eq!(check(&format!("{{\"a\": {}", "9".repeat(201))), None);
    assert_eq!(check("{\"a\": 1e100"), None);
}
