//! Whether a text can still grow into one JSON object (RFC 8259 syntax), optionally one that an
//! [`ArgumentSchema`] allows (listed top-level keys, the required ones, each top-level value's
//! type and listed values): a checker fed a byte at a time whose whole state is a few words, so
//! that masking a vocabulary copies it once per candidate token instead of re-reading the text.

use super::argument_schema::{types_beginning_with, ArgumentSchema, ValueSchema, NUMBER};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JsonPrefix {
    /// Bit `i` set: the container at depth `i + 1` is an array, else an object.
    arrays: u64,
    /// Top-level keys written, as bits over the [`ArgumentSchema`]'s names.
    written: u64,
    depth: u8,
    /// Whitespace bytes just read between tokens.
    blanks: u8,
    /// With an [`ArgumentSchema`]: in a top-level key, the names it may still become; after
    /// the key, `key.lo` is its index, so the value knows its schema.
    key: Spelling,
    /// In a top-level value whose key lists its values: those it may still become; else none.
    value: Spelling,
    at: At,
}

// The vocabulary mask copies the state once per candidate token: it must stay a few words.
const _: () = assert!(std::mem::size_of::<JsonPrefix>() <= 40);

/// Among sorted texts, those (`lo..hi`) that begin with the `off` bytes read. Sorted, the texts
/// that share a prefix are a range, and one that is exactly the prefix comes first in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spelling {
    lo: u16,
    hi: u16,
    off: u16,
}

impl Spelling {
    const NONE: Self = Self {
        lo: 0,
        hi: 0,
        off: 0,
    };

    fn all(texts: &[String]) -> Self {
        Self {
            lo: 0,
            hi: texts.len() as u16,
            off: 0,
        }
    }

    fn is_open(self) -> bool {
        self.lo < self.hi
    }

    /// Those that go on with `b`, if any.
    fn narrow(self, texts: &[String], b: u8) -> Option<Self> {
        let off = self.off as usize;
        let range = &texts[self.lo as usize..self.hi as usize];
        // In the range the byte at `off` never decreases, a text that ends there (`None`) first,
        // so the texts going on with `b` are found by bisection.
        let byte = |t: &String| t.as_bytes().get(off).copied();
        let lo = range.partition_point(|t| byte(t) < Some(b));
        let hi = range.partition_point(|t| byte(t) <= Some(b));
        (lo < hi).then(|| Self {
            lo: self.lo + lo as u16,
            hi: self.lo + hi as u16,
            off: self.off + 1,
        })
    }

    /// Whether the bytes read are one of the texts, whole.
    fn is_whole(self, texts: &[String]) -> bool {
        self.is_open() && texts[self.lo as usize].len() == self.off as usize
    }
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
    /// In a string; `hex` counts the `\u` digits still due, `escaped` follows a backslash,
    /// `utf8` is what a multi-byte character still needs (see [`Utf8`]).
    Str {
        key: bool,
        escaped: bool,
        hex: u8,
        utf8: Utf8,
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

/// Inside a string, the continuation bytes a UTF-8 character still needs (0 to 3) and the
/// range the next one must fall in, so that every string written is valid UTF-8 (RFC 3629: no
/// overlong forms, no surrogates, nothing past U+10FFFF). A byte-level vocabulary splits rare
/// characters over tokens, so a token may end or begin inside one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Utf8 {
    left: u8,
    lo: u8,
    hi: u8,
}

impl Utf8 {
    const WHOLE: Self = Self {
        left: 0,
        lo: 0x80,
        hi: 0xBF,
    };

    /// After the lead byte `b` of a multi-byte character, or `None` if `b` leads none.
    fn lead(b: u8) -> Option<Self> {
        let (left, lo, hi) = match b {
            0xC2..=0xDF => (1, 0x80, 0xBF),
            0xE0 => (2, 0xA0, 0xBF),
            0xED => (2, 0x80, 0x9F),
            0xE1..=0xEF => (2, 0x80, 0xBF),
            0xF0 => (3, 0x90, 0xBF),
            0xF4 => (3, 0x80, 0x8F),
            0xF1..=0xF3 => (3, 0x80, 0xBF),
            _ => return None,
        };
        Some(Self { left, lo, hi })
    }

    /// After the continuation byte `b`, if it may come next.
    fn next(self, b: u8) -> Option<Self> {
        (self.lo..=self.hi).contains(&b).then_some(Self {
            left: self.left - 1,
            ..Self::WHOLE
        })
    }
}

impl ArgumentSchema {
    /// The schema of a function's `parameters` (see [`ArgumentSchema::read`]), its listed values
    /// kept to those this checker can write.
    pub fn from_schema(schema: &Value) -> Option<Self> {
        Self::read(schema, &writable)
    }
}

/// Whether the checker can write `text` as the one value of a key of `types`.
fn writable(types: u8, text: &str) -> bool {
    let alone = ArgumentSchema {
        names: vec!["k".into()],
        required: 0,
        values: vec![ValueSchema {
            types,
            one_of: Vec::new(),
        }],
    };
    JsonPrefix::new()
        .after(&format!("{{\"k\":{text}}}"), Some(&alone))
        .is_some_and(|p| p.is_done())
}

impl JsonPrefix {
    pub(super) fn new() -> Self {
        Self {
            arrays: 0,
            written: 0,
            depth: 0,
            blanks: 0,
            key: Spelling::NONE,
            value: Spelling::NONE,
            at: At::Start,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// The state after `text`, or `None` when no JSON object (that `args` allows, when given)
    /// begins with what was read and it.
    pub(super) fn after(self, text: &str, args: Option<&ArgumentSchema>) -> Option<Self> {
        self.after_bytes(text.as_bytes(), args)
    }

    /// [`JsonPrefix::after`] for bytes that may begin or end inside a character.
    pub(super) fn after_bytes(
        mut self,
        bytes: &[u8],
        args: Option<&ArgumentSchema>,
    ) -> Option<Self> {
        for &b in bytes {
            self = self.step(b, args)?;
        }
        Some(self)
    }

    /// The state after the one byte `b` (see [`JsonPrefix::after`]).
    pub(super) fn after_byte(self, b: u8, args: Option<&ArgumentSchema>) -> Option<Self> {
        self.step(b, args)
    }

    /// Whether any text of whole UTF-8 characters without a quote, a backslash or a control
    /// byte leaves this state as it is: inside a string, not just after a backslash or inside a
    /// character, and not spelling a key or value that `args` lists (which every byte narrows).
    pub(super) fn keeps_plain_text(&self, args: Option<&ArgumentSchema>) -> bool {
        let At::Str {
            key,
            escaped: false,
            hex: 0,
            utf8: Utf8::WHOLE,
        } = self.at
        else {
            return false;
        };
        // A byte read clears the blanks count, which a string's first byte has already done.
        self.blanks == 0 && (args.is_none() || !(self.value.is_open() || (key && self.depth == 1)))
    }

    fn step(mut self, b: u8, args: Option<&ArgumentSchema>) -> Option<Self> {
        let Some(a) = args.filter(|_| self.depth == 1 || self.value.is_open()) else {
            return self.syntax(b, args);
        };
        if self.depth == 1 && matches!(self.at, At::Str { key: true, .. }) {
            return self.key_byte(a, b);
        }
        if !self.value.is_open() {
            return self.syntax(b, args);
        }
        // A top-level value with listed values: each of its bytes must go on spelling one, and
        // where it ends it must have spelled one whole. A number ends before the first byte that
        // cannot extend it (so `1` is not cut short where `10` is listed too), any other value
        // on its own last byte.
        let texts = &a.values[self.key.lo as usize].one_of;
        if let At::Num(n) = self.at {
            if self.depth == 1 && self.number(n, b, args).is_none() {
                if !self.value.is_whole(texts) {
                    return None;
                }
                self.value = Spelling::NONE;
                return self.syntax(b, args);
            }
        }
        self.value = self.value.narrow(texts, b)?;
        let mut next = self.syntax(b, args)?;
        if next.depth == 1 && next.at == At::AfterValue {
            if !next.value.is_whole(texts) {
                return None;
            }
            next.value = Spelling::NONE;
        }
        Some(next)
    }

    /// `b` as JSON, with the top-level keys' and values' first bytes (and integers) as `args`
    /// allows; [`JsonPrefix::step`] follows key names and listed values.
    fn syntax(mut self, b: u8, args: Option<&ArgumentSchema>) -> Option<Self> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let blanks = std::mem::take(&mut self.blanks);
        let top = args.filter(|_| self.depth == 1);
        self.at = match self.at {
            At::Done => return None,
            At::Str {
                key,
                escaped,
                hex,
                utf8,
            } => string(key, escaped, hex, utf8, b)?,
            At::Num(n) => match self.number(n, b, args) {
                Some(n) => At::Num(n),
                // A number ends at the first byte that cannot extend it, if it is whole.
                None if matches!(n, Num::Zero | Num::Int(_) | Num::Frac | Num::Exp(_)) => {
                    self.at = At::AfterValue;
                    return self.syntax(b, args);
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
                if let Some(a) = top {
                    if a.all() & !self.written == 0 {
                        return None;
                    }
                    self.key = Spelling::all(&a.names);
                }
                At::Str {
                    key: true,
                    escaped: false,
                    hex: 0,
                    utf8: Utf8::WHOLE,
                }
            }
            At::KeyOrEnd if b == b'}' => return self.close(b, top),
            At::Colon if b == b':' => At::Value,
            At::ValueOrEnd if b == b']' => return self.close(b, top),
            At::Value | At::ValueOrEnd => {
                if let Some(a) = top {
                    let value = &a.values[self.key.lo as usize];
                    if types_beginning_with(b) & value.types == 0 {
                        return None;
                    }
                    // No value is one byte long, so `step` checks for its end from the next.
                    if !value.one_of.is_empty() {
                        self.value = Spelling::all(&value.one_of).narrow(&value.one_of, b)?;
                    }
                }
                match b {
                    b'"' => At::Str {
                        key: false,
                        escaped: false,
                        hex: 0,
                        utf8: Utf8::WHOLE,
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
                }
            }
            At::AfterValue => match b {
                b',' if self.in_array() => At::Value,
                // A comma promises a key: one must be left to write.
                b',' if top.is_some_and(|a| a.all() & !self.written == 0) => return None,
                b',' => At::Key,
                b'}' | b']' => return self.close(b, top),
                _ => return None,
            },
            At::KeyOrEnd | At::Key | At::Colon => return None,
        };
        Some(self)
    }

    /// The number after `b`, if `b` extends it: a top-level one whose key allows integers only
    /// takes no fraction or exponent.
    fn number(&self, n: Num, b: u8, args: Option<&ArgumentSchema>) -> Option<Num> {
        let whole_only = self.depth == 1
            && args.is_some_and(|a| a.values[self.key.lo as usize].types & NUMBER == 0);
        number(n, b).filter(|m| !(whole_only && matches!(m, Num::Dot | Num::E)))
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
    fn key_byte(mut self, a: &ArgumentSchema, b: u8) -> Option<Self> {
        if b == b'"' {
            if !self.key.is_whole(&a.names) || self.written & (1 << self.key.lo) != 0 {
                return None;
            }
            self.written |= 1 << self.key.lo;
            self.at = At::Colon;
            return Some(self);
        }
        let key = self.key.narrow(&a.names, b)?;
        if ArgumentSchema::range(key.lo, key.hi) & !self.written == 0 {
            return None;
        }
        self.key = key;
        Some(self)
    }

    fn close(mut self, closer: u8, top: Option<&ArgumentSchema>) -> Option<Self> {
        if (closer == b']') != self.in_array() {
            return None;
        }
        if top.is_some_and(|a| a.required & !self.written != 0) {
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

fn string(key: bool, escaped: bool, hex: u8, utf8: Utf8, b: u8) -> Option<At> {
    let at = |escaped, hex| At::Str {
        key,
        escaped,
        hex,
        utf8: Utf8::WHOLE,
    };
    if utf8.left > 0 {
        return Some(At::Str {
            key,
            escaped,
            hex,
            utf8: utf8.next(b)?,
        });
    }
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
            0x20..=0x7f => at(false, 0),
            _ => At::Str {
                key,
                escaped: false,
                hex: 0,
                utf8: Utf8::lead(b)?,
            },
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
