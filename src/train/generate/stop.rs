//! A growing completion handed on piece by piece: where the first stop string ends the text, how
//! much of the text is final (no partial character, no tail that could still become a stop
//! string), and what of it has been handed on.

/// How many bytes of a growing completion have been handed on.
#[derive(Default)]
pub(super) struct Emitted(pub usize);

impl Emitted {
    /// Keeps what is out within `text`, on a character boundary: decoding more tokens only ever
    /// extends the text, but a tokenizer might disagree.
    fn clamp(&mut self, text: &str) {
        self.0 = self.0.min(text.len());
        while !text.is_char_boundary(self.0) {
            self.0 -= 1;
        }
    }

    /// Where the first of `stop` in what is not out yet begins, if one is there, none beginning
    /// before `floor` (the end of the text forced so far, where stop strings are not looked for).
    pub fn stop_in(&mut self, text: &str, stop: &[String], floor: usize) -> Option<usize> {
        self.clamp(text);
        find_stop(text, stop, self.0, floor)
    }

    /// Hands on what of `text` is final and not out yet (holding back what could still become
    /// one of `stop`). `false`: `on_text` wants no more.
    pub fn more(
        &mut self,
        text: &str,
        stop: &[String],
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> bool {
        self.clamp(text);
        let ready = final_prefix_len(text, stop).max(self.0);
        let from = std::mem::replace(&mut self.0, ready);
        ready == from || on_text(&text[from..ready])
    }
}

/// Byte offset of the first stop string in `text` that ends after byte `from` and begins at or
/// after byte `floor`.
fn find_stop(text: &str, stop: &[String], from: usize, floor: usize) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let start = from.saturating_sub(s.len() - 1).max(floor).min(text.len());
            let start = (start..=text.len()).find(|&i| text.is_char_boundary(i))?;
            text[start..].find(s.as_str()).map(|i| start + i)
        })
        .min()
}

/// How much of `text` is final: all but a trailing partial character (shown as U+FFFD while a
/// multi-byte character is incomplete) and a tail that could still grow into a stop string.
pub(super) fn final_prefix_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let held = stop
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&n| s.is_char_boundary(n))
                .find(|&n| text[..end].ends_with(&s[..n]))
        })
        .max()
        .unwrap_or(0);
    end - held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_pieces() {
        let stop = vec!["END".to_string()];
        assert_eq!(find_stop("abcEN", &stop, 3, 0), None);
        assert_eq!(find_stop("abcEND", &stop, 5, 0), Some(3));
        assert_eq!(
            find_stop("ENDabc", &stop, 6, 0),
            None,
            "already emitted text is not searched"
        );
        // Forced text up to the floor: a stop string may not begin in it, only after it.
        assert_eq!(find_stop("abcEND", &stop, 5, 4), None);
        assert_eq!(find_stop("abcENDxEND", &stop, 5, 4), Some(7));
        assert_eq!(final_prefix_len("abcEN", &stop), 3);
        assert_eq!(final_prefix_len("abcx", &stop), 4);
        assert_eq!(final_prefix_len("ab\u{FFFD}", &[]), 2);
    }
}
