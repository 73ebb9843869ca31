//! Artifact storage: where uploads, checkpoints, adapters and result files live, behind one
//! interface over the `object_store` crate. By default the objects are the files of the data
//! dir itself; with `SFTD_STORAGE_URL` they live in S3-compatible storage (`s3://bucket/prefix`)
//! or another directory (`file:///mnt/shared/sftd`, e.g. an NFS mount), and the data dir holds
//! local copies under the same keys (training reads and writes paths, not objects).
//!
//! A key is a `/`-separated path relative to the data dir (`files/<id>.jsonl`,
//! `jobs/<id>/checkpoints/epoch-1/step-4/manifest.json`); the database stores keys, so one row
//! means the same bytes on every host.

mod transfer;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use transfer::PART_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} is not in storage")]
    NotFound(String),
    #[error("SFTD_STORAGE_URL {0:?} is not supported: use s3://bucket[/prefix] or file:///absolute/path")]
    BadUrl(String),
    #[error("storage: {0}")]
    Backend(#[source] object_store::Error),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => StorageError::NotFound(path),
            e => StorageError::Backend(e),
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// One stored object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub key: String,
    pub bytes: u64,
    /// Seconds since the Unix epoch.
    pub modified: i64,
}

/// Handle to the artifact storage. Cheap to clone.
#[derive(Clone)]
pub struct Storage(Arc<Inner>);

struct Inner {
    objects: Arc<dyn ObjectStore>,
    /// Where each key has its local copy (`<data dir>/<key>`).
    data_dir: PathBuf,
    /// The objects are the data dir's own files: publishing and fetching have nothing to copy.
    in_place: bool,
    /// For logs: the URL without credentials.
    location: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.0.location)
    }
}

impl Storage {
    /// The storage `url` names (`None`: the data dir itself). S3 takes its endpoint, region and
    /// credentials from the usual `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true`
    /// for a plain-HTTP server, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
    pub fn open(url: Option<&str>, data_dir: &Path) -> Result<Self> {
        Self::open_with(url, data_dir, &[])
    }

    /// [`Storage::open`] with S3 settings that override the environment's, named like the
    /// variables in lower case (`aws_endpoint_url`, `aws_allow_http`, `aws_access_key_id`, …).
    pub fn open_with(
        url: Option<&str>,
        data_dir: &Path,
        s3_options: &[(&str, &str)],
    ) -> Result<Self> {
        let url = url.map(str::trim).filter(|u| !u.is_empty());
        let (objects, in_place, location): (Arc<dyn ObjectStore>, bool, String) = match url {
            None => (
                local(data_dir, false)?,
                true,
                data_dir.display().to_string(),
            ),
            Some(u) if u.starts_with("file://") => {
                let root = PathBuf::from(&u["file://".len()..]);
                if !root.is_absolute() {
                    return Err(StorageError::BadUrl(u.into()));
                }
                std::fs::create_dir_all(&root)?;
                let root = root.canonicalize()?;
                let same = data_dir.canonicalize().is_ok_and(|d| d == root);
                (local(&root, !same)?, same, u.to_string())
            }
            Some(u) if u.starts_with("s3://") => (s3(u, s3_options)?, false, u.to_string()),
            Some(u) => return Err(StorageError::BadUrl(u.into())),
        };
        Ok(Self(Arc::new(Inner {
            objects,
            data_dir: data_dir.to_path_buf(),
            in_place,
            location,
        })))
    }

    /// Where the objects are, for logs and messages (never credentials).
    pub fn location(&self) -> &str {
        &self.0.location
    }

    /// Whether the objects are the data dir's own files (the default).
    pub fn is_in_place(&self) -> bool {
        self.0.in_place
    }

    /// The local copy of `key`: `<data dir>/<key>`.
    pub fn local_path(&self, key: &str) -> PathBuf {
        self.0.data_dir.join(key)
    }

    /// The key of a local path under the data dir.
    pub fn key_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.0.data_dir).ok()?;
        let parts: Vec<_> = rel
            .components()
            .map(|c| c.as_os_str().to_str())
            .collect::<Option<_>>()?;
        (!parts.is_empty()).then(|| parts.join("/"))
    }

    /// Stores `bytes` under `key` in one request (small objects).
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.0.objects.put(&Key::from(key), bytes.into()).await?;
        Ok(())
    }

    /// Stores the file `src` under `key`, streamed in parts of [`PART_BYTES`] (memory stays
    /// bounded whatever the size). A no-op when `src` already is the object (in place).
    pub async fn put_file(&self, key: &str, src: &Path) -> Result<u64> {
        if self.0.in_place && self.local_path(key) == src {
            return Ok(tokio::fs::metadata(src).await?.len());
        }
        transfer::put_file(&self.0.objects, &Key::from(key), src).await
    }

    /// Stores the file `src` under `key` and removes `src`: a rename (made durable) in place,
    /// an upload otherwise.
    pub async fn move_in(&self, key: &str, src: &Path) -> Result<u64> {
        if !self.0.in_place {
            let bytes = self.put_file(key, src).await?;
            let _ = tokio::fs::remove_file(src).await;
            return Ok(bytes);
        }
        let dest = self.local_path(key);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(src, &dest).await?;
        let bytes = tokio::fs::metadata(&dest).await?.len();
        // The rename itself reaches the disk before anything that points at the object.
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        let synced = tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
            .await
            .map_err(std::io::Error::other)?;
        if let Err(e) = synced {
            let _ = tokio::fs::remove_file(&dest).await;
            return Err(e.into());
        }
        Ok(bytes)
    }

    /// As [`Self::move_in`], but with another storage than the data dir `src` then stays as
    /// this host's local copy of `key` (moved to [`Self::local_path`]), so that what reads the
    /// object here next finds it without a download.
    pub async fn move_in_keeping_copy(&self, key: &str, src: &Path) -> Result<u64> {
        if self.0.in_place {
            return self.move_in(key, src).await;
        }
        let bytes = self.put_file(key, src).await?;
        let copy = self.local_path(key);
        if let Some(parent) = copy.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(src, &copy).await?;
        Ok(bytes)
    }

    /// The object's size and its bytes as a stream (never all in memory).
    pub async fn get(&self, key: &str) -> Result<(u64, BoxStream<'static, Result<bytes::Bytes>>)> {
        let got = self.0.objects.get(&Key::from(key)).await?;
        let size = got.meta.size;
        Ok((size, got.into_stream().map_err(StorageError::from).boxed()))
    }

    /// The whole object in memory (small objects only: manifests, configs).
    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let got = self.0.objects.get(&Key::from(key)).await?;
        Ok(got.bytes().await?.to_vec())
    }

    /// The object's size, or `None` when there is no such object.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.0.objects.head(&Key::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object whose key starts with the directory `prefix`, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Object>> {
        let prefix = Key::from(prefix);
        let mut out: Vec<Object> = self
            .0
            .objects
            .list(Some(&prefix))
            .map_ok(|m| Object {
                key: m.location.to_string(),
                bytes: m.size,
                modified: m.last_modified.timestamp(),
            })
            .try_collect()
            .await?;
        // A local file system lists its in-progress writes too (`<key>#<n>`).
        out.retain(|o| !o.key.rsplit('/').next().unwrap_or_default().contains('#'));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes the object; a missing one is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.0.objects.delete(&Key::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object under the directory `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        for o in self.list(prefix).await? {
            self.delete(&o.key).await?;
        }
        if self.0.in_place {
            // The objects' directory, now empty (object_store removes files, not directories).
            let _ = tokio::fs::remove_dir_all(self.local_path(prefix)).await;
        }
        Ok(())
    }

    /// Publishes the local directory `dir` as the objects under `prefix`: every file, the one
    /// named `last` after all the others, so a reader that finds `last` finds the rest. A no-op
    /// in place (the directory is the objects).
    pub async fn publish_dir(&self, prefix: &str, dir: &Path, last: &str) -> Result<()> {
        if self.0.in_place && self.local_path(prefix) == dir {
            return Ok(());
        }
        let mut files = transfer::files_under(dir)?;
        // Last, and only after everything else has been stored.
        files.sort_by_key(|rel| rel == last);
        for rel in files {
            self.put_file(&format!("{prefix}/{rel}"), &dir.join(&rel))
                .await?;
        }
        Ok(())
    }

    /// The local copy of `key`, downloaded first unless one of the object's size is already
    /// there (keys are written once, so size tells a finished copy from a torn one).
    pub async fn fetch(&self, key: &str) -> Result<PathBuf> {
        let dest = self.local_path(key);
        if self.0.in_place {
            return if tokio::fs::try_exists(&dest).await? {
                Ok(dest)
            } else {
                Err(StorageError::NotFound(key.into()))
            };
        }
        transfer::download(&self.0.objects, &Key::from(key), &dest, false).await?;
        Ok(dest)
    }

    /// The local copy of every object under `prefix` (see [`Storage::fetch`]); `fresh`
    /// downloads again even files already there. Returns the local directory.
    pub async fn fetch_dir(&self, prefix: &str, fresh: bool) -> Result<PathBuf> {
        let dir = self.local_path(prefix);
        if self.0.in_place {
            return Ok(dir);
        }
        let objects = self.list(prefix).await?;
        if objects.is_empty() {
            return Err(StorageError::NotFound(prefix.into()));
        }
        for o in objects {
            transfer::download(
                &self.0.objects,
                &Key::from(o.key.as_str()),
                &self.local_path(&o.key),
                fresh,
            )
            .await?;
        }
        Ok(dir)
    }

    /// Removes the local copy of `key` (after deleting the object; a no-op in place, where the
    /// copy was the object).
    pub async fn forget_local(&self, key: &str) {
        if !self.0.in_place {
            let _ = tokio::fs::remove_file(self.local_path(key)).await;
        }
    }
}

/// A directory as an object store. `cleanup` removes directories a delete leaves empty; never
/// in place, where the server itself creates and fills the data dir's directories.
fn local(root: &Path, cleanup: bool) -> Result<Arc<dyn ObjectStore>> {
    Ok(Arc::new(
        LocalFileSystem::new_with_prefix(root)?.with_automatic_cleanup(cleanup),
    ))
}

/// `s3://bucket[/prefix]`, configured from the `AWS_*` environment.
fn s3(url: &str, options: &[(&str, &str)]) -> Result<Arc<dyn ObjectStore>> {
    let rest = &url["s3://".len()..];
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StorageError::BadUrl(url.into()));
    }
    // A storage that is down surfaces in seconds (the callers retry or report), not minutes.
    let retry = object_store::RetryConfig {
        backoff: Default::default(),
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(30),
    };
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry);
    for (key, value) in options {
        builder = builder.with_config(key.parse()?, *value);
    }
    let s3 = builder.build()?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    })
}
