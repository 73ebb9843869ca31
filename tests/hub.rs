//! Model resolution against a tiny fake Hugging Face hub on 127.0.0.1: download into HF_HOME,
//! HF_TOKEN for gated repos, 404 for unknown repos, a failing or unreachable hub told apart from
//! a missing model, offline use of the cache, and the local directory roots (anything outside
//! SFTD_MODEL_DIRS refused).

mod common;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sftd::config::Config;
use sftd::hub::{Hub, HubError, ModelRef};
use std::collections::BTreeMap;
use std::sync::Arc;

const TOKEN: &str = "hf_test_token";
/// A repo name for which the fake hub answers 503, as a hub in trouble does.
const FAILING: &str = "hub-error";

/// repo id → (gated, files).
type Repos = Arc<BTreeMap<String, (bool, BTreeMap<String, Vec<u8>>)>>;

fn model_files(tag: &str) -> BTreeMap<String, Vec<u8>> {
    [
        (
            "config.json",
            format!("{{\"model_type\":\"qwen3\",\"tag\":\"{tag}\"}}"),
        ),
        ("tokenizer.json", "{\"version\":\"1.0\"}".to_string()),
        (
            "tokenizer_config.json",
            "{\"chat_template\":\"x\"}".to_string(),
        ),
        (
            "model.safetensors",
            format!("weights-of-{tag}-").repeat(1000),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_bytes()))
    .collect()
}

fn authorized(gated: bool, headers: &HeaderMap) -> bool {
    !gated
        || headers
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap_or("") == format!("Bearer {TOKEN}"))
}

async fn info(
    State(repos): State<Repos>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if name == FAILING {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match repos.get(&format!("{owner}/{name}")) {
        Some((gated, files)) if authorized(*gated, &headers) => Json(json!({
            "sha": "0123456789abcdef0123456789abcdef01234567",
            "siblings": files.keys().map(|f| json!({"rfilename": f})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Some(_) => StatusCode::UNAUTHORIZED.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn resolve(
    State(repos): State<Repos>,
    Path((owner, name, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some((gated, files)) = repos.get(&format!("{owner}/{name}")) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if !authorized(*gated, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(bytes) = files.get(&file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let size = bytes.len();
    let (start, end) = headers
        .get("range")
        .and_then(|r| {
            r.to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .split_once('-')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .map(|(a, b)| {
            (
                a.parse::<usize>().unwrap_or(0),
                b.parse::<usize>().unwrap_or(size - 1).min(size - 1),
            )
        })
        .unwrap_or((0, size - 1));
    let etag = format!("\"etag-{owner}-{name}-{file}\"");
    (
        StatusCode::PARTIAL_CONTENT,
        [
            ("etag", etag),
            (
                "x-repo-commit",
                "0123456789abcdef0123456789abcdef01234567".to_string(),
            ),
            ("content-range", format!("bytes {start}-{end}/{size}")),
        ],
        bytes[start..=end].to_vec(),
    )
        .into_response()
}

/// Serves the repos until the returned handle is aborted; returns its base URL.
async fn fake_hub(repos: Repos) -> (String, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route("/api/models/{owner}/{name}/revision/main", get(info))
        .route("/{owner}/{name}/resolve/main/{file}", get(resolve))
        .with_state(repos);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

fn repos() -> Repos {
    let mut m = BTreeMap::new();
    m.insert("acme/tiny-qwen3".to_string(), (false, model_files("tiny")));
    m.insert("acme/gated".to_string(), (true, model_files("gated")));
    let mut no_weights = model_files("nw");
    no_weights.remove("model.safetensors");
    m.insert("acme/no-weights".to_string(), (false, no_weights));
    Arc::new(m)
}

fn config(dir: &std::path::Path, endpoint: &str, token: Option<&str>) -> Config {
    let mut c = Config::for_data_dir(&dir.join("data"));
    c.hf_home = Some(dir.join("hf"));
    c.hf_endpoint = endpoint.to_string();
    c.hf_token = token.map(String::from);
    c
}

#[tokio::test]
async fn hub_models_download_into_hf_home_and_work_offline_after() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, server) = fake_hub(repos()).await;
    let hub = Hub::new(&config(dir.path(), &endpoint, None));

    assert_eq!(
        hub.check("acme/tiny-qwen3").await.unwrap(),
        ModelRef::Hub("acme/tiny-qwen3".into())
    );
    let model_dir = hub.resolve("acme/tiny-qwen3").await.unwrap();
    assert!(
        model_dir.starts_with(dir.path().join("hf").join("hub")),
        "{}",
        model_dir.display()
    );
    for (name, bytes) in model_files("tiny") {
        assert_eq!(
            std::fs::read(model_dir.join(&name)).unwrap(),
            bytes,
            "{name}"
        );
    }
    // Unknown repo: NotFound with a message naming the model.
    match hub.check("acme/missing").await {
        Err(HubError::NotFound(m)) => assert!(m.contains("acme/missing"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Gated repo: refused without HF_TOKEN (and with a wrong one), downloaded with it.
    match hub.check("acme/gated").await {
        Err(HubError::Denied(m)) => assert!(m.contains("set HF_TOKEN"), "{m}"),
        other => panic!("{other:?}"),
    }
    let wrong_token = Hub::new(&config(dir.path(), &endpoint, Some("hf_wrong")));
    match wrong_token.check("acme/gated").await {
        Err(HubError::Denied(m)) => assert!(m.contains("rejected the server's HF_TOKEN"), "{m}"),
        other => panic!("{other:?}"),
    }
    let with_token = Hub::new(&config(dir.path(), &endpoint, Some(TOKEN)));
    let gated = with_token.resolve("acme/gated").await.unwrap();
    assert_eq!(
        std::fs::read(gated.join("config.json")).unwrap(),
        model_files("gated")["config.json"]
    );
    // A repo without weights is a clear error, not a crash.
    match hub.resolve("acme/no-weights").await {
        Err(HubError::Unavailable(m)) => assert!(m.contains("safetensors"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A hub answering 5xx is failing, not saying the model is missing.
    match hub.check(&format!("acme/{FAILING}")).await {
        Err(HubError::Unreachable(m)) => assert!(m.contains("retry"), "{m}"),
        other => panic!("{other:?}"),
    }

    // Hub gone: the cached model still resolves, to the same directory.
    server.abort();
    let _ = server.await;
    let offline = Hub::new(&config(dir.path(), &endpoint, None));
    assert_eq!(offline.resolve("acme/tiny-qwen3").await.unwrap(), model_dir);
    // An unreachable hub says nothing about the model: Unreachable, not NotFound.
    assert!(matches!(
        offline.check("acme/other").await,
        Err(HubError::Unreachable(_))
    ));
}

#[tokio::test]
async fn local_models_only_under_allowed_roots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    let model = root.join("my-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), "{}").unwrap();
    let outside = dir.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("config.json"), "{}").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();

    let mut c = config(dir.path(), "http://127.0.0.1:9", None);
    let no_roots = Hub::new(&c);
    assert!(matches!(
        no_roots.check(model.to_str().unwrap()).await,
        Err(HubError::Invalid(_))
    ));

    c.model_dirs = format!("{}:/nonexistent-root", root.display());
    let hub = Hub::new(&c);
    let canonical = model.canonicalize().unwrap();
    assert_eq!(
        hub.check(model.to_str().unwrap()).await.unwrap(),
        ModelRef::Local(canonical.clone())
    );
    // A bare name found under a root is that directory.
    assert_eq!(
        hub.check("my-model").await.unwrap(),
        ModelRef::Local(canonical)
    );
    for bad in [
        outside.to_str().unwrap().to_string(),
        format!("{}/../elsewhere", root.display()),
        root.join("escape").display().to_string(),
        "/etc".to_string(),
    ] {
        match hub.check(&bad).await {
            Err(HubError::Invalid(m)) => assert!(m.contains("outside"), "{bad}: {m}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(matches!(
        hub.check(root.join("nope").to_str().unwrap()).await,
        Err(HubError::NotFound(_))
    ));
}

/// Through the API, on job creation and chat alike: an unknown hub model (or local directory)
/// is a 404 `model_not_found`; a gated one without a token that may read it is a 403
/// `model_access_denied` that says what to do with HF_TOKEN; a hub that fails (5xx) or cannot be
/// reached is a retryable 503 `hub_unavailable`; a model the hub lists but that cannot be
/// fetched is a 502 `model_unavailable`; no job is stored for any of them.
#[tokio::test]
async fn hub_errors_are_labelled_through_the_api() {
    let (endpoint, _server) = fake_hub(repos()).await;
    let env = common::Env::new().with("HF_ENDPOINT", &endpoint);
    let s = env.start();
    let file = s.upload(&common::example("text.jsonl")).await;
    let create = |model: &str| json!({"model": model, "training_file": file});
    let (st, v) = s
        .post_json("/v1/fine_tuning/jobs", &create("acme/missing"))
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["code"], "model_not_found");

    let r = s
        .client
        .post(s.url("/v1/fine_tuning/jobs"))
        .json(&create(&format!("acme/{FAILING}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "30");
    let (st, v) = common::status_json(r).await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "hub_unavailable");
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["param"], "model");

    // Gated, no HF_TOKEN: a 403 naming the fix, on both routes.
    let (st, v) = s
        .post_json("/v1/fine_tuning/jobs", &create("acme/gated"))
        .await;
    assert_denied(st, &v, "set HF_TOKEN");
    let (st, v) = s
        .post_json("/v1/chat/completions", &chat("acme/gated"))
        .await;
    assert_denied(st, &v, "set HF_TOKEN");
    // A wrong HF_TOKEN is named as the cause.
    let wrong_env = common::Env::new()
        .with("HF_ENDPOINT", &endpoint)
        .with("HF_TOKEN", "hf_wrong");
    let wrong = wrong_env.start();
    let (st, v) = wrong
        .post_json("/v1/chat/completions", &chat("acme/gated"))
        .await;
    assert_denied(st, &v, "rejected the server's HF_TOKEN");
    // Known to the hub, but without weights: the hub's side failed the request, a 502.
    let (st, v) = s
        .post_json("/v1/chat/completions", &chat("acme/no-weights"))
        .await;
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["error"]["code"], "model_unavailable");
    assert_eq!(v["error"]["param"], "model");
    // An unknown hub model on the chat route.
    let (st, v) = s
        .post_json("/v1/chat/completions", &chat("acme/missing"))
        .await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");

    // A local directory that does not exist under the allowed root: 404 on both routes.
    let root = env.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    let local_env = common::Env::new().with("SFTD_MODEL_DIRS", &root.display().to_string());
    let local = local_env.start();
    let missing = root.join("no-such-model").display().to_string();
    let file = local.upload(&common::example("text.jsonl")).await;
    let (st, v) = local
        .post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": missing, "training_file": file}),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{v}"
    );
    assert_eq!(v["error"]["param"], "model");
    let (st, v) = local
        .post_json("/v1/chat/completions", &chat(&missing))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{v}"
    );

    // Nothing listens on port 9: the hub is unreachable.
    let down_env = common::Env::new();
    let down = down_env.start();
    let file = down.upload(&common::example("text.jsonl")).await;
    let (st, v) = down
        .post_json(
            "/v1/fine_tuning/jobs",
            &json!({"model": "acme/tiny-qwen3", "training_file": file}),
        )
        .await;
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "hub_unavailable");
    let r = down
        .client
        .post(down.url("/v1/chat/completions"))
        .json(&chat("acme/tiny-qwen3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "30");
    let (st, v) = common::status_json(r).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (503, Some("hub_unavailable")),
        "{v}"
    );
    for server in [&s, &down, &wrong, &local] {
        let (_, list) = server.get("/v1/fine_tuning/jobs").await;
        assert_eq!(list["data"], json!([]));
    }
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2})
}

/// A 403 `model_access_denied` on `model` whose message contains `hint`.
fn assert_denied(status: u16, v: &serde_json::Value, hint: &str) {
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "model_access_denied");
    assert_eq!(v["error"]["param"], "model");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(hint),
        "{v}"
    );
}

/// Through the API: a job on a (gated) hub model is downloaded with HF_TOKEN into HF_HOME
/// while it validates, then trains to success. The "hub" serves the demo model's files.
#[tokio::test]
async fn a_job_on_a_hub_model_downloads_it_and_trains() {
    let model = tempfile::tempdir().unwrap();
    sftd::train::demo::write_demo_model(model.path()).unwrap();
    let files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(model.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    let mut repos = BTreeMap::new();
    repos.insert("acme/demo-qwen3".to_string(), (true, files));
    let (endpoint, _server) = fake_hub(Arc::new(repos)).await;
    let env = common::Env::new()
        .with("HF_ENDPOINT", &endpoint)
        .with("HF_TOKEN", TOKEN);
    let s = env.start();
    let file = s.upload(&common::example("text.jsonl")).await;
    let mut body = common::tiny_job(&file, 2, 0);
    body["model"] = json!("acme/demo-qwen3");
    let id = s.start_job(&body).await;
    let job = s
        .wait_finished(&id, std::time::Duration::from_secs(120))
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["model"], "acme/demo-qwen3");
    let cached = env
        .path()
        .join("hf")
        .join("hub")
        .join("models--acme--demo-qwen3");
    assert!(cached.join("snapshots").is_dir(), "{}", cached.display());
}
