//! Test harness: runs the real `sftd` binary on an ephemeral loopback port with its own data
//! dir, and small HTTP helpers over reqwest.
#![allow(dead_code)]

pub mod cluster;
pub mod generate_fixture;
pub mod grads;
pub mod jobs;
pub mod postgres;
pub mod s3;
pub mod train;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sftd");

/// A data dir that outlives server processes (for restart tests).
#[derive(Clone)]
pub struct Env {
    /// Shared by the clones of one Env (and the nodes made from it), removed with the last.
    pub dir: std::sync::Arc<tempfile::TempDir>,
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = vec![
            (
                "SFTD_DATA_DIR".into(),
                dir.path().join("data").display().to_string(),
            ),
            ("SFTD_ADDR".into(), "127.0.0.1:0".into()),
            ("SFTD_DEVICE".into(), "cpu".into()),
            (
                "HF_HOME".into(),
                dir.path().join("hf").display().to_string(),
            ),
            // Nothing listens here: the real hub is never contacted from tests.
            ("HF_ENDPOINT".into(), "http://127.0.0.1:9".into()),
            ("RUST_LOG".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
        ];
        Self {
            dir: std::sync::Arc::new(dir),
            vars,
        }
    }

    /// These settings with a data dir (and hub cache) of its own under `name`: one node of a
    /// cluster that shares nothing with the others but the database and the artifact storage.
    pub fn node(&self, name: &str) -> Env {
        let root = self.dir.path().join(name);
        self.clone()
            .with("SFTD_DATA_DIR", &root.join("data").display().to_string())
            .with("HF_HOME", &root.join("hf").display().to_string())
    }

    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.into(), value.into()));
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        let dir = self.vars.iter().find(|(k, _)| k == "SFTD_DATA_DIR");
        PathBuf::from(&dir.expect("SFTD_DATA_DIR is always set").1)
    }

    pub fn start(&self) -> Server {
        Server::start(self, &[])
    }

    /// Starts `sftd` with these arguments (`["worker"]`, `["serve", "--no-worker"]`).
    pub fn start_args(&self, args: &[&str]) -> Server {
        Server::start(self, args)
    }
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
    /// Everything the server logged, line by line (filled by a reader thread).
    logs: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Server {
    fn start(env: &Env, args: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sftd");
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var("SFTD_TEST_ECHO").is_ok() {
                        eprintln!("[sftd] {line}");
                    }
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        let base = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("server did not start; log:\n{}", log.join("\n")));
            if let Some(i) = line.find("listening on http://") {
                let url = line[i + "listening on ".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap();
                break url.to_string();
            }
            log.push(line);
        };
        Self {
            child,
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            logs: rx,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Drains the log lines received so far.
    pub fn logs(&mut self) -> &[String] {
        while let Ok(l) = self.logs.try_recv() {
            self.log.push(l);
        }
        &self.log
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal}");
    }

    /// Whether any log line so far contains `needle`.
    pub fn logged(&mut self, needle: &str) -> bool {
        self.logs().iter().any(|l| l.contains(needle))
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        self.wait_exit(Duration::from_secs(60))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        status_json(r).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// A streamed chat completion's chunks, checked to be server-sent events ending in `[DONE]`.
    pub async fn chat_stream(&self, body: &Value) -> Vec<Value> {
        let r = self
            .client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let events = read_sse(r, |e| e.data == "[DONE]").await;
        assert_eq!(events.last().unwrap().data, "[DONE]");
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect()
    }

    pub async fn upload_bytes(&self, name: &str, bytes: Vec<u8>) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
            );
        let r = self
            .client
            .post(self.url("/v1/files"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// Uploads and returns the file id, panicking on failure.
    pub async fn upload(&self, path: &Path) -> String {
        let (st, v) = self
            .upload_bytes(
                path.file_name().unwrap().to_str().unwrap(),
                std::fs::read(path).unwrap(),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub async fn create_job(&self, body: &Value) -> Value {
        let (st, v) = self.post_json("/v1/fine_tuning/jobs", body).await;
        assert_eq!(st, 200, "{v}");
        v
    }

    pub async fn job(&self, id: &str) -> Value {
        let (st, v) = self.get(&format!("/v1/fine_tuning/jobs/{id}")).await;
        assert_eq!(st, 200, "{v}");
        v
    }

    /// Polls until the job's status satisfies `done`.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(id).await;
            if done(&j) {
                return j;
            }
            assert!(Instant::now() < deadline, "timed out waiting; job: {j}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until the job's status is `status`; a job that ends otherwise fails at once.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_for(id, timeout, |j| {
            let now = j["status"].as_str().unwrap_or_default();
            let ended = ["succeeded", "failed", "cancelled"].contains(&now);
            assert!(!ended || now == status, "waiting for {status}; job: {j}");
            now == status
        })
        .await
    }

    /// Every event of a job as JSON, through the paginated list.
    pub async fn all_events(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (st, v) = self
                .get(&format!(
                    "/v1/fine_tuning/jobs/{id}/events?after={after}&limit=100"
                ))
                .await;
            assert_eq!(st, 200, "{v}");
            let data = v["data"].as_array().unwrap().clone();
            if let Some(last) = data.last() {
                after = last["seq"].as_i64().unwrap();
            }
            out.extend(data);
            if v["has_more"] != true {
                return out;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (st, v)
}

/// The repository's example datasets.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// A job body on the demo model with tiny hyperparameters (seconds on 2 CPU cores).
pub fn tiny_job(training_file: &str, max_steps: u32, save_steps: u32) -> Value {
    json!({
        "model": "sftd-demo",
        "training_file": training_file,
        "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1,
            "learning_rate": 0.003, "max_seq_len": 128, "max_steps": max_steps,
            "save_steps": save_steps, "warmup_ratio": 0.0,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}
        }}}
    })
}

/// A parsed SSE message.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: String,
}

/// Reads an SSE response until it ends (or `stop` says so), returning the messages with data.
pub async fn read_sse(
    resp: reqwest::Response,
    mut stop: impl FnMut(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    use futures::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let mut ev = SseEvent {
                id: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    ev.id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    has_data = true;
                    ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if has_data {
                let done = stop(&ev);
                out.push(ev);
                if done {
                    return out;
                }
            }
        }
    }
    out
}

/// Opens the event stream of a job. It lasts as long as the job: the client's 60 s limit on a
/// whole request does not apply to it.
pub async fn open_stream(s: &Server, job: &str, last_event_id: Option<i64>) -> reqwest::Response {
    let mut req = s
        .client
        .get(s.url(&format!("/v1/fine_tuning/jobs/{job}/events")))
        .timeout(Duration::from_secs(600))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r
}

/// Peak and current resident memory of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Uploads a valid JSONL file of about `size` bytes, streamed by the client in blocks of
/// `block` bytes (nothing of that size is ever in the test's memory).
pub fn upload_stream(
    s: &Server,
    size: usize,
    block: usize,
) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> {
    let line = b"{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"},{\"role\":\"assistant\",\"content\":\"Paris.\"}]}\n";
    let chunk = axum::body::Bytes::from(line.repeat(block / line.len()));
    let n = size / chunk.len();
    let stream = futures::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(stream))
                .file_name("big.jsonl"),
        );
    s.client
        .post(s.url("/v1/files"))
        .timeout(Duration::from_secs(1800))
        .multipart(form)
        .send()
}
