//! What a JSON object written under a schema may hold, read once into a table of nodes: each
//! value's types and listed (`enum`/`const`) values, an object's keys (which are required, and
//! each one's node) and an array's items' node, nested as deep as the schema goes, local `$ref`s
//! followed (recursive ones too), `anyOf`/`oneOf` kept where a value's first byte tells the
//! alternatives apart, a string's length, an array's element count and an integer's bounds.
//! What a node cannot say is left free: the checker then allows more than the schema does,
//! never less.

use serde_json::Value;
use std::collections::HashMap;

/// Value types, as bits: a node's `types` is the union of those its schema allows.
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

/// The node that allows any value, with anything inside it.
pub(super) const FREE: u16 = 0;
/// Nodes a schema may make; past it the rest are free. Far beyond any tool's parameters, and it
/// bounds the work a hostile schema can ask for.
const MAX_NODES: usize = 4096;
/// A count no bound reaches: `ValueSchema::max_chars` when there is no `maxLength`,
/// `max_items` when there is no `maxItems`.
pub(super) const UNBOUNDED: u16 = u16::MAX;
/// Schemas read inside one another (a property's, an item's, an alternative's, a reference's
/// target); deeper ones are free. The checker follows 8 containers, each a few of these deep,
/// and the bound keeps a hostile chain of references from overflowing a handler's stack.
const MAX_READ_DEPTH: usize = 64;

/// A function's `parameters` schema (or a JSON answer's), as the checker reads it: `nodes[root]`
/// is the arguments object, whose keys are listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentSchema {
    pub(super) nodes: Vec<ValueSchema>,
    pub(super) root: u16,
}

/// What one value may be: its first byte and, for integers, its number are checked against
/// `types`; `one_of` spells its listed values out; an object opened here keeps to `keys`, an
/// array's elements to `nodes[items]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ValueSchema {
    pub(super) types: u8,
    /// The `enum` (or `const`) values in serde_json's compact text, sorted; empty: any value.
    pub(super) one_of: Vec<String>,
    /// `None`: an object here may have any keys, with any values.
    pub(super) keys: Option<Keys>,
    pub(super) items: u16,
    /// `anyOf`/`oneOf` whose alternatives a value's first byte tells apart: the value keeps to
    /// the one its first byte begins ([`ArgumentSchema::pick`]); `types` is their union.
    pub(super) alternatives: Vec<u16>,
    /// A string value's `minLength` and `maxLength`, in characters (Unicode code points, as
    /// JSON Schema counts them); [`UNBOUNDED`]: no maximum.
    pub(super) min_chars: u16,
    pub(super) max_chars: u16,
    /// An array value's `minItems` and `maxItems`; [`UNBOUNDED`]: no maximum.
    pub(super) min_items: u16,
    pub(super) max_items: u16,
    /// An integer value's least and greatest value (`minimum`, `maximum` and their exclusive
    /// forms), `i64::MIN` and `i64::MAX` where unbounded; only for nodes of integers that list
    /// no values.
    pub(super) min_int: i64,
    pub(super) max_int: i64,
}

/// The keys an object may have: its schema's `properties` names, sorted, which of them are
/// `required` (bit `i` for `names[i]`), and each one's value node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Keys {
    pub(super) names: Vec<String>,
    pub(super) required: u64,
    pub(super) values: Vec<u16>,
}

impl ValueSchema {
    pub(super) const FREE: Self = Self {
        types: ANY,
        one_of: Vec::new(),
        keys: None,
        items: FREE,
        alternatives: Vec::new(),
        min_chars: 0,
        max_chars: UNBOUNDED,
        min_items: 0,
        max_items: UNBOUNDED,
        min_int: i64::MIN,
        max_int: i64::MAX,
    };
}

impl Keys {
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

impl ArgumentSchema {
    /// The node a value of `node` keeps to once its first byte says it is one of `types`: the
    /// node itself, or the alternative of that type; `None` when no alternative is.
    pub(super) fn pick(&self, mut node: u16, types: u8) -> Option<u16> {
        while !self.nodes[node as usize].alternatives.is_empty() {
            node = *self.nodes[node as usize]
                .alternatives
                .iter()
                .find(|&&a| self.nodes[a as usize].types & types != 0)?;
        }
        Some(node)
    }

    /// The schema, when its top level lists its keys (an object schema with `properties` that
    /// does not allow others, see [`Reader::keys`]); `None` otherwise: the object's keys and
    /// values are then free.
    ///
    /// `writable(types, text)`: whether the checker can write the listed value `text` as a value
    /// of `types` (it is [`super::json_prefix`]'s, passed in by `from_schema` there, so that this
    /// file does not import the checker that reads it).
    pub(super) fn read(schema: &Value, writable: &dyn Fn(u8, &str) -> bool) -> Option<Self> {
        let mut reader = Reader {
            document: schema,
            nodes: vec![ValueSchema::FREE],
            refs: HashMap::new(),
            writable,
            depth: 0,
        };
        let read = reader.node(schema);
        let schema = Self {
            nodes: reader.nodes,
            root: FREE,
        };
        let root = schema.pick(read, OBJECT)?;
        let top = &schema.nodes[root as usize];
        (top.types & OBJECT != 0 && top.keys.is_some()).then_some(Self { root, ..schema })
    }
}

/// Reads a schema document into nodes, each `$ref` once.
struct Reader<'a> {
    document: &'a Value,
    nodes: Vec<ValueSchema>,
    refs: HashMap<&'a str, u16>,
    writable: &'a dyn Fn(u8, &str) -> bool,
    /// Schemas being read, one inside the other.
    depth: usize,
}

impl<'a> Reader<'a> {
    /// The node of the value schema `p`.
    fn node(&mut self, p: &'a Value) -> u16 {
        if self.nodes.len() >= MAX_NODES || self.depth >= MAX_READ_DEPTH {
            return FREE;
        }
        self.depth += 1;
        let id = self.read_node(p);
        self.depth -= 1;
        id
    }

    fn read_node(&mut self, p: &'a Value) -> u16 {
        if let Some(r) = p.get("$ref") {
            return self.reference(r);
        }
        if !p.is_object() || p.get("allOf").is_some() {
            return FREE;
        }
        if let Some(alternatives) = p.get("anyOf").or_else(|| p.get("oneOf")) {
            return self.union(alternatives);
        }
        let id = self.nodes.len() as u16;
        self.nodes.push(ValueSchema::FREE);
        let types = types(p);
        let one_of = self.listed(p, types);
        let keys = self.keys(p);
        let (min_chars, max_chars) = bounds(p, "minLength", "maxLength");
        let (min_items, max_items) = bounds(p, "minItems", "maxItems");
        let integers = types & INTEGER != 0 && types & NUMBER == 0;
        let (min_int, max_int) = match integers && one_of.is_empty() {
            true => int_bounds(p),
            false => (i64::MIN, i64::MAX),
        };
        // `prefixItems` gives the first elements their own schemas, `items` the rest: without
        // following positions, the elements stay free.
        let items = match (p.get("items"), p.get("prefixItems")) {
            (Some(items), None) => self.node(items),
            _ => FREE,
        };
        self.nodes[id as usize] = ValueSchema {
            types,
            one_of,
            keys,
            items,
            alternatives: Vec::new(),
            min_chars,
            max_chars,
            min_items,
            max_items,
            min_int,
            max_int,
        };
        id
    }

    /// `anyOf`/`oneOf` (keywords beside it not read), when a value's first byte tells its
    /// alternatives apart: each of other JSON types (`integer` and `number` count as one, as
    /// both begin with a digit), such as `X` or `null`. Free otherwise: following several
    /// alternatives at once is more than a byte-at-a-time check holds.
    fn union(&mut self, alternatives: &'a Value) -> u16 {
        let Some(list) = alternatives.as_array().filter(|l| !l.is_empty()) else {
            return FREE;
        };
        let nodes: Vec<u16> = list.iter().map(|p| self.node(p)).collect();
        let mut seen = 0u8;
        for &n in &nodes {
            // An alternative of every type tells nothing apart; it is also what a reference
            // still being read looks like, so no union can end up among its own alternatives.
            let kinds = kinds(self.nodes[n as usize].types);
            if kinds == ANY || seen & kinds != 0 {
                return FREE;
            }
            seen |= kinds;
        }
        let types = nodes
            .iter()
            .fold(0, |t, &n| t | self.nodes[n as usize].types);
        self.nodes.push(ValueSchema {
            types,
            alternatives: nodes,
            ..ValueSchema::FREE
        });
        (self.nodes.len() - 1) as u16
    }

    /// The node a `$ref` points at, when it is a JSON pointer into this document (`#`,
    /// `#/$defs/Item`, `#/definitions/Item`); free otherwise. Keywords beside it are not read.
    /// A reference met again, also from inside itself, is the same node: one that stands for
    /// its target as a union of one (what it holds is not copied, however many refer to it).
    fn reference(&mut self, r: &'a Value) -> u16 {
        let Some(r) = r.as_str() else {
            return FREE;
        };
        if let Some(&id) = self.refs.get(r) {
            return id;
        }
        let Some(target) = r
            .strip_prefix('#')
            .and_then(|pointer| self.document.pointer(pointer))
        else {
            return FREE;
        };
        // The node's place is taken first, so that a reference inside the target finds it.
        let id = self.nodes.len() as u16;
        self.nodes.push(ValueSchema::FREE);
        self.refs.insert(r, id);
        let inner = self.node(target);
        let target = &self.nodes[inner as usize];
        // A target that is free, or a reference still being read (which looks free until it is
        // read, and would otherwise close a loop of references), leaves this one free.
        if *target != ValueSchema::FREE {
            self.nodes[id as usize] = ValueSchema {
                types: target.types,
                alternatives: vec![inner],
                ..ValueSchema::FREE
            };
        }
        id
    }

    /// An object schema's keys, when it lists them: `properties` that does not allow others
    /// (`additionalProperties` absent or false), at most 64 of them, each plain text (no quote,
    /// backslash or control character, so never escaped; shorter than 64 KiB, as the checker
    /// counts), and `required` naming only them.
    fn keys(&mut self, p: &'a Value) -> Option<Keys> {
        if p.get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false))
        {
            return None;
        }
        let properties = p.get("properties")?.as_object()?;
        let mut names: Vec<&'a String> = properties.keys().collect();
        names.sort();
        let plain = |n: &&String| {
            n.len() < u16::MAX as usize && !n.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
        };
        if names.len() > 64 || !names.iter().all(plain) {
            return None;
        }
        let mut required = 0u64;
        for r in p
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let i = names.iter().position(|n| Some(n.as_str()) == r.as_str())?;
            required |= 1 << i;
        }
        let values = names.iter().map(|n| self.node(&properties[*n])).collect();
        Some(Keys {
            names: names.into_iter().cloned().collect(),
            required,
            values,
        })
    }

    /// `enum`/`const` values the checker can write as `types`, in serde_json's compact text.
    fn listed(&self, p: &Value, types: u8) -> Vec<String> {
        let listed: Vec<&Value> = match (p.get("const"), p.get("enum").and_then(Value::as_array)) {
            (Some(c), Some(e)) => e.iter().filter(|v| *v == c).take(1).collect(),
            (Some(c), None) => vec![c],
            (None, Some(e)) => e.iter().collect(),
            (None, None) => vec![],
        };
        // The checker itself tells which listed values can be written as the type: one of
        // another type, or a number it cannot hold (1e300: three exponent digits), could never
        // be finished.
        let writable = |t: &String| t.len() < u16::MAX as usize && (self.writable)(types, t);
        let mut one_of: Vec<String> = listed
            .into_iter()
            .map(Value::to_string)
            .filter(writable)
            .collect();
        one_of.sort();
        one_of.dedup();
        // None left (an empty enum, none of the type, none the checker can write) or more than
        // the checker counts: the type alone, rather than a value that can never be written.
        if one_of.len() >= u16::MAX as usize {
            one_of.clear();
        }
        one_of
    }
}

/// A schema's `type` (a name or a list), all types when absent or naming an unknown one.
fn types(p: &Value) -> u8 {
    match p.get("type") {
        Some(Value::String(t)) => type_bits(t),
        Some(Value::Array(ts)) if !ts.is_empty() => ts
            .iter()
            .try_fold(0, |bits, t| Some(bits | type_bits(t.as_str()?)?)),
        _ => None,
    }
    .unwrap_or(ANY)
}

/// A count's lower and upper bound (a string's `minLength` and `maxLength` in characters, an
/// array's `minItems` and `maxItems`). Counts past what the checker follows (65534) leave the
/// maximum unbounded and cap the minimum, which a budget reaches long before; bounds that
/// nothing meets (a minimum above the maximum) are not followed.
fn bounds(p: &Value, min_key: &str, max_key: &str) -> (u16, u16) {
    let bound = |key: &str| p.get(key).and_then(Value::as_u64);
    let min = bound(min_key).map_or(0, |n| n.min(UNBOUNDED as u64 - 1) as u16);
    let max = bound(max_key).map_or(UNBOUNDED, |n| n.min(UNBOUNDED as u64) as u16);
    if min > max {
        return (0, UNBOUNDED);
    }
    (min, max)
}

/// An integer's least and greatest value from `minimum`, `maximum`, `exclusiveMinimum` and
/// `exclusiveMaximum` (a number, or draft 4's `true` beside its bound); bounds beyond an i64
/// are none, and bounds no integer meets are not followed.
fn int_bounds(p: &Value) -> (i64, i64) {
    let number = |key: &str| p.get(key).and_then(Value::as_f64);
    let flag = |key: &str| p.get(key).and_then(Value::as_bool) == Some(true);
    // Exclusive bounds of integers: past the bound's floor (or below its ceiling).
    let above = |m: f64| m.floor() + 1.0;
    let below = |m: f64| m.ceil() - 1.0;
    let lows = [
        number("minimum").map(|m| {
            if flag("exclusiveMinimum") {
                above(m)
            } else {
                m.ceil()
            }
        }),
        number("exclusiveMinimum").map(above),
    ];
    let highs = [
        number("maximum").map(|m| {
            if flag("exclusiveMaximum") {
                below(m)
            } else {
                m.floor()
            }
        }),
        number("exclusiveMaximum").map(below),
    ];
    let lo = lows.into_iter().flatten().reduce(f64::max);
    let hi = highs.into_iter().flatten().reduce(f64::min);
    // An f64 at or past an i64's range bounds nothing an i64 count of digits can tell.
    const LIMIT: f64 = 9.2e18;
    let lo = lo
        .filter(|l| l.abs() < LIMIT)
        .map_or(i64::MIN, |l| l as i64);
    let hi = hi
        .filter(|h| h.abs() < LIMIT)
        .map_or(i64::MAX, |h| h as i64);
    if lo > hi {
        return (i64::MIN, i64::MAX);
    }
    (lo, hi)
}

/// `types` as what a first byte tells apart: integers are numbers.
fn kinds(types: u8) -> u8 {
    if types & INTEGER != 0 {
        types | NUMBER
    } else {
        types
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
