//! The vocabulary indexed for masking a JSON object's tokens: each token's text, the texts in
//! sorted order (a trie laid flat), and the "plain" ones that a string's content takes whole.
//!
//! Read token by token, a mask over Qwen3's 151643 texts costs a millisecond or more where few
//! tokens fit (most fail on their first bytes) and over ten where most do (inside a string,
//! where nearly every text is allowed and each must be read to its end). Sorted, the texts that
//! share a prefix are a range: the mask reads each prefix once and drops the whole range where
//! no object can take it; inside a free string every plain text is allowed without reading it.

use super::argument_schema::{ArgumentSchema, UNBOUNDED};
use super::json_prefix::JsonPrefix;

/// A range of sorted texts at most this long is read text by text instead of split further.
const SMALL_RANGE: usize = 16;

/// A text a JSON string's content may hold as it is: whole UTF-8 characters, no quote,
/// backslash or control byte. Read inside a string it leaves the checker where it was, but for
/// the characters a length bound counts (see [`JsonPrefix::plain_text`]).
pub(super) fn is_plain(text: &[u8]) -> bool {
    !text.is_empty()
        && std::str::from_utf8(text).is_ok()
        && text.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// The bytes a byte-level BPE token stands for (GPT-2's scheme, which Qwen's tokenizers use:
/// each byte is one printable character, the printable Latin-1 ones themselves and the others
/// U+0100 onwards in byte order), or `None` if `token` holds a character outside that scheme.
pub fn byte_level_bytes(token: &str) -> Option<Vec<u8>> {
    let kept = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    token
        .chars()
        .map(|c| {
            let c = c as u32;
            if c < 0x100 {
                return kept(c as u8).then_some(c as u8);
            }
            // The n-th byte (in order) that is not kept stands as U+0100 + n.
            static OTHERS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let others = OTHERS.get_or_init(|| (0..=255u8).filter(|&b| !kept(b)).collect());
            others.get((c - 0x100) as usize).copied()
        })
        .collect()
}

pub struct TokenTexts {
    /// Each token's bytes by id, exactly (a token of a byte-level vocabulary may hold part of
    /// a character); empty for tokens that may not be written in JSON (added tokens, end of
    /// turn).
    texts: Vec<Vec<u8>>,
    /// Ids of the non-empty texts, by text (bytewise).
    sorted: Vec<u32>,
    /// Ids of the non-empty texts that are not plain, by text.
    sorted_other: Vec<u32>,
    /// Ids of the plain texts, ascending.
    plain: Vec<u32>,
    /// Each plain text's length in characters, as `plain` orders them.
    plain_chars: Vec<u16>,
}

impl TokenTexts {
    pub fn new(texts: Vec<Vec<u8>>) -> Self {
        let plain_by_id: Vec<bool> = texts.iter().map(|t| is_plain(t)).collect();
        let mut sorted: Vec<u32> = (0..texts.len() as u32)
            .filter(|&id| !texts[id as usize].is_empty())
            .collect();
        let plain: Vec<u32> = sorted
            .iter()
            .copied()
            .filter(|&id| plain_by_id[id as usize])
            .collect();
        sorted.sort_by(|&a, &b| texts[a as usize].cmp(&texts[b as usize]));
        let sorted_other = sorted
            .iter()
            .copied()
            .filter(|&id| !plain_by_id[id as usize])
            .collect();
        let plain_chars = plain
            .iter()
            .map(|&id| {
                let text = std::str::from_utf8(&texts[id as usize]).unwrap_or_default();
                text.chars().count().min(u16::MAX as usize) as u16
            })
            .collect();
        Self {
            texts,
            sorted,
            sorted_other,
            plain,
            plain_chars,
        }
    }

    /// Each token's text by id (see [`TokenTexts::texts`]).
    pub fn texts(&self) -> &[Vec<u8>] {
        &self.texts
    }

    /// The tokens whose text keeps what `json` has read a JSON object's prefix (one that
    /// `schema` allows, when given), ascending. Ids past the texts (padding rows of the head)
    /// are never allowed.
    pub(super) fn json_tokens(
        &self,
        json: JsonPrefix,
        schema: Option<&ArgumentSchema>,
    ) -> Vec<u32> {
        let mut allowed = Vec::new();
        if let Some(chars_left) = json.plain_text(schema) {
            self.walk(&self.sorted_other, 0, json, schema, &mut allowed);
            allowed.sort_unstable();
            if chars_left == UNBOUNDED {
                return merge(self.plain.iter().copied(), &allowed);
            }
            // A string with a `maxLength`: the plain texts that fit what it still allows.
            let fitting = (self.plain.iter().zip(&self.plain_chars))
                .filter(move |&(_, &n)| n <= chars_left)
                .map(|(&id, _)| id);
            return merge(fitting, &allowed);
        }
        self.walk(&self.sorted, 0, json, schema, &mut allowed);
        allowed.sort_unstable();
        allowed
    }

    /// Pushes the ids in `range` whose texts `json` can go on reading. `range`: sorted texts
    /// that share their first `depth` bytes, which `json` has read.
    fn walk(
        &self,
        range: &[u32],
        depth: usize,
        json: JsonPrefix,
        schema: Option<&ArgumentSchema>,
        out: &mut Vec<u32>,
    ) {
        let text = |id: u32| self.texts[id as usize].as_slice();
        // A text that is the shared prefix itself sorts first, and has been read whole.
        let mut rest = range;
        while let Some((&id, tail)) = rest.split_first() {
            if text(id).len() > depth {
                break;
            }
            out.push(id);
            rest = tail;
        }
        if rest.len() <= SMALL_RANGE {
            out.extend(
                rest.iter()
                    .filter(|&&id| json.after_bytes(&text(id)[depth..], schema).is_some()),
            );
            return;
        }
        // The rest, split by their next byte: each part a range of its own.
        while let Some(&first) = rest.first() {
            let b = text(first)[depth];
            let end = rest.partition_point(|&id| text(id)[depth] <= b);
            if let Some(next) = json.after_byte(b, schema) {
                self.walk(&rest[..end], depth + 1, next, schema, out);
            }
            rest = &rest[end..];
        }
    }

    /// What [`TokenTexts::json_tokens`] gives, by reading every token's text: the definition
    /// the index is tested and benchmarked against.
    pub(super) fn json_tokens_one_by_one(
        &self,
        json: JsonPrefix,
        schema: Option<&ArgumentSchema>,
    ) -> Vec<u32> {
        (0..self.texts.len() as u32)
            .filter(|&id| {
                let text = &self.texts[id as usize];
                !text.is_empty() && json.after_bytes(text, schema).is_some()
            })
            .collect()
    }
}

/// The ascending union of two ascending lists without common elements.
fn merge(a: impl Iterator<Item = u32>, b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.size_hint().0 + b.len());
    let mut b = b.iter().copied().peekable();
    for x in a {
        while let Some(y) = b.next_if(|&y| y < x) {
            out.push(y);
        }
        out.push(x);
    }
    out.extend(b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Texts that reach every part of the checker: structure, strings with escapes and `\u`
    /// (surrogates too), numbers, literals, blanks, control bytes, multi-byte characters, and
    /// the replacement character a lone byte of a byte-level vocabulary decodes to.
    fn vocabulary() -> TokenTexts {
        let mut texts: Vec<String> = [
            "",
            "{",
            "}",
            "{\"",
            "\"",
            "\":",
            "\": ",
            "\":\"",
            "\",",
            "\", \"",
            ",",
            ", ",
            "[",
            "]",
            "[\"",
            "\"]",
            "\"}",
            "}}",
            "]}",
            ":",
            " ",
            "  ",
            "\n",
            "\t",
            "\r\n",
            "\\",
            "\\\"",
            "\\n",
            "\\u",
            "\\u00",
            "e9",
            "D8",
            "d83d",
            "DC00",
            "0",
            "1",
            "12",
            "-",
            "-1",
            ".",
            ".5",
            "e",
            "E+",
            "1e",
            "true",
            "tr",
            "ue",
            "false",
            "null",
            "nu",
            "city",
            "Oslo",
            " Oslo",
            "unit",
            "celsius",
            "cel",
            "sius",
            "fahrenheit",
            "days",
            "3",
            "7",
            "\"c",
            "\"u",
            "\"d",
            "ity",
            "nit",
            "ays",
            "a",
            "ab",
            "é",
            "日本",
            "\u{FFFD}",
            "\u{1}",
            "x\u{1f}",
            "\u{7f}",
            "Hello world",
            "a\"b",
            "a\\b",
            "<|im_end|>",
            "}\n",
            "\"\n",
            "{\"city\": \"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every byte below 0x80 alone, as byte-level vocabularies hold; then pairs and triples
        // of JSON's bytes, so that ranges sharing a prefix are long enough to be split.
        texts.extend((0u8..0x80).map(|b| (b as char).to_string()));
        let pairs = "{}[]\":, \n\\0123-.eEtrunl";
        let triples = "{}\":, 1e\\u";
        for a in pairs.chars() {
            for b in pairs.chars() {
                texts.push(format!("{a}{b}"));
            }
        }
        for a in triples.chars() {
            for b in triples.chars() {
                for c in triples.chars() {
                    texts.push(format!("{a}{b}{c}"));
                }
            }
        }
        let mut texts: Vec<Vec<u8>> = texts.into_iter().map(String::into_bytes).collect();
        // Parts of characters, as byte-level vocabularies hold, and bytes no valid UTF-8 has
        // (overlong, surrogate, past U+10FFFF, a lone continuation).
        let east = "東".as_bytes();
        for part in [
            &east[..1],
            &east[..2],
            &east[1..],
            &east[2..],
            &[0xC3],
            &[0xA9, b'"'],
            &[0xC0, 0x80],
            &[0xED, 0xA0, 0x80],
            &[0xF4, 0x90, 0x80, 0x80],
            &[0xF0, 0x9F, 0x98],
            &[0x80],
        ] {
            texts.push(part.to_vec());
        }
        TokenTexts::new(texts)
    }

    /// Prefixes of objects, taken byte by byte, with and without the schema: every state the
    /// checker reaches on them.
    fn states(schema: Option<&ArgumentSchema>) -> Vec<JsonPrefix> {
        let objects = [
            r#"{"city": "Oslo \"Norway\" \u00e9\ud83d\ude00 日本", "days": 3, "unit": "celsius"}"#,
            r#"{"unit":"fahrenheit","city":"a\\b","days":-12}"#,
            r#"{ "city" : "x" , "days" : 7 }"#,
            r#"{"a": [1, -2.5e+3, true, false, null, {"b": "c\n"}], "d": {}}"#,
            r#"{"trip": {"from": "Oslo \"x\" 日本", "stops": 3}, "tags": ["a", "ab"]}"#,
            r#"{"legs": [{"km": 2.5, "mode": "foot"}, {"km": -1}], "trip": {"from": ""}}"#,
            r#"{"code": "Os日", "note": "ab\n日本 x", "tag": ""}"#,
            r#"{"code": "x\"", "note": "Oslo", "tag": "", "days": 14}"#,
            r#"{"days": -7, "code": "abc"}"#,
        ];
        let mut out = Vec::new();
        for object in objects {
            let mut json = JsonPrefix::new();
            out.push(json);
            for b in object.bytes() {
                match json.after_byte(b, schema) {
                    Some(next) => json = next,
                    None => break,
                }
                out.push(json);
            }
        }
        out
    }

    fn schema() -> ArgumentSchema {
        ArgumentSchema::from_schema(&json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        }))
        .unwrap()
    }

    /// Keys, types and listed values below the top level.
    fn nested() -> ArgumentSchema {
        ArgumentSchema::from_schema(&json!({
            "type": "object",
            "required": ["trip"],
            "properties": {
                "trip": {"type": "object", "required": ["from"], "properties": {
                    "from": {"type": "string"}, "stops": {"type": "integer"}}},
                "tags": {"type": "array", "items": {"enum": ["a", "ab"]}},
                "legs": {"type": "array", "items": {"type": "object", "properties": {
                    "km": {"type": "number"}, "mode": {"enum": ["car", "foot"]}}}},
            },
        }))
        .unwrap()
    }

    /// Strings with length bounds: inside them only plain texts that fit are taken whole.
    fn bounded() -> ArgumentSchema {
        ArgumentSchema::from_schema(&json!({
            "type": "object",
            "properties": {
                "code": {"type": "string", "minLength": 2, "maxLength": 3},
                "note": {"type": "string", "maxLength": 8},
                "tag": {"type": "string", "maxLength": 0},
                "days": {"type": "integer", "minimum": -9, "maximum": 30},
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_index_allows_exactly_the_tokens_read_one_by_one() {
        let vocab = vocabulary();
        let (schema, nested, bounded) = (schema(), nested(), bounded());
        let (mut plain_states, mut bounded_states) = (0, 0);
        for args in [None, Some(&schema), Some(&nested), Some(&bounded)] {
            let states = states(args);
            assert!(states.len() > 100, "{}", states.len());
            for json in states {
                plain_states += json.plain_text(args).is_some() as usize;
                bounded_states += json.plain_text(args).is_some_and(|n| n != UNBOUNDED) as usize;
                assert_eq!(
                    vocab.json_tokens(json, args),
                    vocab.json_tokens_one_by_one(json, args),
                    "{json:?}"
                );
            }
        }
        assert!(plain_states > 20, "the plain path is taken: {plain_states}");
        assert!(bounded_states > 10, "with a maximum: {bounded_states}");
    }

    #[test]
    fn plain_text_leaves_a_free_string_where_it_was() {
        let vocab = vocabulary();
        let (schema, nested) = (schema(), nested());
        for args in [None, Some(&schema), Some(&nested)] {
            for json in states(args) {
                let kept = vocab
                    .plain
                    .iter()
                    .all(|&id| json.after_bytes(&vocab.texts[id as usize], args) == Some(json));
                // The fast path only where it holds, and wherever inside a string it holds
                // for every plain text (not in a key or a listed value being spelled).
                if json.plain_text(args).is_some() {
                    assert!(kept, "{json:?}");
                }
            }
        }
        let free = JsonPrefix::new().after("{\"a\": \"x", None).unwrap();
        assert!(free.plain_text(None).is_some());
        let key = JsonPrefix::new().after("{\"ci", Some(&schema)).unwrap();
        assert!(key.plain_text(Some(&schema)).is_none());
        let listed = JsonPrefix::new()
            .after("{\"unit\": \"cel", Some(&schema))
            .unwrap();
        assert!(listed.plain_text(Some(&schema)).is_none());
        let value = JsonPrefix::new()
            .after("{\"city\": \"Os", Some(&schema))
            .unwrap();
        assert!(value.plain_text(Some(&schema)).is_some());
        let escaped = JsonPrefix::new().after("{\"a\": \"x\\", None).unwrap();
        assert!(escaped.plain_text(None).is_none());
    }

    #[test]
    fn plain_means_no_quote_backslash_or_control_byte() {
        assert!(is_plain(b"Hello, world"));
        assert!(is_plain("日本\u{7f}".as_bytes()));
        assert!(!is_plain(b""));
        assert!(!is_plain(b"a\"b"));
        assert!(!is_plain(b"a\\b"));
        assert!(!is_plain(b"a\nb"));
        assert!(!is_plain(b"\x1f"));
        // Part of a character: the string is not where it was after it.
        assert!(!is_plain(&"東".as_bytes()[..2]));
        assert!(!is_plain(&"東".as_bytes()[1..]));
    }

    /// GPT-2's byte-level characters: `Ġ` is a blank, `Ċ` a line feed, Latin-1 letters stand
    /// for themselves, a character outside the scheme is refused.
    #[test]
    fn byte_level_tokens_map_back_to_their_bytes() {
        assert_eq!(byte_level_bytes("ĠOslo").unwrap(), b" Oslo");
        assert_eq!(byte_level_bytes("Ċ").unwrap(), b"\n");
        assert_eq!(byte_level_bytes("Ā").unwrap(), [0u8]);
        assert_eq!(byte_level_bytes("Ã©").unwrap(), "é".as_bytes());
        assert_eq!(byte_level_bytes("æĿ±").unwrap(), "東".as_bytes());
        assert_eq!(byte_level_bytes("Ń").unwrap(), [0xAD]);
        assert_eq!(byte_level_bytes("ł").unwrap(), [0xA0]);
        assert_eq!(byte_level_bytes("東"), None);
        // All 256 bytes, each from its own character.
        let mut seen = std::collections::BTreeSet::new();
        for c in ('!'..='~')
            .chain('¡'..='¬')
            .chain('®'..='ÿ')
            .chain('Ā'..='Ń')
        {
            seen.insert(byte_level_bytes(&c.to_string()).unwrap()[0]);
        }
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn merge_keeps_the_union_ascending() {
        assert_eq!(
            merge([1, 4, 9].into_iter(), &[0, 5, 10, 11]),
            vec![0, 1, 4, 5, 9, 10, 11]
        );
        assert_eq!(merge([].into_iter(), &[2]), vec![2]);
        assert_eq!(merge([3].into_iter(), &[]), vec![3]);
        assert_eq!(merge([2, 3].into_iter(), &[0, 1]), vec![0, 1, 2, 3]);
    }
}
