//! Streaming validation of a JSONL dataset: bytes go in as they arrive, in chunks of any size,
//! and each line is checked as soon as it is complete. Memory stays bounded by one line (at most
//! `MAX_LINE_BYTES` are kept) and the first `MAX_KEPT_ERRORS` errors, whatever the file's size.

use super::{parse_line, DatasetSummary, RowError, MAX_LINE_BYTES};

/// Errors kept for the report; the rest are only counted.
pub const MAX_KEPT_ERRORS: usize = 1000;

/// A rejected dataset: the first [`MAX_KEPT_ERRORS`] bad lines, in order, and how many in all.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidDataset {
    pub errors: Vec<RowError>,
    pub total: usize,
}

/// Feeds on chunks ([`JsonlValidator::push`]) and judges the whole file at the end
/// ([`JsonlValidator::finish`]); the same checks, codes and messages as `parse_jsonl`.
pub struct JsonlValidator {
    /// 1-based number of the line being received.
    line: usize,
    /// The line so far, up to `MAX_LINE_BYTES + 1` bytes (enough to know it is too long).
    buf: Vec<u8>,
    /// The line's full length, counted past what `buf` keeps.
    len: usize,
    /// Whether the line so far is whitespace only (blank lines are skipped).
    blank: bool,
    rows: usize,
    errors: Vec<RowError>,
    total_errors: usize,
}

impl Default for JsonlValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonlValidator {
    pub fn new() -> Self {
        Self {
            line: 1,
            buf: Vec::new(),
            len: 0,
            blank: true,
            rows: 0,
            errors: Vec::new(),
            total_errors: 0,
        }
    }

    /// Takes the next bytes of the file.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (part, rest) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
                None => (bytes, None),
            };
            self.extend_line(part);
            match rest {
                Some(rest) => {
                    self.end_line();
                    bytes = rest;
                }
                None => break,
            }
        }
    }

    /// Bad lines found so far.
    pub fn errors_so_far(&self) -> usize {
        self.total_errors
    }

    /// Checks the last line and returns the verdict on the whole file.
    pub fn finish(mut self) -> Result<DatasetSummary, InvalidDataset> {
        self.end_line();
        if self.rows == 0 && self.total_errors == 0 {
            self.record(super::err(1, "empty_file", "the file contains no rows"));
        }
        if self.total_errors == 0 {
            Ok(DatasetSummary { rows: self.rows })
        } else {
            Err(InvalidDataset {
                errors: self.errors,
                total: self.total_errors,
            })
        }
    }

    fn extend_line(&mut self, part: &[u8]) {
        self.len += part.len();
        self.blank = self.blank && part.iter().all(|b| b.is_ascii_whitespace());
        let room = (MAX_LINE_BYTES + 1).saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn end_line(&mut self) {
        if !self.blank {
            let verdict = if self.len > MAX_LINE_BYTES {
                Err(super::line_too_long(self.line, self.len))
            } else {
                parse_line(self.line, &self.buf)
            };
            match verdict {
                Ok(_) => self.rows += 1,
                Err(e) => self.record(e),
            }
        }
        self.line += 1;
        self.len = 0;
        self.blank = true;
        self.buf.clear();
        // Give back what one huge line took; typical lines fit in the default.
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
    }

    fn record(&mut self, e: RowError) {
        self.total_errors += 1;
        if self.errors.len() < MAX_KEPT_ERRORS {
            self.errors.push(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::parse_jsonl;

    fn corpus() -> Vec<Vec<u8>> {
        let good =
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
        vec![
            format!("{good}\n{{not json\n\n  \n{good}\n[1,2").into_bytes(),
            format!("{good}\r\n{{\"text\":\"t\"}}\r\n").into_bytes(),
            br#"{"prompt":"p","completion":""}"#.to_vec(),
            Vec::new(),
            b"\n \n\t\n".to_vec(),
            [good.as_bytes(), b"\n{\"text\":\"\xff\"}\n42\n"].concat(),
            format!(
                "{good}\n{{\"text\":\"{}\"}}\n{good}",
                "a".repeat(MAX_LINE_BYTES)
            )
            .into_bytes(),
            format!("{}\n", " ".repeat(MAX_LINE_BYTES + 5)).into_bytes(),
        ]
    }

    fn whole_file(bytes: &[u8]) -> Result<usize, Vec<RowError>> {
        parse_jsonl(bytes).map(|rows| rows.len())
    }

    fn streamed(bytes: &[u8], chunk: usize) -> Result<usize, Vec<RowError>> {
        let mut v = JsonlValidator::new();
        for c in bytes.chunks(chunk) {
            v.push(c);
        }
        v.finish().map(|s| s.rows).map_err(|e| {
            assert_eq!(e.total, e.errors.len());
            e.errors
        })
    }

    #[test]
    fn streaming_agrees_with_the_whole_file_parser_at_any_chunk_size() {
        for (i, file) in corpus().iter().enumerate() {
            let want = whole_file(file);
            for chunk in [1, 2, 3, 7, 64, 4096, 1 << 20, usize::MAX] {
                if chunk < 64 && file.len() > 100_000 {
                    continue;
                }
                assert_eq!(streamed(file, chunk), want, "file {i}, chunk {chunk}");
            }
        }
    }

    #[test]
    fn errors_are_counted_past_the_kept_ones() {
        let mut v = JsonlValidator::new();
        for _ in 0..MAX_KEPT_ERRORS + 5 {
            v.push(b"{bad\n");
        }
        let e = v.finish().unwrap_err();
        assert_eq!(e.total, MAX_KEPT_ERRORS + 5);
        assert_eq!(e.errors.len(), MAX_KEPT_ERRORS);
        assert_eq!(e.errors.last().unwrap().line, MAX_KEPT_ERRORS);
    }
}
