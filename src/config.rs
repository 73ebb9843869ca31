//! Service configuration: one clap struct, every field settable by flag or environment variable.

use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Settings of `sftd serve` (and of `sftd healthcheck`, which only needs the address).
#[derive(Args, Clone)]
pub struct Config {
    /// Address to listen on. The default is loopback: exposing the API on other interfaces
    /// without `SFTD_API_KEY` lets anyone on the network run jobs on this machine.
    #[arg(long, env = "SFTD_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Directory for the database, uploaded files, generated models and job outputs.
    #[arg(long, env = "SFTD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The database: `sqlite://<path>` (one process; the default is
    /// `sqlite://<data dir>/sftd.db`) or `postgres://user:pass@host/db` (shared by any number of
    /// API nodes and workers). Never logged with its password.
    #[arg(long, env = "SFTD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where artifacts (uploads, checkpoints, adapters, result files) live: unset for the data
    /// dir itself, `s3://bucket/prefix` for S3-compatible storage (endpoint and credentials from
    /// the `AWS_*` variables), or `file:///path` for a shared directory.
    #[arg(long, env = "SFTD_STORAGE_URL")]
    pub storage_url: Option<String>,

    /// `sftd serve` only: serve the API without training here (a stateless API node; jobs run
    /// on `sftd worker` processes sharing the PostgreSQL database).
    #[arg(long, env = "SFTD_NO_WORKER")]
    pub no_worker: bool,

    /// How long a worker's claim on a job lasts without a heartbeat, in milliseconds. After
    /// it lapses any worker may take the job over (resuming from its last checkpoint).
    #[arg(long, env = "SFTD_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,

    /// How often a worker renews its lease and reports itself, in milliseconds (well under
    /// `SFTD_LEASE_MS`: a few missed beats must not cost the lease).
    #[arg(long, env = "SFTD_HEARTBEAT_MS", default_value_t = 5_000)]
    pub heartbeat_ms: u64,

    /// How long, in milliseconds, a queued job whose memory estimate exceeds every live
    /// worker's device memory waits (and a worker must have been up) before a worker fails it;
    /// time for workers started together to register.
    #[arg(long, env = "SFTD_PLACEMENT_GRACE_MS", default_value_t = 120_000)]
    pub placement_grace_ms: u64,

    /// How often a node that trains sweeps the artifact storage for what workers that lost
    /// their jobs uploaded and died before deleting, in milliseconds. It always sweeps once at
    /// start; `0` sweeps only then.
    #[arg(long, env = "SFTD_SWEEP_INTERVAL_MS", default_value_t = 3_600_000)]
    pub sweep_interval_ms: u64,

    /// When set, every `/v1` route requires `Authorization: Bearer <key>` or `X-Api-Key: <key>`
    /// (the event stream also accepts `?access_token=<key>`). Never logged.
    #[arg(long, env = "SFTD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Device the worker trains on: `auto` (first CUDA GPU if built with CUDA, else CPU),
    /// `cpu`, or `cuda:N`.
    #[arg(long, env = "SFTD_DEVICE", default_value = "auto")]
    pub device: String,

    /// Colon-separated directories under which local model (and adapter) paths may live; any
    /// other path given as `model` is refused. Empty: local paths are refused altogether.
    #[arg(long, env = "SFTD_MODEL_DIRS", default_value = "")]
    pub model_dirs: String,

    /// Largest accepted upload in bytes; larger ones get 413. Uploads stream to disk and are
    /// validated line by line, so this bounds disk use, not memory.
    #[arg(long, env = "SFTD_MAX_UPLOAD_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// How many times a job whose run was interrupted by a crash (the process died while it
    /// was running: killed, out of memory, power loss) is resumed; the next interruption fails
    /// it, so a job that crashes the server cannot hold up the queue forever.
    #[arg(long, env = "SFTD_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "SFTD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Hugging Face token for gated or private models (also read from `HF_HOME/token`). Never logged.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,

    /// Hugging Face cache directory; models are downloaded into `<HF_HOME>/hub`.
    /// Defaults to `~/.cache/huggingface`.
    #[arg(long, env = "HF_HOME")]
    pub hf_home: Option<PathBuf>,

    /// Hugging Face hub URL (a mirror, or a local test server).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
}

impl std::fmt::Debug for Config {
    /// Like a derived Debug, with the secrets redacted so the config can be logged at start-up.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_password),
            )
            .field("no_worker", &self.no_worker)
            .field("lease_ms", &self.lease_ms)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("placement_grace_ms", &self.placement_grace_ms)
            .field("sweep_interval_ms", &self.sweep_interval_ms)
            .field("storage_url", &self.storage_url)
            .field("api_key", &redact(&self.api_key))
            .field("device", &self.device)
            .field("model_dirs", &self.model_dirs)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("max_attempts", &self.max_attempts)
            .field("log_format", &self.log_format)
            .field("hf_token", &redact(&self.hf_token))
            .field("hf_home", &self.hf_home)
            .field("hf_endpoint", &self.hf_endpoint)
            .finish()
    }
}

/// `scheme://user:<redacted>@host/…` for a URL with a password; other URLs unchanged.
fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}://{}:<redacted>{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        Self {
            addr: "127.0.0.1:0".parse().expect("valid literal address"),
            data_dir: data_dir.to_path_buf(),
            database_url: None,
            storage_url: None,
            no_worker: false,
            lease_ms: 30_000,
            heartbeat_ms: 5_000,
            placement_grace_ms: 120_000,
            sweep_interval_ms: 3_600_000,
            api_key: None,
            device: "cpu".into(),
            model_dirs: String::new(),
            max_upload_bytes: 512 * 1024 * 1024,
            max_attempts: 3,
            log_format: "text".into(),
            hf_token: None,
            hf_home: None,
            hf_endpoint: "https://huggingface.co".into(),
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("sftd.db").display()))
    }

    /// The allowed local model roots, in the order given.
    pub fn model_roots(&self) -> Vec<PathBuf> {
        self.model_dirs
            .split(':')
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from)
            .collect()
    }

    /// The worker's lease and heartbeat intervals, checked against each other.
    pub fn lease_timing(&self) -> anyhow::Result<(std::time::Duration, std::time::Duration)> {
        let (lease, beat) = (self.lease_ms, self.heartbeat_ms);
        if beat == 0 || beat * 2 > lease {
            anyhow::bail!(
                "SFTD_HEARTBEAT_MS ({beat}) must be positive and at most half of SFTD_LEASE_MS ({lease})"
            );
        }
        Ok((
            std::time::Duration::from_millis(lease),
            std::time::Duration::from_millis(beat),
        ))
    }

    /// The API key, treating an empty string as unset.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref().filter(|k| !k.is_empty())
    }
}
