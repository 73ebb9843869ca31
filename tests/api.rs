//! API behaviour that needs no training: bad input answered with clear 4xx and nothing stored,
//! auth on and off, idempotent create, files CRUD and pagination.

mod common;

use common::{example, Env};
use serde_json::{json, Value};

fn hp(h: Value) -> Value {
    json!({"type": "supervised", "supervised": {"hyperparameters": h}})
}

/// (name, file bytes, expected (line, code) of every reported line).
type Case = (&'static str, Vec<u8>, Vec<(usize, &'static str)>);

#[tokio::test]
async fn bad_uploads_are_rejected_with_every_line_and_nothing_stored() {
    let env = Env::new().with("SFTD_MAX_UPLOAD_BYTES", "10000000");
    let s = env.start();
    let good =
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
    let huge = format!(
        "{good}\n{{\"text\":\"{}\"}}\n",
        "a".repeat(8 * 1024 * 1024 + 10)
    );
    let corpus: Vec<Case> = vec![
        ("malformed json", format!("{good}\n{{not json\n{good}\n[1,2\n").into_bytes(), vec![(2, "invalid_json"), (4, "invalid_json")]),
        (
            "wrong role",
            br#"{"messages":[{"role":"wizard","content":"hi"},{"role":"assistant","content":"yo"}]}"#.to_vec(),
            vec![(1, "unrecognized_role")],
        ),
        (
            "tool call with bad arguments",
            br#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"f","arguments":"{not json"}}]}]}"#.to_vec(),
            vec![(1, "tool_call_arguments_not_json")],
        ),
        ("no assistant", br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec(), vec![(1, "example_missing_assistant_message")]),
        ("no messages", br#"{"foo": 1}"#.to_vec(), vec![(1, "missing_messages_list")]),
        ("not an object", b"42\n".to_vec(), vec![(1, "data_type")]),
        ("empty file", Vec::new(), vec![(1, "empty_file")]),
        ("blank lines only", b"\n  \n\n".to_vec(), vec![(1, "empty_file")]),
        ("non-utf8", [good.as_bytes(), b"\n{\"text\":\"\xff\xfe\"}\n"].concat(), vec![(2, "invalid_utf8")]),
        ("huge line", huge.into_bytes(), vec![(2, "line_too_long")]),
    ];
    for (name, bytes, expected) in corpus {
        let (st, v) = s.upload_bytes("bad.jsonl", bytes).await;
        assert_eq!(st, 400, "{name}: {v}");
        assert_eq!(v["error"]["code"], "invalid_file", "{name}: {v}");
        assert_eq!(v["error"]["param"], "file", "{name}");
        let details = v["error"]["details"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {v}"));
        let got: Vec<(usize, String)> = details
            .iter()
            .map(|d| {
                (
                    d["line"].as_u64().unwrap() as usize,
                    d["code"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want: Vec<(usize, String)> =
            expected.iter().map(|(l, c)| (*l, c.to_string())).collect();
        assert_eq!(got, want, "{name}: {v}");
        assert!(details
            .iter()
            .all(|d| !d["message"].as_str().unwrap().is_empty()));
    }
    // Over the size limit: 413, in the error shape. The server answers before reading the rest
    // of the body and closes the connection, so send it on a connection of its own.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![b' '; 10_000_001]).file_name("big.jsonl"),
        );
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = fresh
        .post(s.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (st, v) = common::status_json(r).await;
    assert_eq!(st, 413, "{v}");
    assert_eq!(v["error"]["code"], "file_too_large");
    // Wrong or missing purpose.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "assistants")
        .part(
            "file",
            reqwest::multipart::Part::bytes(good.as_bytes().to_vec()).file_name("a.jsonl"),
        );
    let r = s
        .client
        .post(s.url("/v1/files"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (st, v) = common::status_json(r).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("purpose")),
        "{v}"
    );
    let r = s
        .client
        .post(s.url("/v1/files"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Nothing was stored: no rows, no bytes.
    let (_, list) = s.get("/v1/files").await;
    assert_eq!(list["data"], json!([]), "{list}");
    let leftovers: Vec<_> = ["files", "tmp"]
        .iter()
        .flat_map(|d| std::fs::read_dir(env.data_dir().join(d)).unwrap())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn bad_job_bodies_are_4xx_naming_the_field_and_nothing_stored() {
    let env = Env::new();
    let models = env.path().join("models");
    std::fs::create_dir_all(models.join("m")).unwrap();
    let env = env.with("SFTD_MODEL_DIRS", models.to_str().unwrap());
    let s = env.start();
    let file = s.upload(&example("text.jsonl")).await;
    let base = json!({"model": "sftd-demo", "training_file": file});
    let with = |patch: Value| {
        let mut b = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let hpp = "method.supervised.hyperparameters";
    let cases: Vec<(&str, Value, u16, Option<String>)> = vec![
        ("missing model", json!({"training_file": file}), 400, None),
        ("unknown field", with(json!({"n_epoch": 3})), 400, None),
        ("wrong type", with(json!({"seed": "abc"})), 400, None),
        (
            "lora r 0",
            with(json!({"method": hp(json!({"lora": {"r": 0}}))})),
            400,
            Some(format!("{hpp}.lora.r")),
        ),
        (
            "negative lr",
            with(json!({"method": hp(json!({"learning_rate": -1.0}))})),
            400,
            Some(format!("{hpp}.learning_rate")),
        ),
        (
            "batch 0",
            with(json!({"method": hp(json!({"batch_size": 0}))})),
            400,
            Some(format!("{hpp}.batch_size")),
        ),
        (
            "max_seq_len 1e9",
            with(json!({"method": hp(json!({"max_seq_len": 1_000_000_000u64}))})),
            400,
            Some(format!("{hpp}.max_seq_len")),
        ),
        (
            "dropout 1.5",
            with(json!({"method": hp(json!({"lora": {"dropout": 1.5}}))})),
            400,
            Some(format!("{hpp}.lora.dropout")),
        ),
        (
            "method dpo",
            with(json!({"method": {"type": "dpo"}})),
            400,
            Some("method.type".into()),
        ),
        // The tests' hub is unreachable, which is a retryable 503, not a 404 (tests/hub.rs
        // tells a missing model from a failing hub against a fake hub).
        (
            "hub model, hub unreachable",
            with(json!({"model": "nobody/no-such-model"})),
            503,
            Some("model".into()),
        ),
        (
            "malformed model",
            with(json!({"model": "a b c"})),
            400,
            Some("model".into()),
        ),
        (
            "path outside roots",
            with(json!({"model": "/etc"})),
            400,
            Some("model".into()),
        ),
        (
            "traversal out of roots",
            with(json!({"model": format!("{}/../../", models.join("m").display())})),
            400,
            Some("model".into()),
        ),
        (
            "missing local model",
            with(json!({"model": models.join("nope").to_str().unwrap()})),
            404,
            Some("model".into()),
        ),
        (
            "unknown training file",
            with(json!({"training_file": "file-doesnotexist"})),
            400,
            Some("training_file".into()),
        ),
        (
            "unknown validation file",
            with(json!({"validation_file": "file-doesnotexist"})),
            400,
            Some("validation_file".into()),
        ),
        (
            "unknown init adapter",
            with(json!({"init_adapter": "ftjob-doesnotexist"})),
            400,
            Some("init_adapter".into()),
        ),
        (
            "long suffix",
            with(json!({"suffix": "x".repeat(65)})),
            400,
            Some("suffix".into()),
        ),
    ];
    for (name, body, status, param) in cases {
        let (st, v) = s.post_json("/v1/fine_tuning/jobs", &body).await;
        assert_eq!(st, status, "{name}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {v}"
        );
        assert!(v["error"]["type"].is_string(), "{name}: {v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p.as_str(), "{name}: {v}");
        }
    }
    // Not JSON at all, and the wrong content type.
    let r = s
        .client
        .post(s.url("/v1/fine_tuning/jobs"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .post(s.url("/v1/fine_tuning/jobs"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    // Raw bodies no parser should choke on: non-UTF-8, absurd nesting, an oversized body.
    let raw: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "non-utf8",
            b"{\"model\": \"\xff\xfe\", \"training_file\": \"f\"}".to_vec(),
            400,
        ),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            400,
        ),
        (
            "3 MB body",
            format!("{{\"model\": \"{}\"}}", "m".repeat(3 << 20)).into_bytes(),
            413,
        ),
    ];
    // A server that answers 413 early closes the connection: do not reuse it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for (name, body, status) in raw {
        let r = fresh
            .post(s.url("/v1/fine_tuning/jobs"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (st, v) = common::status_json(r).await;
        assert_eq!(st, status, "{name}: {v}");
        assert!(v["error"]["message"].is_string(), "{name}: {v}");
    }
    // Bad paths and queries are 4xx too.
    let (st, _) = s.get("/v1/fine_tuning/jobs?limit=0").await;
    assert_eq!(st, 400);
    let (st, _) = s.get("/v1/fine_tuning/jobs?limit=abc").await;
    assert_eq!(st, 400);
    let (st, v) = s.get("/v1/fine_tuning/jobs/ftjob-nope").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    let (st, _) = s
        .get("/v1/fine_tuning/jobs/ftjob-nope/events?after=xyz")
        .await;
    assert!(st == 400 || st == 404);

    let (_, list) = s.get("/v1/fine_tuning/jobs").await;
    assert_eq!(list["data"], json!([]), "{list}");
}

#[tokio::test]
async fn auth_is_required_on_v1_when_a_key_is_set() {
    let env = Env::new().with("SFTD_API_KEY", "s3cret/key");
    let mut s = env.start();
    assert!(
        !s.logs().join("\n").contains("s3cret"),
        "the key must not be logged"
    );
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, 200);
    let (st, _) = s.get("/readyz").await;
    assert_eq!(st, 200);
    for public in ["/", "/static/app.js"] {
        let r = s.client.get(s.url(public)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{public}");
    }
    let (st, _) = s.get("/metrics").await;
    assert_eq!(st, 401);
    let r = s
        .client
        .get(s.url("/metrics"))
        .bearer_auth("s3cret/key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, v) = s.get("/v1/files").await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    for auth in [
        "Bearer wrong",
        "Bearer s3cret/ke",
        "Basic s3cret/key",
        "s3cret/key",
    ] {
        let r = s
            .client
            .get(s.url("/v1/files"))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{auth}");
    }
    let r = s
        .client
        .get(s.url("/v1/files"))
        .header("authorization", "Bearer s3cret/key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The event stream also takes ?access_token= (URL-encoded); other routes do not.
    let (st, _) = s
        .get("/v1/fine_tuning/jobs/ftjob-x/events?access_token=s3cret%2Fkey")
        .await;
    assert_eq!(st, 404, "authenticated, then no such job");
    let (st, _) = s
        .get("/v1/fine_tuning/jobs/ftjob-x/events?access_token=wrong")
        .await;
    assert_eq!(st, 401);
    let (st, _) = s.get("/v1/files?access_token=s3cret%2Fkey").await;
    assert_eq!(st, 401);
    // Unknown routes do not reveal anything either.
    let (st, _) = s.get("/v1/nope").await;
    assert!(st == 401 || st == 404);
}

#[tokio::test]
async fn without_a_key_v1_is_open_on_loopback() {
    let env = Env::new();
    let mut s = env.start();
    let (st, _) = s.get("/v1/files").await;
    assert_eq!(st, 200);
    assert!(s.logs().join("\n").contains("loopback"));
    // `sftd healthcheck` probes /healthz on SFTD_ADDR.
    let addr = s.base.trim_start_matches("http://").to_string();
    let ok = std::process::Command::new(common::BIN)
        .args(["healthcheck"])
        .env("SFTD_ADDR", &addr)
        .status()
        .unwrap();
    assert!(ok.success());
    s.kill9();
    // A device that cannot be opened stops `serve` at start-up with a message naming it; an API
    // node too, as it generates chat answers on that device.
    for args in [&[][..], &["serve", "--no-worker"]] {
        let out = std::process::Command::new(common::BIN)
            .args(args)
            .env("SFTD_DATA_DIR", env.data_dir())
            .env("SFTD_ADDR", "127.0.0.1:0")
            .env("SFTD_DEVICE", "gpu")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("SFTD_DEVICE=\"gpu\" cannot be used"),
            "{args:?}: {text}"
        );
    }
    let down = std::process::Command::new(common::BIN)
        .args(["healthcheck"])
        .env("SFTD_ADDR", &addr)
        .status()
        .unwrap();
    assert_eq!(down.code(), Some(1));
}

#[tokio::test]
async fn create_is_idempotent_with_idempotency_key() {
    let env = Env::new();
    let s = env.start();
    let file = s.upload(&example("text.jsonl")).await;
    let body = json!({"model": "sftd-demo", "training_file": file, "suffix": "a"});
    let post = |key: Option<&'static str>, body: Value| {
        let mut r = s.client.post(s.url("/v1/fine_tuning/jobs")).json(&body);
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.send()
    };
    let a = post(Some("k1"), body.clone()).await.unwrap();
    assert_eq!(a.status(), 200);
    let a: Value = a.json().await.unwrap();
    let b = post(Some("k1"), body.clone()).await.unwrap();
    assert_eq!(b.status(), 200);
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    let b: Value = b.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let mut other = body.clone();
    other["suffix"] = json!("b");
    let c = post(Some("k1"), other).await.unwrap();
    assert_eq!(c.status(), 409);
    let c: Value = c.json().await.unwrap();
    assert_eq!(c["error"]["code"], "idempotency_key_reused");
    // Without a key every POST is a new job.
    let d: Value = post(None, body.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(d["id"], a["id"]);
    // Concurrent retries with one key create one job.
    let ids: Vec<Value> = futures::future::join_all((0..8).map(|_| post(Some("k2"), body.clone())))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|r| r.headers().get("idempotent-replayed").is_some())
        .map(Value::Bool)
        .collect();
    assert_eq!(ids.iter().filter(|v| **v == Value::Bool(false)).count(), 1);
    let (_, list) = s.get("/v1/fine_tuning/jobs?limit=100").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn files_crud_and_pagination() {
    let env = Env::new();
    let s = env.start();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(s.upload(&example("text.jsonl")).await);
    }
    let (st, f) = s.get(&format!("/v1/files/{}", ids[0])).await;
    assert_eq!(st, 200);
    assert_eq!(f["object"], "file");
    assert_eq!(f["purpose"], "fine-tune");
    assert_eq!(f["filename"], "text.jsonl");
    assert_eq!(f["rows"], 10);
    assert!(f["id"].as_str().unwrap().starts_with("file-"));
    let bytes = std::fs::read(example("text.jsonl")).unwrap();
    assert_eq!(f["bytes"], bytes.len());
    let got = s
        .client
        .get(s.url(&format!("/v1/files/{}/content", ids[0])))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), bytes.as_slice());
    // Newest first, two per page.
    let (_, p1) = s.get("/v1/files?limit=2").await;
    assert_eq!(p1["object"], "list");
    assert_eq!(p1["has_more"], true);
    assert_eq!(p1["first_id"], ids[2].as_str());
    assert_eq!(p1["last_id"], ids[1].as_str());
    let (_, p2) = s.get(&format!("/v1/files?limit=2&after={}", ids[1])).await;
    assert_eq!(p2["has_more"], false);
    assert_eq!(p2["data"][0]["id"], ids[0].as_str());
    let r = s
        .client
        .delete(s.url(&format!("/v1/files/{}", ids[0])))
        .send()
        .await
        .unwrap();
    let (st, v) = common::status_json(r).await;
    assert_eq!((st, v["deleted"].as_bool()), (200, Some(true)));
    let (st, _) = s.get(&format!("/v1/files/{}", ids[0])).await;
    assert_eq!(st, 404);
    let (st, _) = s.get(&format!("/v1/files/{}/content", ids[0])).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn jobs_list_filters_by_metadata() {
    let env = Env::new();
    let s = env.start();
    let file = s.upload(&example("text.jsonl")).await;
    let mut ids = Vec::new();
    for (team, run) in [("a", "1"), ("b", "1"), ("a", "2")] {
        let body = json!({"model": "sftd-demo", "training_file": file, "metadata": {"team": team, "run": run}});
        ids.push(s.start_job(&body).await);
    }
    let ids_of = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, v) = s.get("/v1/fine_tuning/jobs?metadata[team]=a").await;
    assert_eq!(ids_of(&v), [ids[2].clone(), ids[0].clone()]);
    assert_eq!(v["data"][0]["metadata"], json!({"run": "2", "team": "a"}));
    let (_, v) = s
        .get("/v1/fine_tuning/jobs?metadata%5Bteam%5D=a&metadata%5Brun%5D=1")
        .await;
    assert_eq!(ids_of(&v), [ids[0].clone()]);
    let (_, v) = s.get("/v1/fine_tuning/jobs?metadata[team]=c").await;
    assert_eq!(ids_of(&v), Vec::<String>::new());
    let (_, v) = s
        .get(&format!("/v1/fine_tuning/jobs?limit=1&after={}", ids[2]))
        .await;
    assert_eq!(ids_of(&v), [ids[1].clone()]);
    assert_eq!(v["has_more"], true);
}
