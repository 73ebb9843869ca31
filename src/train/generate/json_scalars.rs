//! JSON's scalars and blanks a byte at a time, for the prefix checker: where a number stands,
//! which byte may extend it and which integers it can still become, the bytes a UTF-8 character
//! inside a string still needs, and the whitespace a gap between tokens may hold.

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

/// Set in `blanks` once a gap between tokens has broken its line; the bits below count the
/// indentation after the break.
const LINE_BROKEN: u8 = 0x80;
/// Indentation a line may have per open container: what pretty printers write (2 or 4 spaces,
/// or a tab, per level). Counted up to 16 levels, so the count stays below `LINE_BROKEN`.
const INDENT_PER_DEPTH: u8 = 4;

/// The integer read so far after its next byte `b` (a digit, or the `-` that begins it, which
/// leaves it 0); `minus`: it is only the `-` so far, so the digit makes it negative. Saturates
/// past an i64, where only an unbounded side can hold it.
pub(super) fn extend(value: i64, minus: bool, b: u8) -> i64 {
    if !b.is_ascii_digit() {
        return value;
    }
    let digit = (b - b'0') as i64;
    if minus || value < 0 {
        value.saturating_mul(10).saturating_sub(digit)
    } else {
        value.saturating_mul(10).saturating_add(digit)
    }
}

/// Whether an integer in `lo..=hi` begins with what is read: `value` (its digits so far,
/// signed) at `n`. A number that may take more digits (after `-` or a non-zero digit) reaches,
/// with `k` more, `value·10^k` and the `10^k − 1` integers after it (before it when negative).
pub(super) fn reachable(value: i64, n: Num, lo: i64, hi: i64) -> bool {
    let (v, lo, hi) = (value as i128, lo as i128, hi as i128);
    let whole = !matches!(n, Num::Minus);
    if whole && lo <= v && v <= hi {
        return true;
    }
    let negative = n == Num::Minus || value < 0;
    if !matches!(n, Num::Minus | Num::Int(_)) {
        return false;
    }
    let mut scale: i128 = 1;
    for _ in 0..20 {
        scale *= 10;
        let (least, most) = match negative {
            true => (v * scale - (scale - 1), v * scale),
            false => (v * scale, v * scale + scale - 1),
        };
        if least <= hi && lo <= most {
            return true;
        }
        // Further digits move the number further from the bounds.
        if (!negative && least > hi) || (negative && most < lo) {
            return false;
        }
    }
    false
}

/// The gap's whitespace after the blank `b`, if a gap may hold it: nothing, one space or tab,
/// or one line feed and an indentation of at most [`INDENT_PER_DEPTH`] bytes per open
/// container. Any JSON serializer's output fits (compact, `", "` and `": "`, pretty-printed
/// with 2 or 4 spaces or tabs); a model cannot spend its budget on blank lines or runs of
/// spaces, which a weak one otherwise does (a fine-tuned tiny model wrote two dozen line feeds
/// between a key and its colon, then ran out of tokens). No carriage returns: line feeds alone
/// break lines in the JSON text models write.
pub(super) fn blank(blanks: u8, b: u8, depth: u8) -> Option<u8> {
    let indent = blanks & !LINE_BROKEN;
    match b {
        b'\n' if blanks == 0 => Some(LINE_BROKEN),
        b' ' | b'\t' if blanks == 0 => Some(1),
        b' ' | b'\t' if blanks & LINE_BROKEN != 0 && indent < INDENT_PER_DEPTH * depth.min(16) => {
            Some(blanks + 1)
        }
        _ => None,
    }
}
