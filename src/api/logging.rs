//! Logging that never records a secret: the request span carries the URI with credential query
//! values replaced and no header values, and every log line passes through a writer that masks
//! the configured secrets (the API key, the Hugging Face token) wherever they would still appear.

use crate::config::Config;
use axum::http::{Request, Uri};
use std::io;
use std::sync::Arc;
use tracing_subscriber::fmt::MakeWriter;

/// Query parameters whose values are credentials.
const SECRET_PARAMS: [&str; 4] = ["access_token", "token", "api_key", "key"];
/// What a redacted value reads as in logs.
const REDACTED: &str = "<redacted>";
/// Secrets shorter than this are not masked in free text: masking a two-letter key would mangle
/// every line while protecting nothing.
const MIN_MASKED_LEN: usize = 6;

/// Sets up logging for the service: `SFTD_LOG_FORMAT` text or json, level from `RUST_LOG`
/// (default `info`), the configured secrets masked in every line.
pub fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let secrets = [config.api_key(), config.hf_token.as_deref()]
        .into_iter()
        .flatten()
        .filter(|s| s.len() >= MIN_MASKED_LEN)
        .map(String::from)
        .collect();
    let writer = MaskingWriter::new(secrets);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = if config.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The span of one HTTP request (for tower-http's `TraceLayer`): method, path and query with
/// credential values redacted, HTTP version. Header values are never recorded.
pub fn request_span(req: &Request<axum::body::Body>) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method = %req.method(),
        uri = %redacted_uri(req.uri()),
        version = ?req.version(),
    )
}

/// The path and query of `uri` with the value of every credential parameter replaced.
pub fn redacted_uri(uri: &Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_param(name) => format!("{name}={REDACTED}"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// Makes writers to stdout (where tracing-subscriber writes by default) that mask secrets.
#[derive(Clone)]
pub struct MaskingWriter {
    /// Each secret in the forms it can take in a log line: as is and percent-encoded.
    patterns: Arc<Vec<Vec<u8>>>,
}

impl MaskingWriter {
    pub fn new(secrets: Vec<String>) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for s in &secrets {
            for form in [s.clone(), percent_encode(s, false), percent_encode(s, true)] {
                if !patterns.iter().any(|p| p == form.as_bytes()) {
                    patterns.push(form.into_bytes());
                }
            }
        }
        // Longest first, so a secret that contains another is masked whole.
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Self {
            patterns: Arc::new(patterns),
        }
    }

    /// `line` with every occurrence of a secret replaced.
    pub fn mask(&self, line: &[u8]) -> Vec<u8> {
        let mut out = line.to_vec();
        for p in self.patterns.iter() {
            out = replace_all(&out, p, REDACTED.as_bytes());
        }
        out
    }
}

impl<'a> MakeWriter<'a> for MaskingWriter {
    type Writer = MaskedStdout;

    fn make_writer(&'a self) -> Self::Writer {
        MaskedStdout(self.clone())
    }
}

/// One event's writer. tracing-subscriber formats an event completely, then writes it with a
/// single `write_all`, so each `write` call sees whole lines and no secret is split across calls.
pub struct MaskedStdout(MaskingWriter);

impl io::Write for MaskedStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let masked = if self.0.patterns.is_empty() {
            buf.to_vec()
        } else {
            self.0.mask(buf)
        };
        io::stdout().lock().write_all(&masked)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// Percent-encodes every byte outside RFC 3986's unreserved set, with upper- or lower-case hex.
fn percent_encode(s: &str, lower: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else if lower {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_query_values_are_redacted() {
        let uri: Uri = "/v1/fine_tuning/jobs/j/events?after=3&access_token=s3cret%2Fkey&Token=x"
            .parse()
            .unwrap();
        assert_eq!(
            redacted_uri(&uri),
            "/v1/fine_tuning/jobs/j/events?after=3&access_token=<redacted>&Token=<redacted>"
        );
        let plain: Uri = "/v1/files?limit=2".parse().unwrap();
        assert_eq!(redacted_uri(&plain), "/v1/files?limit=2");
    }

    #[test]
    fn secrets_are_masked_in_every_form() {
        let w = MaskingWriter::new(vec!["s3cret/key".into()]);
        let line = b"a s3cret/key b s3cret%2Fkey c s3cret%2fkey d s3cret";
        assert_eq!(
            String::from_utf8(w.mask(line)).unwrap(),
            "a <redacted> b <redacted> c <redacted> d s3cret"
        );
    }
}
