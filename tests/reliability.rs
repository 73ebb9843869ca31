//! The API under hostile or unlucky conditions, over real sockets: secrets never logged (even at
//! `RUST_LOG=trace`), an oversized upload answered with a 413 the client can read, a full disk
//! answered with a clean 507 and nothing left behind, every extractor rejection in the JSON
//! error shape, `/readyz` 503 once the worker thread is gone or stuck, and (ignored: minutes and
//! a GB of disk) the memory a 500 MB upload costs the server.

mod common;

use common::{example, memory_kib, Env};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const KEY: &str = "sk-test-5ecret/Key+1";
const KEY_IN_QUERY: &str = "sk-test-5ecret%2FKey%2B1";
/// Wrong keys a client might send: the log writer does not know them, so only the request
/// span's own redaction keeps them out.
const WRONG_KEYS: [&str; 3] = [
    "wrong-guess-7f3a9c",
    "wrong-guess-x-api-b2d1",
    "wrong-guess-q-c4e8",
];

#[tokio::test]
async fn secrets_never_reach_the_logs_at_trace_level() {
    let env = Env::new()
        .with("SFTD_API_KEY", KEY)
        .with("HF_TOKEN", "hf_secret_token_for_tests")
        .with("RUST_LOG", "trace");
    let mut s = env.start();
    let get = |path: String, header: Option<(&'static str, String)>| {
        let mut req = s.client.get(s.url(&path));
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let bearer = |k: &str| Some(("authorization", format!("Bearer {k}")));
    let api_key = |k: &str| Some(("x-api-key", k.to_string()));
    let events = "/v1/fine_tuning/jobs/ftjob-none/events";
    assert_eq!(get("/v1/files".into(), bearer(KEY)).await, 200);
    assert_eq!(get("/v1/files".into(), api_key(KEY)).await, 200);
    assert_eq!(get("/v1/files".into(), None).await, 401);
    // The key in the query is accepted on the event stream (404: no such job, past auth).
    let with_token = format!("{events}?after=0&access_token={KEY_IN_QUERY}");
    assert_eq!(get(with_token, None).await, 404);
    assert_eq!(get("/v1/files".into(), bearer(WRONG_KEYS[0])).await, 401);
    assert_eq!(get("/v1/files".into(), api_key(WRONG_KEYS[1])).await, 401);
    let wrong_token = format!("{events}?access_token={}", WRONG_KEYS[2]);
    assert_eq!(get(wrong_token, None).await, 401);
    // An upload and a job request too, so their spans and events are in the log.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(example("text.jsonl")).unwrap())
                .file_name("text.jsonl"),
        );
    let r = s
        .client
        .post(s.url("/v1/files"))
        .header("x-api-key", KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    assert!(s.sigterm().success());
    std::thread::sleep(Duration::from_millis(300));
    let logs = s.logs().join("\n");
    // The request spans were recorded at this level, with the token's value redacted.
    assert!(
        logs.contains("access_token=<redacted>"),
        "no request span in the log"
    );
    let mut leaked: Vec<&str> = vec![KEY, KEY_IN_QUERY, "5ecret", "hf_secret_token_for_tests"];
    leaked.extend(WRONG_KEYS);
    for secret in leaked {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            lines.is_empty(),
            "{secret:?} was logged:\n{}",
            lines.join("\n")
        );
    }
}

/// An HTTP/1.1 response read off a raw socket.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_response(conn: &TcpStream) -> RawResponse {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("reading the status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .expect("a content-length");
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    RawResponse {
        status,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    }
}

const BOUNDARY: &str = "sftd-test-boundary";

/// A multipart body with `purpose` and a `file` of `n` bytes of JSONL.
fn multipart_body(n: usize) -> Vec<u8> {
    let line = b"{\"text\":\"padding padding padding padding padding padding\"}\n";
    let mut file = Vec::with_capacity(n + line.len());
    while file.len() < n {
        file.extend_from_slice(line);
    }
    file.truncate(n);
    [
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
             --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .into_bytes(),
        file,
        format!("\r\n--{BOUNDARY}--\r\n").into_bytes(),
    ]
    .concat()
}

fn connect(base: &str) -> TcpStream {
    let conn = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn
}

/// Writes the whole request, as clients that do not read before they finish sending do, then
/// reads the response. Before the fix the server answered early and closed a socket with
/// unread data, which the kernel turns into a reset that destroys the response.
fn send_whole(base: &str, head: &str, body: &[u8]) -> RawResponse {
    let mut conn = connect(base);
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body)
        .expect("the server reset the connection while the body was being sent");
    read_response(&conn)
}

/// `body` in chunked transfer encoding.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn an_oversized_upload_gets_a_413_the_client_can_read() {
    let limit = 1_000_000;
    let env = Env::new().with("SFTD_MAX_UPLOAD_BYTES", &limit.to_string());
    let s = env.start();
    let body = multipart_body(20 * limit);
    let ctype = format!("multipart/form-data; boundary={BOUNDARY}");
    let check = |name: &str, r: &RawResponse| {
        assert_eq!(r.status, 413, "{name}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "file_too_large", "{name}");
        assert_eq!(r.body["error"]["param"], "file", "{name}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{name}");
    };
    let base = s.base.clone();
    // Declared too large: refused from the headers, the body read and discarded.
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (b, h) = (body.clone(), head.clone());
    let r = tokio::task::spawn_blocking(move || send_whole(&base, &h, &b))
        .await
        .unwrap();
    check("content-length", &r);
    // Chunked, size unknown up front: refused once the limit is crossed, the rest discarded.
    let base = s.base.clone();
    let chunked_head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (h, b) = (chunked_head.clone(), chunked(&body));
    let r = tokio::task::spawn_blocking(move || send_whole(&base, &h, &b))
        .await
        .unwrap();
    check("chunked", &r);
    // A small file after an oversized extra field: the body as a whole is over the limit.
    let base = s.base.clone();
    let padded = [
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"junk\"\r\n\r\n{}\r\n",
            "j".repeat(2 * limit)
        )
        .into_bytes(),
        multipart_body(100),
    ]
    .concat();
    let r =
        tokio::task::spawn_blocking(move || send_whole(&base, &chunked_head, &chunked(&padded)))
            .await
            .unwrap();
    check("oversized extra field", &r);
    // Expect: 100-continue: refused before the client sends a byte of the body.
    let base = s.base.clone();
    let r = tokio::task::spawn_blocking(move || {
        let conn = connect(&base);
        (&conn)
            .write_all(
                head.replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
        read_response(&conn)
    })
    .await
    .unwrap();
    check("100-continue", &r);
    // A normal upload still works afterwards, and nothing was left behind.
    let id = s.upload(&example("text.jsonl")).await;
    assert!(id.starts_with("file-"), "{id}");
    let leftovers = std::fs::read_dir(env.data_dir().join("tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0);
}

/// Mounts a 2 MiB tmpfs (we run as root, as CI does) and unmounts it when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: std::path::PathBuf) -> Option<Self> {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_during_an_upload_is_a_clean_507_and_leaves_nothing() {
    let env = Env::new();
    let Some(disk) = SmallDisk::mount(env.path().join("small")) else {
        eprintln!(
            "SKIPPED a_full_disk_during_an_upload_is_a_clean_507_and_leaves_nothing: \
             cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)"
        );
        return;
    };
    let data = disk.0.join("data");
    let env = env.with("SFTD_DATA_DIR", data.to_str().unwrap());
    let mut s = env.start();
    let line = "{\"text\":\"a line of training text that is long enough to fill a disk\"}\n";
    let big = line.repeat(4 * 1024 * 1024 / line.len()).into_bytes();
    let (st, v) = s.upload_bytes("big.jsonl", big).await;
    assert_eq!(st, 507, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_storage");
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("disk is full"));
    for dir in ["tmp", "files"] {
        let left: Vec<_> = std::fs::read_dir(data.join(dir)).unwrap().collect();
        assert!(left.is_empty(), "{dir}: {left:?}");
    }
    // The server keeps serving, and the space was given back.
    let (st, list) = s.get("/v1/files").await;
    assert_eq!((st, &list["data"]), (200, &serde_json::json!([])));
    let id = s.upload(&example("text.jsonl")).await;
    assert!(id.starts_with("file-"));
    s.kill9();
    drop(s);
    drop(disk);
}

#[tokio::test]
async fn every_extractor_rejection_is_in_the_json_error_shape() {
    let s = Env::new().start();
    let post = |path: &str, ctype: &str, body: &'static [u8]| {
        s.client
            .post(s.url(path))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let get = |path: &str| s.client.get(s.url(path)).send();
    let cases: Vec<(&str, reqwest::Response, u16)> =
        vec![
        ("upload as json", post("/v1/files", "application/json", b"{}").await.unwrap(), 400),
        (
            "upload without a boundary",
            post("/v1/files", "multipart/form-data", b"--x\r\n").await.unwrap(),
            400,
        ),
        (
            "broken multipart",
            post(
                "/v1/files",
                "multipart/form-data; boundary=zz",
                b"--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nno closing boundary",
            )
            .await
            .unwrap(),
            400,
        ),
        (
            "job as text",
            post("/v1/fine_tuning/jobs", "text/plain", b"{}").await.unwrap(),
            415,
        ),
        (
            "job not json",
            post("/v1/fine_tuning/jobs", "application/json", b"{oops").await.unwrap(),
            400,
        ),
        ("bad query", get("/v1/files?limit=abc").await.unwrap(), 400),
        (
            "bad events query",
            get("/v1/fine_tuning/jobs/x/events?limit=-").await.unwrap(),
            400,
        ),
        ("bad path encoding", get("/v1/files/%FF%FE").await.unwrap(), 400),
        ("unknown route", get("/v1/nothing").await.unwrap(), 404),
        (
            "wrong method",
            s.client.delete(s.url("/v1/fine_tuning/jobs")).send().await.unwrap(),
            405,
        ),
    ];
    for (name, r, want) in cases {
        let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
        let (st, v) = common::status_json(r).await;
        assert_eq!(st, want, "{name}: {v}");
        assert_eq!(ctype, "application/json", "{name}");
        let e = &v["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "{name}: {v}"
        );
        assert!(
            e.get("param").is_some() && e.get("code").is_some(),
            "{name}: {v}"
        );
    }
}

/// `/readyz` over a real socket, served by the library's router with a worker whose thread has
/// ended (it cannot open its device and returns, as it would after any fatal error).
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_once_the_worker_thread_is_gone() {
    use sftd::api::{events::Fanout, router, AppState};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let config = sftd::config::Config::for_data_dir(dir.path());
    let store = sftd::store::Store::open(&config.database_url(), dir.path())
        .await
        .unwrap();
    let hub = sftd::hub::Hub::new(&config);
    let storage = sftd::storage::Storage::open(None, dir.path()).unwrap();
    let worker =
        sftd::worker::Worker::start(store.clone(), storage.clone(), hub, "cuda:4096".into(), 3)
            .await
            .unwrap();
    let (_tx, shutdown) = tokio::sync::watch::channel(false);
    let state = AppState {
        config: Arc::new(config),
        fanout: Fanout::start(&store),
        store,
        storage,
        worker,
        sse_clients: Default::default(),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    let (st, v) = loop {
        let r = reqwest::get(&url).await.unwrap();
        let got = common::status_json(r).await;
        if got.0 == 503 || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["worker"], false);
    assert_eq!(v["database"], true);
}

/// A worker thread that hangs outside a job (here in its claim, by `SFTD_FAULT_HANG`) is up but
/// takes no jobs: once it has not come round to the queue for a lease, `/readyz` answers 503
/// `worker_state: stalled`, and a job created then stays queued. A healthy idle worker with the
/// same short lease stays ready all along.
#[tokio::test]
async fn readyz_is_503_once_the_worker_thread_hangs() {
    let short_lease = || {
        Env::new()
            .with("SFTD_LEASE_MS", "4000")
            .with("SFTD_HEARTBEAT_MS", "1000")
    };
    // The first claims run at start-up and at the first heartbeats; the third one hangs.
    let hung_env = short_lease().with("SFTD_FAULT_HANG", "worker_claim:3");
    let mut hung = hung_env.start();
    let healthy_env = short_lease();
    let healthy = healthy_env.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (st, v) = loop {
        let (st, v) = healthy.get("/readyz").await;
        assert_eq!(st, 200, "the healthy worker: {v}");
        assert_eq!(v["worker_state"], "running", "{v}");
        let got = hung.get("/readyz").await;
        if got.0 != 200 {
            break got;
        }
        assert!(Instant::now() < deadline, "still ready: {}", got.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["status"], "unavailable");
    assert_eq!(v["worker_state"], "stalled");
    assert_eq!(v["worker"], false);
    assert_eq!(v["database"], true);
    assert!(hung.logged("SFTD_FAULT_HANG worker_claim:3 reached"));
    // It takes no job (while the healthy one does), and stays unready.
    let file = hung.upload(&example("text.jsonl")).await;
    let id = hung.start_job(&common::tiny_job(&file, 2, 0)).await;
    let file = healthy.upload(&example("text.jsonl")).await;
    let ok = healthy.start_job(&common::tiny_job(&file, 2, 0)).await;
    let ok = healthy.wait_finished(&ok, Duration::from_secs(120)).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(hung.job(&id).await["status"], "queued");
    assert_eq!(hung.get("/readyz").await.0, 503);
    assert_eq!(healthy.get("/readyz").await.0, 200);
}

/// `cargo nextest run --run-ignored only -E 'test(upload_memory)'`: a 500 MB upload, then two at
/// once, each a valid JSONL file streamed by the client; prints the server's peak RSS above its
/// RSS before them and asserts it stays under 64 MiB.
#[tokio::test]
#[ignore = "minutes and 1.5 GB of disk; run by hand to measure (see README)"]
async fn upload_memory() {
    const MB: usize = 1_000_000;
    let env = Env::new();
    let s = env.start();
    s.upload(&example("text.jsonl")).await;
    let (_, before) = memory_kib(s.pid());
    let upload = |size: usize| common::upload_stream(&s, size, MB);
    let r = upload(500 * MB).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let (one, _) = memory_kib(s.pid());
    let (a, b) = tokio::join!(upload(500 * MB), upload(500 * MB));
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
    let (two, _) = memory_kib(s.pid());
    let mib = |kib: u64| kib.saturating_sub(before) as f64 / 1024.0;
    println!(
        "RSS before: {:.1} MiB; peak RSS above it: one 500 MB upload {:.1} MiB, then two at once {:.1} MiB",
        before as f64 / 1024.0,
        mib(one),
        mib(two)
    );
    assert!(
        mib(two) < 64.0,
        "uploads raised the peak RSS by {:.1} MiB",
        mib(two)
    );
}
