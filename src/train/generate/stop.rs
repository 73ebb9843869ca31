//! Stop strings over a growing completion: where the first one ends the text, and how much of
//! the text is final (no partial character, no tail that could still become a stop string).

/// Byte offset of the first stop string in `text` that ends after byte `from`.
pub(super) fn find_stop(text: &str, stop: &[String], from: usize) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let start = from.saturating_sub(s.len() - 1);
            let start = (start..=from).find(|&i| text.is_char_boundary(i))?;
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
        assert_eq!(find_stop("abcEN", &stop, 3), None);
        assert_eq!(find_stop("abcEND", &stop, 5), Some(3));
        assert_eq!(
            find_stop("ENDabc", &stop, 6),
            None,
            "already emitted text is not searched"
        );
        assert_eq!(final_prefix_len("abcEN", &stop), 3);
        assert_eq!(final_prefix_len("abcx", &stop), 4);
        assert_eq!(final_prefix_len("ab\u{FFFD}", &[]), 2);
    }
}
