//! The dashboard: the files under `static/`, embedded in the binary and served at `/` (the page)
//! and `/static/*` (its ES modules, styles and the vendored uPlot), each with its content type.
//! No build step, no CDN: the page works offline. Merge [`routes`] into the app's router; it
//! needs no state.

use axum::{
    body::Body,
    extract::Path,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

/// One embedded file.
struct Asset {
    /// Path under `static/` (and under `/static/` in URLs).
    path: &'static str,
    body: &'static [u8],
    content_type: &'static str,
    cache_control: &'static str,
    /// FNV-1a of the body, computed at compile time; the strong ETag.
    hash: u64,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Our own files change with the binary: always revalidate (cheap 304s through the ETag).
const REVALIDATE: &str = "no-cache";
/// The vendored library changes only with its version.
const VENDOR: &str = "public, max-age=86400";

const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! asset {
    ($path:literal, $ct:expr, $cache:expr) => {
        Asset {
            path: $path,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/static/", $path)),
            content_type: $ct,
            cache_control: $cache,
            hash: fnv1a64(include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/static/",
                $path
            ))),
        }
    };
}

static ASSETS: &[Asset] = &[
    asset!("index.html", HTML, REVALIDATE),
    asset!("app.js", JS, REVALIDATE),
    asset!("api.js", JS, REVALIDATE),
    asset!("chart.js", JS, REVALIDATE),
    asset!("chatstream.js", JS, REVALIDATE),
    asset!("dom.js", JS, REVALIDATE),
    asset!("form.js", JS, REVALIDATE),
    asset!("format.js", JS, REVALIDATE),
    asset!("job.js", JS, REVALIDATE),
    asset!("jobs.js", JS, REVALIDATE),
    asset!("playground.js", JS, REVALIDATE),
    asset!("results.js", JS, REVALIDATE),
    asset!("router.js", JS, REVALIDATE),
    asset!("series.js", JS, REVALIDATE),
    asset!("stream.js", JS, REVALIDATE),
    asset!("upload.js", JS, REVALIDATE),
    asset!("vocabulary.js", JS, REVALIDATE),
    asset!("app.css", CSS, REVALIDATE),
    asset!("vendor/uPlot.iife.min.js", JS, VENDOR),
    asset!("vendor/uPlot.min.css", CSS, VENDOR),
    asset!("vendor/LICENSE", TEXT, VENDOR),
];

/// Same-origin only; inline styles are allowed because uPlot and the progress bars set them.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; base-uri 'self'; \
                   form-action 'self'; frame-ancestors 'none'";

/// `GET /` → the page, `GET /static/{path}` → its files.
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/static/{*path}", get(static_file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn static_file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, HeaderValue::from_static(TEXT))],
            "not found\n",
        )
            .into_response();
    };
    let etag = format!("\"{:016x}\"", asset.hash);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == etag || t == "*")
        });
    let mut builder = Response::builder()
        .header(header::CACHE_CONTROL, asset.cache_control)
        .header(header::ETAG, &etag)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if asset.content_type == HTML {
        builder = builder
            .header(header::CONTENT_SECURITY_POLICY, CSP)
            .header(header::REFERRER_POLICY, "no-referrer")
            .header(header::X_FRAME_OPTIONS, "DENY");
    }
    let response = if fresh {
        builder.status(StatusCode::NOT_MODIFIED).body(Body::empty())
    } else {
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, asset.content_type)
            .body(Body::from(asset.body))
    };
    response.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(v) = if_none_match {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
        }
        serve(path, &headers)
    }

    fn header_of(r: &Response, name: header::HeaderName) -> String {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn router_builds() {
        // axum validates route syntax when the router is built.
        let _router: Router<()> = routes();
    }

    #[test]
    fn serves_each_file_with_its_type_and_cache_policy() {
        let r = get("index.html", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header_of(&r, header::CONTENT_TYPE), HTML);
        assert_eq!(header_of(&r, header::CACHE_CONTROL), "no-cache");
        assert!(header_of(&r, header::CONTENT_SECURITY_POLICY).contains("script-src 'self'"));
        // Every ES module of the page, or the browser refuses to run it.
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let r = get(a.path, None);
            assert_eq!(r.status(), StatusCode::OK, "{}", a.path);
            assert_eq!(header_of(&r, header::CONTENT_TYPE), JS, "{}", a.path);
        }
        let r = get("app.css", None);
        assert_eq!(header_of(&r, header::CONTENT_TYPE), CSS);
        let r = get("vendor/uPlot.iife.min.js", None);
        assert_eq!(header_of(&r, header::CONTENT_TYPE), JS);
        assert!(header_of(&r, header::CACHE_CONTROL).contains("max-age"));
        assert_eq!(get("nope.js", None).status(), StatusCode::NOT_FOUND);
        assert_eq!(get("../Cargo.toml", None).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn etag_revalidation_gives_304() {
        let etag = header_of(&get("app.js", None), header::ETAG);
        assert!(etag.starts_with('"') && etag.len() == 18);
        let r = get("app.js", Some(&etag));
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header_of(&r, header::ETAG), etag);
        assert_eq!(get("app.js", Some("\"0000\"")).status(), StatusCode::OK);
    }

    /// Every file the page references, and every file under static/, is embedded.
    #[test]
    fn everything_the_page_loads_is_embedded() {
        let embedded: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        for part in index.split("\"static/").skip(1) {
            let path = &part[..part.find('"').unwrap()];
            assert!(
                embedded.contains(&path),
                "index.html loads static/{path}, not embedded"
            );
        }
        for a in ASSETS
            .iter()
            .filter(|a| a.path.ends_with(".js") && !a.path.starts_with("vendor/"))
        {
            let src = std::str::from_utf8(a.body).unwrap();
            for part in src.split("from './").skip(1) {
                let path = &part[..part.find('\'').unwrap()];
                assert!(
                    embedded.contains(&path),
                    "{} imports ./{path}, not embedded",
                    a.path
                );
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("static");
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                if rel.ends_with("README.md") {
                    continue;
                }
                assert!(
                    embedded.contains(&rel.as_str()),
                    "static/{rel} is not embedded in ui.rs"
                );
            }
        }
    }
}
