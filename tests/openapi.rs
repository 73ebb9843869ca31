//! `openapi.yaml` and the router agree: every route in the source is in the spec and every
//! spec operation is served (not the unknown-route 404 or a 405), and the spec documents the
//! SSE media type and the error shape.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// (method, path) of every operation under `paths:` in openapi.yaml.
fn spec_operations(yaml: &str) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let (Some(m), Some(p)) = (line.strip_prefix("    "), &path) {
            let m = m.trim_end().trim_end_matches(':');
            if METHODS.contains(&m) {
                ops.insert((m.to_string(), p.clone()));
            }
        }
    }
    ops
}

/// (method, path) of every `.route("path", method(..)…)` in the crate's source.
fn source_routes(dir: &Path, out: &mut BTreeSet<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_routes(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let mut rest = src.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let Some(q) = rest.trim_start().strip_prefix('"') else {
                continue;
            };
            // axum's catch-all `{*name}` is OpenAPI's `{name}`.
            let route = q[..q.find('"').unwrap()].replace("{*", "{");
            // The arguments up to the matching parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .unwrap()
                .0;
            let args = &rest[..end];
            for m in METHODS {
                let call = format!("{m}(");
                let mut from = 0;
                while let Some(j) = args[from..].find(&call) {
                    let at = from + j;
                    let before = args[..at].chars().last().unwrap_or(' ');
                    if !before.is_alphanumeric() && before != '_' {
                        out.insert((m.to_string(), route.clone()));
                    }
                    from = at + call.len();
                }
            }
        }
    }
}

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_route_is_in_the_spec_and_every_operation_is_routed() {
    let yaml = std::fs::read_to_string(manifest().join("openapi.yaml")).unwrap();
    let spec = spec_operations(&yaml);
    let mut routes = BTreeSet::new();
    source_routes(&manifest().join("src"), &mut routes);
    assert!(spec.len() >= 14, "{spec:?}");
    let missing_in_spec: Vec<_> = routes.difference(&spec).collect();
    let missing_in_router: Vec<_> = spec.difference(&routes).collect();
    assert!(
        missing_in_spec.is_empty(),
        "routes not in openapi.yaml: {missing_in_spec:?}"
    );
    assert!(
        missing_in_router.is_empty(),
        "operations not routed: {missing_in_router:?}"
    );
}

#[test]
fn the_spec_documents_the_stream_and_the_error_shape() {
    let yaml = std::fs::read_to_string(manifest().join("openapi.yaml")).unwrap();
    let events = &yaml[yaml
        .find("  /v1/fine_tuning/jobs/{job_id}/events:")
        .unwrap()..];
    let events = &events[..events.find("\n  /").unwrap_or(events.len())];
    for needle in [
        "text/event-stream",
        "Last-Event-ID",
        "access_token",
        "X-Accel-Buffering",
        "\"204\"",
    ] {
        assert!(events.contains(needle), "events route lacks {needle}");
    }
    let error = &yaml[yaml.find("    Error:").unwrap()..];
    assert!(error.contains("required: [message, type, param, code]"));
    assert!(yaml.contains("Idempotency-Key"));
}

/// Each documented operation reaches a handler on the real server.
#[tokio::test]
async fn every_operation_is_served() {
    let yaml = std::fs::read_to_string(manifest().join("openapi.yaml")).unwrap();
    let env = common::Env::new();
    let s = env.start();
    for (method, path) in spec_operations(&yaml) {
        let url = s.url(
            &path
                .replace("{file_id}", "file-x")
                .replace("{job_id}", "ftjob-x"),
        );
        let req = s
            .client
            .request(method.to_uppercase().parse().unwrap(), &url)
            .header("content-type", "application/json")
            .body("{}");
        let (st, v) = common::status_json(req.send().await.unwrap()).await;
        assert_ne!(st, 405, "{method} {path}");
        assert_ne!(v["error"]["code"], "unknown_route", "{method} {path}");
        assert!(st < 500, "{method} {path}: {st} {v}");
    }
    // And something undocumented is not.
    let (st, v) = s.get("/v1/embeddings").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("unknown_route"))
    );
}
