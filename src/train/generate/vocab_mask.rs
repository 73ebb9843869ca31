//! The vocabulary indexed for masking a JSON object's tokens: each token's text, the texts in
//! sorted order (a trie laid flat), and the "plain" ones that a string's content takes whole.
//!
//! Read token by token, a mask over Qwen3's 151643 texts costs a millisecond or more where few
//! tokens fit (most fail on their first bytes) and over ten where most do (inside a string,
//! where nearly every text is allowed and each must be read to its end). Sorted, the texts that
//! share a prefix are a range: the mask reads each prefix once and drops the whole range where
//! no object can take it; inside a free string every plain text is allowed without reading it.

use super::argument_schema::ArgumentSchema;
use super::json_prefix::JsonPrefix;

/// A range of sorted texts at most this long is read text by text instead of split further.
const SMALL_RANGE: usize = 16;

/// A text a JSON string's content may hold as it is: no quote, backslash or control byte. Read
/// inside a string it leaves the checker where it was (see [`JsonPrefix::keeps_plain_text`]).
pub(super) fn is_plain(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

pub struct TokenTexts {
    /// By token id; empty for tokens that may not be written in JSON (added tokens, end of
    /// turn).
    texts: Vec<String>,
    /// Ids of the non-empty texts, by text (bytewise).
    sorted: Vec<u32>,
    /// Ids of the non-empty texts that are not plain, by text.
    sorted_other: Vec<u32>,
    /// Ids of the plain texts, ascending.
    plain: Vec<u32>,
}

impl TokenTexts {
    pub fn new(texts: Vec<String>) -> Self {
        let mut sorted: Vec<u32> = (0..texts.len() as u32)
            .filter(|&id| !texts[id as usize].is_empty())
            .collect();
        let plain: Vec<u32> = sorted
            .iter()
            .copied()
            .filter(|&id| is_plain(&texts[id as usize]))
            .collect();
        sorted.sort_by(|&a, &b| {
            texts[a as usize]
                .as_bytes()
                .cmp(texts[b as usize].as_bytes())
        });
        let sorted_other = sorted
            .iter()
            .copied()
            .filter(|&id| !is_plain(&texts[id as usize]))
            .collect();
        Self {
            texts,
            sorted,
            sorted_other,
            plain,
        }
    }

    /// Each token's text by id (see [`TokenTexts::texts`]).
    pub fn texts(&self) -> &[String] {
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
        if json.keeps_plain_text(schema) {
            self.walk(&self.sorted_other, 0, json, schema, &mut allowed);
            allowed.sort_unstable();
            return merge(&self.plain, &allowed);
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
        let text = |id: u32| self.texts[id as usize].as_bytes();
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
                !text.is_empty() && json.after(text, schema).is_some()
            })
            .collect()
    }
}

/// The ascending union of two ascending lists without common elements.
fn merge(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] < b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
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

    #[test]
    fn the_index_allows_exactly_the_tokens_read_one_by_one() {
        let vocab = vocabulary();
        let schema = schema();
        let mut plain_states = 0;
        for args in [None, Some(&schema)] {
            let states = states(args);
            assert!(states.len() > 100, "{}", states.len());
            for json in states {
                plain_states += json.keeps_plain_text(args) as usize;
                assert_eq!(
                    vocab.json_tokens(json, args),
                    vocab.json_tokens_one_by_one(json, args),
                    "{json:?}"
                );
            }
        }
        assert!(plain_states > 20, "the plain path is taken: {plain_states}");
    }

    #[test]
    fn plain_text_leaves_a_free_string_where_it_was() {
        let vocab = vocabulary();
        let schema = schema();
        for args in [None, Some(&schema)] {
            for json in states(args) {
                let kept = vocab
                    .plain
                    .iter()
                    .all(|&id| json.after(&vocab.texts[id as usize], args) == Some(json));
                // The fast path only where it holds, and wherever inside a string it holds
                // for every plain text (not in a key or a listed value being spelled).
                if json.keeps_plain_text(args) {
                    assert!(kept, "{json:?}");
                }
            }
        }
        let free = JsonPrefix::new().after("{\"a\": \"x", None).unwrap();
        assert!(free.keeps_plain_text(None));
        let key = JsonPrefix::new().after("{\"ci", Some(&schema)).unwrap();
        assert!(!key.keeps_plain_text(Some(&schema)));
        let listed = JsonPrefix::new()
            .after("{\"unit\": \"cel", Some(&schema))
            .unwrap();
        assert!(!listed.keeps_plain_text(Some(&schema)));
        let value = JsonPrefix::new()
            .after("{\"city\": \"Os", Some(&schema))
            .unwrap();
        assert!(value.keeps_plain_text(Some(&schema)));
        let escaped = JsonPrefix::new().after("{\"a\": \"x\\", None).unwrap();
        assert!(!escaped.keeps_plain_text(None));
    }

    #[test]
    fn plain_means_no_quote_backslash_or_control_byte() {
        assert!(is_plain("Hello, world"));
        assert!(is_plain("日本\u{7f}"));
        assert!(!is_plain(""));
        assert!(!is_plain("a\"b"));
        assert!(!is_plain("a\\b"));
        assert!(!is_plain("a\nb"));
        assert!(!is_plain("\u{1f}"));
    }

    #[test]
    fn merge_keeps_the_union_ascending() {
        assert_eq!(
            merge(&[1, 4, 9], &[0, 5, 10, 11]),
            vec![0, 1, 4, 5, 9, 10, 11]
        );
        assert_eq!(merge(&[], &[2]), vec![2]);
        assert_eq!(merge(&[3], &[]), vec![3]);
    }
}
