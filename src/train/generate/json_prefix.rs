//! Whether a text can still grow into one JSON object (RFC 8259 syntax), optionally with its
//! top-level keys drawn from a tool schema's `properties` and its `required` keys all present: a
//! checker fed a byte at a time whose whole state is a few words, so that masking a vocabulary
//! copies it once per candidate token instead of re-reading the text.

use serde_json::Value;

/// Containers nest at most this deep (one bit each in `arrays`).
const MAX_DEPTH: u8 = 64;
/// The longest run of whitespace between tokens: enough for any indentation, and a model that
/// would write blanks for ever must write something else.
const MAX_BLANKS: u8 = 32;
const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];
/// Numbers stay within what an f64 holds (below 1e300), so that every object written parses:
/// JSON itself has no bound, but a parser refuses what it cannot represent.
const MAX_INT_DIGITS: u8 = 200;
const MAX_EXP_DIGITS: u8 = 2;

/// The keys an arguments object may have: a function schema's `properties` names, sorted, and
/// which of them are `required` (bit `i` for `names[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKeys {
    names: Vec<String>,
    required: u64,
}

impl ObjectKeys {
    /// The keys of a function's `parameters` schema, when it lists them: an object schema with
    /// `properties` that does not allow others (`additionalProperties` absent or false), at most
    /// 64 of them, each plain text (no quote, backslash or control character, so never escaped),
    /// and `required` naming only them. `None` otherwise: the object's keys are then free.
    pub fn from_schema(schema: &Value) -> Option<Self> {
        if schema.get("type").is_some_and(|t| t != "object") {
            return None;
        }
        if schema
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false))
        {
            return None;
        }
        let mut names: Vec<String> = schema
            .get("properties")?
            .as_object()?
            .keys()
            .cloned()
            .collect();
        names.sort();
        let plain = |n: &String| !n.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
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
        Some(Self { names, required })
    }

    fn all(&self) -> u64 {
        match self.names.len() {
            64 => u64::MAX,
            n => (1 << n) - 1,
        }
    }

    /// Keys in `lo..hi`, as bits.
    fn range(lo: u8, hi: u8) -> u64 {
        let below = |i: u8| if i >= 64 { u64::MAX } else { (1u64 << i) - 1 };
        below(hi) & !below(lo)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JsonPrefix {
    /// Bit `i` set: the container at depth `i + 1` is an array, else an object.
    arrays: u64,
    depth: u8,
    /// Whitespace bytes just read between tokens.
    blanks: u8,
    /// In a top-level key, with [`ObjectKeys`]: the names `lo..hi` begin with its `off` bytes.
    key_lo: u8,
    key_hi: u8,
    key_off: u16,
    /// Top-level keys written, as bits over [`ObjectKeys`]' names.
    written: u64,
    at: At,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Before the object's `{`.
    Start,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    /// After a key.
    Colon,
    /// After `:`, or `,` in an array.
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After a value: `,` or the container's closer.
    AfterValue,
    /// In a string; `hex` counts the `\u` digits still due, `escaped` follows a backslash.
    Str {
        key: bool,
        escaped: bool,
        hex: u8,
    },
    Num(Num),
    /// `LITERALS[which]`, of which `done` bytes are written.
    Literal {
        which: u8,
        done: u8,
    },
    /// The object is closed: nothing may follow.
    Done,
}

/// Where a number stands: after `-`, a leading `0`, integer digits (so many), `.`, fraction
/// digits, `e`, the exponent's sign, exponent digits (so many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Frac,
    E,
    ESign,
    Exp(u8),
}

impl JsonPrefix {
    pub(super) fn new() -> Self {
        Self {
            arrays: 0,
            depth: 0,
            blanks: 0,
            key_lo: 0,
            key_hi: 0,
            key_off: 0,
            written: 0,
            at: At::Start,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// The state after `text`, or `None` when no JSON object (with `keys`, when given) begins
    /// with what was read and it.
    pub(super) fn after(mut self, text: &str, keys: Option<&ObjectKeys>) -> Option<Self> {
        for b in text.bytes() {
            self = self.step(b, keys)?;
        }
        Some(self)
    }

    fn step(mut self, b: u8, keys: Option<&ObjectKeys>) -> Option<Self> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let blanks = std::mem::take(&mut self.blanks);
        let top_keys = keys.filter(|_| self.depth == 1);
        if let (Some(k), At::Str { key: true, .. }) = (top_keys, self.at) {
            return self.key_byte(k, b);
        }
        self.at = match self.at {
            At::Done => return None,
            At::Str { key, escaped, hex } => string(key, escaped, hex, b)?,
            At::Num(n) => match number(n, b) {
                Some(n) => At::Num(n),
                // A number ends at the first byte that cannot extend it, if it is whole.
                None if matches!(n, Num::Zero | Num::Int(_) | Num::Frac | Num::Exp(_)) => {
                    self.at = At::AfterValue;
                    return self.step(b, keys);
                }
                None => return None,
            },
            At::Literal { which, done } => {
                let lit = LITERALS[which as usize];
                if lit[done as usize] != b {
                    return None;
                }
                if done as usize + 1 == lit.len() {
                    At::AfterValue
                } else {
                    At::Literal {
                        which,
                        done: done + 1,
                    }
                }
            }
            // The object follows its frame directly (the frame ends in its own blank).
            At::Start => return (b == b'{').then(|| self.open(false)).flatten(),
            _ if ws && blanks < MAX_BLANKS => {
                self.blanks = blanks + 1;
                self.at
            }
            At::KeyOrEnd | At::Key if b == b'"' => {
                if let Some(k) = top_keys {
                    if k.all() & !self.written == 0 {
                        return None;
                    }
                    (self.key_lo, self.key_hi, self.key_off) = (0, k.names.len() as u8, 0);
                }
                At::Str {
                    key: true,
                    escaped: false,
                    hex: 0,
                }
            }
            At::KeyOrEnd if b == b'}' => return self.close(b, top_keys),
            At::Colon if b == b':' => At::Value,
            At::ValueOrEnd if b == b']' => return self.close(b, top_keys),
            At::Value | At::ValueOrEnd => match b {
                b'"' => At::Str {
                    key: false,
                    escaped: false,
                    hex: 0,
                },
                b'{' => return self.open(false),
                b'[' => return self.open(true),
                b'-' => At::Num(Num::Minus),
                b'0' => At::Num(Num::Zero),
                b'1'..=b'9' => At::Num(Num::Int(1)),
                b't' => At::Literal { which: 0, done: 1 },
                b'f' => At::Literal { which: 1, done: 1 },
                b'n' => At::Literal { which: 2, done: 1 },
                _ => return None,
            },
            At::AfterValue => match b {
                b',' if self.in_array() => At::Value,
                // A comma promises a key: one must be left to write.
                b',' if top_keys.is_some_and(|k| k.all() & !self.written == 0) => return None,
                b',' => At::Key,
                b'}' | b']' => return self.close(b, top_keys),
                _ => return None,
            },
            At::KeyOrEnd | At::Key | At::Colon => return None,
        };
        Some(self)
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.arrays & (1 << (self.depth - 1)) != 0
    }

    fn open(mut self, array: bool) -> Option<Self> {
        if self.depth == MAX_DEPTH {
            return None;
        }
        if array {
            self.arrays |= 1 << self.depth;
        } else {
            self.arrays &= !(1 << self.depth);
        }
        self.depth += 1;
        self.at = if array { At::ValueOrEnd } else { At::KeyOrEnd };
        Some(self)
    }

    /// A byte of a top-level key: it must go on spelling a name not yet written, or end one.
    fn key_byte(mut self, k: &ObjectKeys, b: u8) -> Option<Self> {
        let (lo, hi, off) = (self.key_lo, self.key_hi, self.key_off as usize);
        if b == b'"' {
            // Sorted, a name that is exactly the prefix comes first in the range.
            let done = k.names[lo as usize].len() == off && self.written & (1 << lo) == 0;
            if !done {
                return None;
            }
            self.written |= 1 << lo;
            self.at = At::Colon;
            return Some(self);
        }
        let matches = |i: &u8| k.names[*i as usize].as_bytes().get(off) == Some(&b);
        let new_lo = (lo..hi).find(matches)?;
        let new_hi = (new_lo..hi).rfind(matches)? + 1;
        if ObjectKeys::range(new_lo, new_hi) & !self.written == 0 {
            return None;
        }
        (self.key_lo, self.key_hi, self.key_off) = (new_lo, new_hi, off as u16 + 1);
        Some(self)
    }

    fn close(mut self, closer: u8, top_keys: Option<&ObjectKeys>) -> Option<Self> {
        if (closer == b']') != self.in_array() {
            return None;
        }
        if top_keys.is_some_and(|k| k.required & !self.written != 0) {
            return None;
        }
        self.depth -= 1;
        self.at = if self.depth == 0 {
            At::Done
        } else {
            At::AfterValue
        };
        Some(self)
    }
}

fn string(key: bool, escaped: bool, hex: u8, b: u8) -> Option<At> {
    let at = |escaped, hex| At::Str { key, escaped, hex };
    // `hex`: 4 to 1 digits of a `\u` escape still due; `SURROGATE` after `\uD`, where only
    // 0-7 may follow: a parser refuses an unpaired surrogate, and characters beyond the basic
    // plane can be written as themselves.
    const SURROGATE: u8 = 5;
    Some(if hex == SURROGATE {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        at(false, 2)
    } else if hex > 0 {
        if !b.is_ascii_hexdigit() {
            return None;
        }
        if hex == 4 && b.eq_ignore_ascii_case(&b'd') {
            at(false, SURROGATE)
        } else {
            at(false, hex - 1)
        }
    } else if escaped {
        match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at(false, 0),
            b'u' => at(false, 4),
            _ => return None,
        }
    } else {
        match b {
            b'"' if key => At::Colon,
            b'"' => At::AfterValue,
            b'\\' => at(true, 0),
            0..=0x1f => return None,
            _ => at(false, 0),
        }
    })
}

fn number(n: Num, b: u8) -> Option<Num> {
    let digit = b.is_ascii_digit();
    Some(match (n, b) {
        (Num::Minus, b'0') => Num::Zero,
        (Num::Minus, _) if digit => Num::Int(1),
        (Num::Int(n), _) if digit && n < MAX_INT_DIGITS => Num::Int(n + 1),
        (Num::Zero | Num::Int(_), b'.') => Num::Dot,
        (Num::Dot | Num::Frac, _) if digit => Num::Frac,
        (Num::Zero | Num::Int(_) | Num::Frac, b'e' | b'E') => Num::E,
        (Num::E, b'+' | b'-') => Num::ESign,
        (Num::E | Num::ESign, _) if digit => Num::Exp(1),
        (Num::Exp(n), _) if digit && n < MAX_EXP_DIGITS => Num::Exp(n + 1),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let blanks = |n| format!("{{\"a\":{}1}}", " ".repeat(n));
        assert!(check(&blanks(32)).unwrap().is_done());
        assert_eq!(check(&blanks(33)), None, "blanks are bounded");
        assert!(check("{\"a\": \"                                           \"}").is_some());
    }

    #[test]
    fn with_keys_only_listed_keys_once_each_and_every_required_one() {
        let schema = serde_json::json!({"type": "object", "required": ["city", "a"],
            "properties": {"city": {}, "days": {}, "a": {}, "ab": {}}});
        let k = ObjectKeys::from_schema(&schema).unwrap();
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
            assert_eq!(ObjectKeys::from_schema(&s), None, "{s}");
        }
        let listed =
            serde_json::json!({"properties": {"b": {}, "a": {}}, "additionalProperties": false});
        let k = ObjectKeys::from_schema(&listed).unwrap();
        assert_eq!(
            (k.names.clone(), k.required),
            (vec!["a".into(), "b".into()], 0)
        );
        let none = serde_json::json!({"type": "object", "properties": {}});
        let k = ObjectKeys::from_schema(&none).unwrap();
        assert!(JsonPrefix::new().after("{}", Some(&k)).unwrap().is_done());
        assert_eq!(
            JsonPrefix::new().after("{\"", Some(&k)),
            None,
            "no key to write"
        );
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
}
