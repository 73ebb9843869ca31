//! API-key auth for `/v1`: `Authorization: Bearer <key>` or `X-Api-Key: <key>` (for proxies
//! that keep `Authorization` for themselves), compared in constant time with `SFTD_API_KEY`;
//! the event stream also accepts `?access_token=` because browsers' EventSource cannot send
//! headers. Key values are never logged (see `logging`).

use super::error::AppError;
use super::AppState;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// The alternative key header.
const X_API_KEY: &str = "x-api-key";

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let allowed = match state.config.api_key() {
        None => true,
        Some(key) => presented_key(&req).is_some_and(|given| matches(&given, key)),
    };
    if allowed {
        next.run(req).await
    } else {
        AppError::unauthorized().into_response()
    }
}

/// The bearer token, else the `X-Api-Key` header, else on the events route the
/// `access_token` query parameter.
fn presented_key(req: &Request) -> Option<String> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let bearer = header(AUTHORIZATION.as_str())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .or_else(|| header(X_API_KEY))
        .map(|v| v.trim().to_string());
    if bearer.is_some() || !req.uri().path().ends_with("/events") {
        return bearer;
    }
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "access_token")
            .map(|(_, v)| percent_decode(v))
    })
}

fn matches(given: &str, key: &str) -> bool {
    given.as_bytes().ct_eq(key.as_bytes()).into()
}

/// Decodes `%XX` escapes and `+` of a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_query_values() {
        assert_eq!(super::percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(super::percent_decode("100%"), "100%");
        assert!(super::matches("k", "k"));
        assert!(!super::matches("k", "kk"));
    }
}
