//! A real S3-compatible server for the storage tests: `s3s-fs` (installed from crates.io by
//! `scripts/install-s3-server.sh`) on a free loopback port, serving a temporary directory in
//! which each bucket is a subdirectory and each object a file.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "sftd-test-access";
pub const SECRET_KEY: &str = "sftd-test-secret-key";
pub const BUCKET: &str = "sftd";

pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub root: tempfile::TempDir,
}

/// The server binary: `$SFTD_S3_SERVER`, else `$SFTD_CACHE/bin/s3s-fs` (default cache
/// `/var/cache/sftd`).
fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("SFTD_S3_SERVER") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("SFTD_CACHE").unwrap_or_else(|_| "/var/cache/sftd".into());
    let bin = Path::new(&cache).join("bin").join("s3s-fs");
    assert!(
        bin.is_file(),
        "{} is missing: run `bash scripts/install-s3-server.sh` (scripts/test.sh and .ci/run do)",
        bin.display()
    );
    bin
}

impl S3Server {
    /// Starts the server with one bucket, [`BUCKET`], and waits until it accepts connections.
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            child: spawn(port, root.path()),
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
        }
    }

    /// Starts the server again after [`S3Server::stop`], on the same port over the same
    /// objects (storage coming back after an outage).
    pub fn restart(&mut self) {
        let port: u16 = self.endpoint.rsplit(':').next().unwrap().parse().unwrap();
        self.child = spawn(port, self.root.path());
    }

    /// The environment that points sftd (or `Storage::open`) at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// [`Self::env`] as `object_store` options (lower-case keys), for `Storage::open_with`
    /// through [`as_strs`].
    pub fn options(&self) -> Vec<(String, String)> {
        self.env()
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect()
    }

    /// `env` with its artifacts in this server's bucket under `prefix`.
    pub fn storage_env(&self, env: super::Env, prefix: &str) -> super::Env {
        let mut env = env.with("SFTD_STORAGE_URL", &format!("s3://{BUCKET}/{prefix}"));
        for (k, v) in self.env() {
            env = env.with(k, &v);
        }
        env
    }

    /// Where the server keeps the object `key` of [`BUCKET`] (to check what landed).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// Stops the server (storage goes away) and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `s3s-fs` over `root` on `port` and waits until it accepts connections.
fn spawn(port: u16, root: &Path) -> Child {
    let child = Command::new(binary())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn s3s-fs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "s3s-fs did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Borrowed pairs, the form `Storage::open_with` takes options in.
pub fn as_strs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
