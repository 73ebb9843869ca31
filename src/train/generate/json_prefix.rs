//! Whether a text can still grow into one JSON object (RFC 8259 syntax, no schema): a checker
//! fed a byte at a time whose whole state is two words, so that masking a vocabulary copies it
//! once per candidate token instead of re-reading the text.

/// Containers nest at most this deep (one bit each in `arrays`).
const MAX_DEPTH: u8 = 64;
/// The longest run of whitespace between tokens: enough for any indentation, and a model that
/// would write blanks for ever must write something else.
const MAX_BLANKS: u8 = 32;
const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JsonPrefix {
    /// Bit `i` set: the container at depth `i + 1` is an array, else an object.
    arrays: u64,
    depth: u8,
    /// Whitespace bytes just read between tokens.
    blanks: u8,
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

/// Where a number stands: after `-`, a leading `0`, integer digits, `.`, fraction digits, `e`,
/// the exponent's sign, exponent digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl JsonPrefix {
    pub(super) fn new() -> Self {
        Self {
            arrays: 0,
            depth: 0,
            blanks: 0,
            at: At::Start,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// The state after `text`, or `None` when no JSON object begins with what was read and it.
    pub(super) fn after(mut self, text: &str) -> Option<Self> {
        for b in text.bytes() {
            self = self.step(b)?;
        }
        Some(self)
    }

    fn step(mut self, b: u8) -> Option<Self> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let blanks = std::mem::take(&mut self.blanks);
        self.at = match self.at {
            At::Done => return None,
            At::Str { key, escaped, hex } => string(key, escaped, hex, b)?,
            At::Num(n) => match number(n, b) {
                Some(n) => At::Num(n),
                // A number ends at the first byte that cannot extend it, if it is whole.
                None if matches!(n, Num::Zero | Num::Int | Num::Frac | Num::Exp) => {
                    self.at = At::AfterValue;
                    return self.step(b);
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
            At::KeyOrEnd | At::Key if b == b'"' => At::Str {
                key: true,
                escaped: false,
                hex: 0,
            },
            At::KeyOrEnd if b == b'}' => return self.close(b),
            At::Colon if b == b':' => At::Value,
            At::ValueOrEnd if b == b']' => return self.close(b),
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
                b'1'..=b'9' => At::Num(Num::Int),
                b't' => At::Literal { which: 0, done: 1 },
                b'f' => At::Literal { which: 1, done: 1 },
                b'n' => At::Literal { which: 2, done: 1 },
                _ => return None,
            },
            At::AfterValue => match b {
                b',' if self.in_array() => At::Value,
                b',' => At::Key,
                b'}' | b']' => return self.close(b),
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

    fn close(mut self, closer: u8) -> Option<Self> {
        if (closer == b']') != self.in_array() {
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
    Some(if hex > 0 {
        if !b.is_ascii_hexdigit() {
            return None;
        }
        at(false, hex - 1)
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
        (Num::Minus, _) if digit => Num::Int,
        (Num::Int, _) if digit => Num::Int,
        (Num::Zero | Num::Int, b'.') => Num::Dot,
        (Num::Dot | Num::Frac, _) if digit => Num::Frac,
        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
        (Num::E, b'+' | b'-') => Num::ESign,
        (Num::E | Num::ESign | Num::Exp, _) if digit => Num::Exp,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Option<JsonPrefix> {
        JsonPrefix::new().after(text)
    }

    #[test]
    fn every_prefix_of_an_object_passes_and_only_the_whole_is_done() {
        let objects = [
            r#"{}"#,
            r#"{"city": "Oslo", "days": 3}"#,
            "{\n  \"a\": [1, -0.5, 2e10, 3.25E-2, true, false, null, [], {}],\n  \"b\": {\"c\": []}\n}",
            r#"{"s": "quote \" slash \\ \/ \b\f\n\r\t \u00e9 \uD83D\uDE00 é 😀"}"#,
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
            " x",
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
    }
}
