//! Model resolution: the built-in demo model, local directories under the allowed roots, and
//! Hugging Face repo ids downloaded through `hf-hub` into `HF_HOME`.

use crate::config::Config;
use crate::train::demo::ensure_demo_model;
use crate::train::spec::DEMO_MODEL;
use hf_hub::api::tokio::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Files a model directory must hold for the engine to load it.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];
const OPTIONAL: [&str; 1] = ["generation_config.json"];
/// How long the create-time existence check may wait for the hub.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Malformed name or refused path (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Nothing by that name (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The hub refused this server the repo (its 401/403): gated or private, or (to a caller
    /// without a token, to whom the hub answers 401 for unknown repos too) perhaps missing. HTTP
    /// 403 `model_access_denied`, the message saying what to do with HF_TOKEN.
    #[error("{0}")]
    Denied(String),
    /// The model exists but could not be made available (the job fails with this message).
    #[error("{0}")]
    Unavailable(String),
    /// The hub could not be reached, timed out or failed (HTTP 503 `hub_unavailable`: worth
    /// retrying; nothing is known about the model).
    #[error("{0}")]
    Unreachable(String),
}

impl HubError {
    /// The error code a client sees for this failure, both as an API error (when a job is
    /// created) and as a job's `error.code` (when the worker resolves the model later).
    pub fn code(&self) -> &'static str {
        match self {
            HubError::Invalid(_) => "invalid_model",
            HubError::NotFound(_) => "model_not_found",
            HubError::Denied(_) => "model_access_denied",
            HubError::Unavailable(_) => "model_unavailable",
            HubError::Unreachable(_) => "hub_unavailable",
        }
    }
}

/// What a `model` string names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelRef {
    Demo,
    /// A canonical directory under an allowed root.
    Local(PathBuf),
    /// A Hugging Face repo id.
    Hub(String),
}

#[derive(Clone)]
pub struct Hub {
    data_dir: PathBuf,
    /// Canonicalized allowed roots (roots that do not exist are left out).
    roots: Vec<PathBuf>,
    cache: PathBuf,
    endpoint: String,
    token: Option<String>,
    demo_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Hub {
    pub fn new(config: &Config) -> Self {
        let roots = config
            .model_roots()
            .iter()
            .filter_map(|r| match r.canonicalize() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(root = %r.display(), error = %e, "ignoring model root that cannot be opened");
                    None
                }
            })
            .collect();
        let cache = match &config.hf_home {
            Some(home) => Cache::new(home.join("hub")),
            None => Cache::from_env(),
        };
        let token = config
            .hf_token
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        Self {
            data_dir: config.data_dir.clone(),
            roots,
            cache: cache.path().clone(),
            endpoint: config.hf_endpoint.trim_end_matches('/').to_string(),
            token,
            demo_lock: Default::default(),
        }
    }

    /// Classifies `model` and checks that it can be used, without downloading: the demo model
    /// always; a local dir if it is under an allowed root and has a config; a hub id if it is in
    /// the cache or the hub knows it.
    pub async fn check(&self, model: &str) -> Result<ModelRef, HubError> {
        if model == DEMO_MODEL {
            return Ok(ModelRef::Demo);
        }
        if looks_like_path(model) {
            return self.allowed_dir(model, "model").map(ModelRef::Local);
        }
        // A bare name that exists under a root is that directory.
        for root in &self.roots {
            if valid_repo_id(model) && root.join(model).join("config.json").is_file() {
                return self
                    .allowed_dir(&root.join(model).to_string_lossy(), "model")
                    .map(ModelRef::Local);
            }
        }
        if !valid_repo_id(model) {
            return Err(HubError::Invalid(format!(
                "model {model:?} is neither {DEMO_MODEL:?}, a Hugging Face repo id (owner/name), \
                 nor a local directory path"
            )));
        }
        if self.cached_dir(model).is_some() {
            return Ok(ModelRef::Hub(model.to_string()));
        }
        let api = self.api()?;
        match tokio::time::timeout(CHECK_TIMEOUT, api.model(model.to_string()).info()).await {
            Ok(Ok(_)) => Ok(ModelRef::Hub(model.to_string())),
            Ok(Err(ApiError::RequestError(e))) if e.status().is_some_and(|s| s == 404) => {
                Err(HubError::NotFound(format!(
                    "model {model:?} was not found on the Hugging Face hub at {} (HTTP 404); \
                     check the name",
                    self.endpoint
                )))
            }
            Ok(Err(ApiError::RequestError(e)))
                if e.status().is_some_and(|s| is_refusal(s.as_u16())) =>
            {
                Err(self.refused(model, e.status().map_or(0, |s| s.as_u16())))
            }
            Ok(Err(e)) => Err(HubError::Unreachable(format!(
                "model {model:?} is not in the local cache and the Hugging Face hub at {} \
                 failed ({e}); retry later, download the model first or set HF_ENDPOINT",
                self.endpoint
            ))),
            Err(_) => Err(HubError::Unreachable(format!(
                "model {model:?} is not in the local cache and the Hugging Face hub at {} did not \
                 answer within {}s; retry later",
                self.endpoint,
                CHECK_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Makes `model` available on disk and returns its directory: generates the demo model on
    /// first use, downloads a hub model into the cache (no-op when cached).
    pub async fn resolve(&self, model: &str) -> Result<PathBuf, HubError> {
        match self.check(model).await? {
            ModelRef::Demo => self.demo_dir().await,
            ModelRef::Local(dir) => Ok(dir),
            ModelRef::Hub(id) => {
                if let Some(dir) = self.cached_dir(&id) {
                    return Ok(dir);
                }
                self.download(&id).await
            }
        }
    }

    /// A directory holding `model`'s `config.json`, fetching only that file for a hub model
    /// that is not cached (what the memory estimate needs before the weights are downloaded).
    pub async fn config_dir(&self, model: &str) -> Result<PathBuf, HubError> {
        let ModelRef::Hub(id) = self.check(model).await? else {
            return self.resolve(model).await;
        };
        let repo = Cache::new(self.cache.clone()).repo(Repo::model(id.clone()));
        let config = match repo.get("config.json") {
            Some(path) => path,
            None => self
                .api()?
                .model(id.clone())
                .get("config.json")
                .await
                .map_err(|e| {
                    HubError::Unavailable(format!("fetching {id:?}'s config.json failed: {e}"))
                })?,
        };
        Ok(config
            .parent()
            .expect("a cached file lives in a snapshot directory. This is a bug.")
            .to_path_buf())
    }

    /// Checks that `path` is an existing directory under an allowed root; `param` names the
    /// field in errors. Returns the canonical path.
    pub fn allowed_dir(&self, path: &str, param: &str) -> Result<PathBuf, HubError> {
        if self.roots.is_empty() {
            return Err(HubError::Invalid(format!(
                "{param} {path:?} is a local path, but no local roots are allowed; set \
                 SFTD_MODEL_DIRS to the directories models may be loaded from"
            )));
        }
        let canonical = Path::new(path).canonicalize().map_err(|_| {
            HubError::NotFound(format!("{param} directory {path:?} does not exist"))
        })?;
        if !self.roots.iter().any(|r| canonical.starts_with(r)) {
            return Err(HubError::Invalid(format!(
                "{param} path {path:?} is outside the allowed roots (SFTD_MODEL_DIRS)"
            )));
        }
        if !canonical.is_dir() {
            return Err(HubError::Invalid(format!(
                "{param} path {path:?} is not a directory"
            )));
        }
        Ok(canonical)
    }

    /// The demo model's directory, generated on first use.
    async fn demo_dir(&self) -> Result<PathBuf, HubError> {
        let dir = self.data_dir.join("models").join(DEMO_MODEL);
        let _guard = self.demo_lock.lock().await;
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        let data_dir = self.data_dir.clone();
        let dir = tokio::task::spawn_blocking(move || ensure_demo_model(&data_dir))
            .await
            .map_err(|e| HubError::Unavailable(format!("demo model generation panicked: {e}")))?
            .map_err(|e| {
                HubError::Unavailable(format!("could not generate the demo model: {e:#}"))
            })?;
        tracing::info!(dir = %dir.display(), "generated the demo model");
        Ok(dir)
    }

    fn api(&self) -> Result<hf_hub::api::tokio::Api, HubError> {
        ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| HubError::Unavailable(format!("could not set up the hub client: {e}")))
    }

    /// The snapshot directory of a fully cached model, if there is one.
    fn cached_dir(&self, id: &str) -> Option<PathBuf> {
        let repo = Cache::new(self.cache.clone()).repo(Repo::model(id.to_string()));
        let config = repo.get("config.json")?;
        if REQUIRED.iter().any(|f| repo.get(f).is_none()) {
            return None;
        }
        let weights_cached = match repo.get("model.safetensors.index.json") {
            Some(index) => shard_names(&index)
                .ok()?
                .iter()
                .all(|s| repo.get(s).is_some()),
            None => repo.get("model.safetensors").is_some(),
        };
        weights_cached.then(|| config.parent().map(Path::to_path_buf))?
    }

    /// What a refusal (401/403) of `model` means for this server, with what to do about it.
    fn refused(&self, model: &str, status: u16) -> HubError {
        let hub = &self.endpoint;
        HubError::Denied(match (&self.token, status) {
            (None, _) => format!(
                "the Hugging Face hub at {hub} refused model {model:?} (HTTP {status}): it is \
                 gated or private, or does not exist; set HF_TOKEN on the server to a token that \
                 can read it"
            ),
            (Some(_), 401) => format!(
                "the Hugging Face hub at {hub} rejected the server's HF_TOKEN for model \
                 {model:?} (HTTP 401): the token is invalid or expired, or the repo does not exist"
            ),
            (Some(_), _) => format!(
                "the server's HF_TOKEN may not read model {model:?} (HTTP {status} from {hub}): \
                 request access to the gated model on the hub with the token's account, or use a \
                 token that has it"
            ),
        })
    }

    async fn download(&self, id: &str) -> Result<PathBuf, HubError> {
        let unavailable = |e: ApiError| match &e {
            ApiError::RequestError(r) if r.status().is_some_and(|s| is_refusal(s.as_u16())) => {
                self.refused(id, r.status().map_or(0, |s| s.as_u16()))
            }
            ApiError::RequestError(r) if r.is_connect() || r.is_timeout() => {
                HubError::Unreachable(format!(
                    "downloading {id:?}: the Hugging Face hub at {} could not be reached ({e}); \
                     retry later",
                    self.endpoint
                ))
            }
            _ => HubError::Unavailable(format!(
                "downloading {id:?} from {} failed: {e}",
                self.endpoint
            )),
        };
        let api = self.api()?;
        let repo = api.model(id.to_string());
        let info = repo.info().await.map_err(unavailable)?;
        let has = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
        for f in REQUIRED {
            if !has(f) {
                return Err(HubError::Unavailable(format!(
                    "model {id:?} has no {f}; sftd needs a transformers-format Qwen3 repo"
                )));
            }
        }
        let mut files: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
        files.extend(OPTIONAL.iter().filter(|f| has(f)).map(|s| s.to_string()));
        tracing::info!(model = id, "downloading model from the hub");
        let mut config_path = None;
        for f in &files {
            let p = repo.get(f).await.map_err(unavailable)?;
            if f == "config.json" {
                config_path = Some(p);
            }
        }
        if has("model.safetensors.index.json") {
            let index = repo
                .get("model.safetensors.index.json")
                .await
                .map_err(unavailable)?;
            let shards = shard_names(&index).map_err(|e| {
                HubError::Unavailable(format!("model {id:?} has an unreadable weight index: {e}"))
            })?;
            for s in shards {
                repo.get(&s).await.map_err(unavailable)?;
            }
        } else if has("model.safetensors") {
            repo.get("model.safetensors").await.map_err(unavailable)?;
        } else {
            return Err(HubError::Unavailable(format!(
                "model {id:?} has no safetensors weights"
            )));
        }
        let config = config_path.expect("config.json is among the required files. This is a bug.");
        Ok(config
            .parent()
            .expect("a cached file lives in a snapshot directory. This is a bug.")
            .to_path_buf())
    }
}

/// Statuses by which the hub refuses this caller a repo: gated or private without a token that
/// may read it, a bad token, or (the hub answers 401 for an unknown repo to an anonymous caller)
/// no such repo. 404 is the repo missing; anything else (429, 5xx) is the hub failing.
fn is_refusal(status: u16) -> bool {
    matches!(status, 401 | 403)
}

/// A model as the command line names it: ready on disk (the demo model, generated if needed, or
/// a local directory with a config.json), or a hub repo id to fetch through a [`Hub`] set up
/// from the environment (HF_TOKEN, HF_HOME, HF_ENDPOINT).
pub enum CliModel {
    Local(PathBuf),
    Hub(Hub),
}

impl CliModel {
    pub fn parse(model: &str, data_dir: &Path) -> anyhow::Result<CliModel> {
        if model == DEMO_MODEL {
            return Ok(CliModel::Local(ensure_demo_model(data_dir)?));
        }
        let p = PathBuf::from(model);
        if p.join("config.json").exists() {
            return Ok(CliModel::Local(p));
        }
        if p.exists() || !valid_repo_id(model) {
            anyhow::bail!("model {model:?} is neither {DEMO_MODEL:?}, a directory with a config.json, nor a Hugging Face repo id");
        }
        #[derive(clap::Parser)]
        struct Env {
            #[command(flatten)]
            config: Config,
        }
        let mut config = <Env as clap::Parser>::try_parse_from(["sftd"])?.config;
        config.data_dir = data_dir.to_path_buf();
        Ok(CliModel::Hub(Hub::new(&config)))
    }
}

/// The distinct shard file names of a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(index)?)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow::anyhow!("no weight_map"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    if names.iter().any(|n| n.contains("..") || n.starts_with('/')) {
        anyhow::bail!("shard names must be plain file names");
    }
    Ok(names)
}

/// Paths are absolute or explicitly relative; everything else is a model name.
fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s == "."
        || s == ".."
}

/// `name` or `owner/name` with the hub's character set.
pub fn valid_repo_id(s: &str) -> bool {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with('.')
            && !p.contains("..")
            && !p.contains("--")
    };
    let parts: Vec<&str> = s.split('/').collect();
    matches!(parts.len(), 1 | 2) && parts.iter().all(|p| ok_part(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(valid_repo_id("Qwen/Qwen3-0.6B"));
        assert!(valid_repo_id("gpt2"));
        assert!(!valid_repo_id("a/b/c"));
        assert!(!valid_repo_id("../etc"));
        assert!(!valid_repo_id("Qwen/"));
        assert!(!valid_repo_id("bad name"));
        assert!(looks_like_path("/models/x"));
        assert!(looks_like_path("./x"));
        assert!(!looks_like_path("Qwen/Qwen3-0.6B"));
    }
}
