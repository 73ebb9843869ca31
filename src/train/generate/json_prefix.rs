//! Whether a text can still grow into one JSON object (RFC 8259 syntax), optionally one that an
//! [`ArgumentSchema`] allows (listed keys, the required ones, each value's type and listed
//! values, at every depth the schema describes): a checker fed a byte at a time whose whole
//! state is a few cache lines, so that masking a vocabulary copies it once per candidate token
//! instead of re-reading the text.

use super::argument_schema::{
    types_beginning_with, ArgumentSchema, Keys, ValueSchema, FREE, INTEGER, NUMBER, OBJECT,
    UNBOUNDED,
};
use super::json_scalars::{blank, extend, number, reachable, Num, Utf8};
use super::spelling::Spelling;
use serde_json::Value;

/// Containers nest at most this deep (one bit each in `arrays`).
const MAX_DEPTH: u8 = 64;
/// Containers this deep follow their schema nodes; deeper ones are free. Enough for objects in
/// arrays in objects in arrays, and it keeps the state small.
pub(super) const SCHEMA_DEPTH: usize = 8;
const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct JsonPrefix {
    /// Bit `i` set: the container at depth `i + 1` is an array, else an object.
    arrays: u64,
    /// Per container depth (`i + 1`, up to [`SCHEMA_DEPTH`]): the keys its object has written,
    /// as bits over its node's names, or the number of elements its array has begun.
    written: [u64; SCHEMA_DEPTH],
    /// Per container depth: the schema node its contents keep to ([`FREE`]: anything).
    nodes: [u16; SCHEMA_DEPTH],
    depth: u8,
    /// The whitespace just read between tokens (see [`blank`]).
    blanks: u8,
    /// In a key of an object whose node lists its keys: the names it may still become; after
    /// the key, `key.lo` is its index, so the value knows its node.
    key: Spelling,
    /// In a value whose node lists its values: those it may still become; else none.
    value: Spelling,
    /// The node `value` spells the values of, and the depth of the container holding it.
    spelled: (u16, u8),
    /// In a string value with length bounds: the characters it still owes its `minLength`, and
    /// those its `maxLength` still allows ([`UNBOUNDED`]: any number).
    chars_owed: u16,
    chars_left: u16,
    /// In a number: its integer digits so far, with its sign (saturating past an i64).
    int_value: i64,
    at: At,
}

// The vocabulary mask copies the state once per candidate token: it must stay small.
const _: () = assert!(std::mem::size_of::<JsonPrefix>() <= 128);

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

impl ArgumentSchema {
    /// The schema of a function's `parameters` (see [`ArgumentSchema::read`]), its listed values
    /// kept to those this checker can write.
    pub fn from_schema(schema: &Value) -> Option<Self> {
        Self::read(schema, &writable)
    }
}

/// Whether the checker can write `text` as the one value of a key of `types`.
fn writable(types: u8, text: &str) -> bool {
    let value = ValueSchema {
        types,
        ..ValueSchema::FREE
    };
    let object = ValueSchema {
        types: OBJECT,
        keys: Some(Keys {
            names: vec!["k".into()],
            required: 0,
            values: vec![2],
        }),
        ..ValueSchema::FREE
    };
    let alone = ArgumentSchema {
        nodes: vec![ValueSchema::FREE, object, value],
        root: 1,
    };
    JsonPrefix::new()
        .after(&format!("{{\"k\":{text}}}"), Some(&alone))
        .is_some_and(|p| p.is_done())
}

impl JsonPrefix {
    pub(super) fn new() -> Self {
        Self {
            arrays: 0,
            written: [0; SCHEMA_DEPTH],
            nodes: [FREE; SCHEMA_DEPTH],
            depth: 0,
            blanks: 0,
            key: Spelling::NONE,
            value: Spelling::NONE,
            spelled: (FREE, 0),
            chars_owed: 0,
            chars_left: UNBOUNDED,
            int_value: 0,
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

    /// How many characters of plain text (whole UTF-8 characters without a quote, a backslash
    /// or a control byte) this state takes, any such text within that many allowed: inside a
    /// string, not just after a backslash or inside a character, and not spelling a key or
    /// value that `args` lists (which every byte narrows). `Some(UNBOUNDED)`: any length; `None`:
    /// not in such a string. Plain text leaves the state as it is but for the characters counted.
    pub(super) fn plain_text(&self, args: Option<&ArgumentSchema>) -> Option<u16> {
        let At::Str {
            key,
            escaped: false,
            hex: 0,
            utf8: Utf8::WHOLE,
        } = self.at
        else {
            return None;
        };
        // A byte read clears the blanks count, which a string's first byte has already done.
        let plain =
            self.blanks == 0 && !(self.value.is_open() || (key && self.keys(args).is_some()));
        plain.then_some(self.chars_left)
    }

    /// The node of the container the checker is in, when it constrains anything.
    fn container<'a>(&self, args: Option<&'a ArgumentSchema>) -> Option<&'a ValueSchema> {
        let a = args?;
        let d = self.depth as usize;
        let id = *self.nodes.get(d.checked_sub(1)?)?;
        (id != FREE).then(|| &a.nodes[id as usize])
    }

    /// The keys of the object the checker is in, when its node lists them.
    fn keys<'a>(&self, args: Option<&'a ArgumentSchema>) -> Option<&'a Keys> {
        self.container(args)
            .filter(|_| !self.in_array())?
            .keys
            .as_ref()
    }

    /// The array the checker is in, when its node says how many elements it takes: its
    /// `minItems` and `maxItems` ([`UNBOUNDED`]: no maximum).
    fn item_bounds(&self, args: Option<&ArgumentSchema>) -> Option<(u16, u16)> {
        let c = self.container(args).filter(|_| self.in_array())?;
        Some((c.min_items, c.max_items))
    }

    /// Whether the array the checker is in may take another element.
    fn takes_another_item(&self, args: Option<&ArgumentSchema>) -> bool {
        self.item_bounds(args)
            .is_none_or(|(_, max)| max == UNBOUNDED || self.written() < max as u64)
    }

    /// The node of the value beginning or being written: an array's items', or the one of the
    /// key just written.
    fn value_node(&self, args: Option<&ArgumentSchema>) -> u16 {
        match self.container(args) {
            Some(c) if self.in_array() => c.items,
            Some(c) => c
                .keys
                .as_ref()
                .map_or(FREE, |k| k.values[self.key.lo as usize]),
            None => FREE,
        }
    }

    fn written(&self) -> u64 {
        self.written[self.depth as usize - 1]
    }

    fn step(self, b: u8, args: Option<&ArgumentSchema>) -> Option<Self> {
        let Some(a) = args else {
            return self.syntax(b, None);
        };
        if self.value.is_open() {
            return self.spell(a, b);
        }
        if matches!(self.at, At::Str { key: true, .. }) {
            if let Some(keys) = self.keys(args) {
                return self.key_byte(keys, b);
            }
        }
        self.syntax(b, args)
    }

    /// A byte of a value whose node lists its values: it must go on spelling one, and where the
    /// value ends it must have spelled one whole. A number ends before the first byte that
    /// cannot extend it (so `1` is not cut short where `10` is listed too), any other value on
    /// its own last byte. Containers inside it are free: the spelling holds them.
    fn spell(mut self, a: &ArgumentSchema, b: u8) -> Option<Self> {
        let (node, depth) = self.spelled;
        let texts = &a.nodes[node as usize].one_of;
        if let At::Num(n) = self.at {
            if self.depth == depth && self.number(n, b, Some(a)).is_none() {
                if !self.value.is_whole(texts) {
                    return None;
                }
                self.value = Spelling::NONE;
                return self.syntax(b, Some(a));
            }
        }
        self.value = self.value.narrow(texts, b)?;
        let mut next = self.syntax(b, Some(a))?;
        if next.depth == depth && next.at == At::AfterValue {
            if !next.value.is_whole(texts) {
                return None;
            }
            next.value = Spelling::NONE;
        }
        Some(next)
    }

    /// `b` as JSON, with keys' and values' first bytes (and integers) as the nodes of `args`
    /// allow; [`JsonPrefix::step`] follows key names and listed values.
    fn syntax(mut self, b: u8, args: Option<&ArgumentSchema>) -> Option<Self> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let blanks = std::mem::take(&mut self.blanks);
        self.at = match self.at {
            At::Done => return None,
            At::Str {
                key,
                escaped,
                hex,
                utf8,
            } => {
                // A byte that begins a character (an escape's backslash counts for the escape;
                // `\u` escapes of surrogates, the one pair of escapes that is one character,
                // are refused) is counted against a value's length bounds.
                if !key && !escaped && hex == 0 && utf8.left == 0 {
                    if b == b'"' {
                        if self.chars_owed > 0 {
                            return None;
                        }
                    } else if self.chars_left != UNBOUNDED {
                        self.chars_left = self.chars_left.checked_sub(1)?;
                    }
                    self.chars_owed = self.chars_owed.saturating_sub(1);
                }
                string(key, escaped, hex, utf8, b)?
            }
            At::Num(n) => match self.number(n, b, args) {
                Some(m) => {
                    if matches!(m, Num::Int(_)) {
                        self.int_value = extend(self.int_value, n == Num::Minus, b);
                    }
                    self.check_int(m, args)?;
                    At::Num(m)
                }
                // A number ends at the first byte that cannot extend it, if it is whole (and
                // within its node's bounds).
                None if matches!(n, Num::Zero | Num::Int(_) | Num::Frac | Num::Exp(_)) => {
                    if let Some((lo, hi)) = self.int_bounds(args) {
                        if !(lo..=hi).contains(&self.int_value) {
                            return None;
                        }
                    }
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
            At::Start => {
                let root = args.map_or(FREE, |a| a.root);
                return (b == b'{').then(|| self.open(false, root)).flatten();
            }
            _ if ws => {
                self.blanks = blank(blanks, b, self.depth)?;
                self.at
            }
            At::KeyOrEnd | At::Key if b == b'"' => {
                if let Some(k) = self.keys(args) {
                    if k.all() & !self.written() == 0 {
                        return None;
                    }
                    self.key = Spelling::all(&k.names);
                }
                At::Str {
                    key: true,
                    escaped: false,
                    hex: 0,
                    utf8: Utf8::WHOLE,
                }
            }
            At::KeyOrEnd if b == b'}' => return self.close(b, args),
            At::Colon if b == b':' => At::Value,
            At::ValueOrEnd if b == b']' => return self.close(b, args),
            At::Value | At::ValueOrEnd => {
                // What a container opened here keeps to: its node, unless the value is spelled.
                let mut inside = FREE;
                (self.chars_owed, self.chars_left) = (0, UNBOUNDED);
                if self.in_array() {
                    if !self.takes_another_item(args) {
                        return None;
                    }
                    // An array's word in `written` counts its elements (past the schema's
                    // depth nothing is counted, as nothing bounds them).
                    if let Some(count) = self.written.get_mut(self.depth as usize - 1) {
                        *count += 1;
                    }
                }
                let id = self.value_node(args);
                if let (Some(a), true) = (args, id != FREE) {
                    if types_beginning_with(b) & a.nodes[id as usize].types == 0 {
                        return None;
                    }
                    // Of alternatives, the first byte picks one (a number's whether it is whole
                    // comes from the union's types: only one alternative is a number).
                    let id = a.pick(id, types_beginning_with(b))?;
                    let value = &a.nodes[id as usize];
                    // No value is one byte long, so `spell` checks for its end from the next.
                    if value.one_of.is_empty() {
                        inside = id;
                        (self.chars_owed, self.chars_left) = (value.min_chars, value.max_chars);
                    } else {
                        self.value = Spelling::all(&value.one_of).narrow(&value.one_of, b)?;
                        self.spelled = (id, self.depth);
                    }
                }
                match b {
                    b'"' => At::Str {
                        key: false,
                        escaped: false,
                        hex: 0,
                        utf8: Utf8::WHOLE,
                    },
                    b'{' => return self.open(false, inside),
                    b'[' => return self.open(true, inside),
                    b'-' | b'0'..=b'9' => {
                        let n = match b {
                            b'-' => Num::Minus,
                            b'0' => Num::Zero,
                            _ => Num::Int(1),
                        };
                        self.int_value = extend(0, false, b);
                        self.check_int(n, args)?;
                        At::Num(n)
                    }
                    b't' => At::Literal { which: 0, done: 1 },
                    b'f' => At::Literal { which: 1, done: 1 },
                    b'n' => At::Literal { which: 2, done: 1 },
                    _ => return None,
                }
            }
            At::AfterValue => match b {
                // A comma promises another element: the array must take one more.
                b',' if self.in_array() && !self.takes_another_item(args) => return None,
                b',' if self.in_array() => At::Value,
                // A comma promises a key: one must be left to write.
                b',' if self
                    .keys(args)
                    .is_some_and(|k| k.all() & !self.written() == 0) =>
                {
                    return None
                }
                b',' => At::Key,
                b'}' | b']' => return self.close(b, args),
                _ => return None,
            },
            At::KeyOrEnd | At::Key | At::Colon => return None,
        };
        Some(self)
    }

    /// The number after `b`, if `b` extends it: one whose node allows integers only takes no
    /// fraction or exponent.
    fn number(&self, n: Num, b: u8, args: Option<&ArgumentSchema>) -> Option<Num> {
        let id = self.value_node(args);
        let whole_only = args.is_some_and(|a| a.nodes[id as usize].types & NUMBER == 0);
        number(n, b).filter(|m| !(whole_only && matches!(m, Num::Dot | Num::E)))
    }

    /// The least and greatest value of the integer being written, when its node bounds it.
    fn int_bounds(&self, args: Option<&ArgumentSchema>) -> Option<(i64, i64)> {
        let a = args?;
        let id = a.pick(self.value_node(args), INTEGER | NUMBER)?;
        let node = &a.nodes[id as usize];
        (node.min_int != i64::MIN || node.max_int != i64::MAX)
            .then_some((node.min_int, node.max_int))
    }

    /// `Some` when the integer read so far (at `n`) can still become one within its node's
    /// bounds, or has none.
    fn check_int(&self, n: Num, args: Option<&ArgumentSchema>) -> Option<()> {
        match self.int_bounds(args) {
            Some((lo, hi)) => reachable(self.int_value, n, lo, hi).then_some(()),
            None => Some(()),
        }
    }

    fn in_array(&self) -> bool {
        self.depth > 0 && self.arrays & (1 << (self.depth - 1)) != 0
    }

    /// Opens an array or object whose contents keep to `node` (free past [`SCHEMA_DEPTH`]).
    fn open(mut self, array: bool, node: u16) -> Option<Self> {
        if self.depth == MAX_DEPTH {
            return None;
        }
        if array {
            self.arrays |= 1 << self.depth;
        } else {
            self.arrays &= !(1 << self.depth);
        }
        if let Some(slot) = self.nodes.get_mut(self.depth as usize) {
            *slot = node;
            self.written[self.depth as usize] = 0;
        }
        self.depth += 1;
        self.at = if array { At::ValueOrEnd } else { At::KeyOrEnd };
        Some(self)
    }

    /// A byte of a listed key: it must go on spelling a name not yet written, or end one.
    fn key_byte(mut self, keys: &Keys, b: u8) -> Option<Self> {
        let d = self.depth as usize - 1;
        if b == b'"' {
            if !self.key.is_whole(&keys.names) || self.written[d] & (1 << self.key.lo) != 0 {
                return None;
            }
            self.written[d] |= 1 << self.key.lo;
            self.at = At::Colon;
            return Some(self);
        }
        let key = self.key.narrow(&keys.names, b)?;
        if Keys::range(key.lo, key.hi) & !self.written[d] == 0 {
            return None;
        }
        self.key = key;
        Some(self)
    }

    /// Closes the container with `closer`; an object whose node lists its keys must have
    /// written the required ones, an array its `minItems` elements.
    fn close(mut self, closer: u8, args: Option<&ArgumentSchema>) -> Option<Self> {
        if (closer == b']') != self.in_array() {
            return None;
        }
        if self
            .item_bounds(args)
            .is_some_and(|(min, _)| self.written() < min as u64)
        {
            return None;
        }
        if self
            .keys(args)
            .is_some_and(|k| k.required & !self.written() != 0)
        {
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
