//! JSON's scalars a byte at a time, for the prefix checker: where a number stands and which
//! byte may extend it, and the bytes a UTF-8 character inside a string still needs.

/// Numbers stay within what an f64 holds (below 1e300), so that every object written parses:
/// JSON itself has no bound, but a parser refuses what it cannot represent.
const MAX_INT_DIGITS: u8 = 200;
const MAX_EXP_DIGITS: u8 = 2;

/// Where a number stands: after `-`, a leading `0`, integer digits (so many), `.`, fraction
/// digits, `e`, the exponent's sign, exponent digits (so many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Num {
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
    pub(super) left: u8,
    lo: u8,
    hi: u8,
}

impl Utf8 {
    pub(super) const WHOLE: Self = Self {
        left: 0,
        lo: 0x80,
        hi: 0xBF,
    };

    /// After the lead byte `b` of a multi-byte character, or `None` if `b` leads none.
    pub(super) fn lead(b: u8) -> Option<Self> {
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
    pub(super) fn next(self, b: u8) -> Option<Self> {
        (self.lo..=self.hi).contains(&b).then_some(Self {
            left: self.left - 1,
            ..Self::WHOLE
        })
    }
}

pub(super) fn number(n: Num, b: u8) -> Option<Num> {
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
