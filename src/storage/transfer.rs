//! Moving bytes between local files and objects with bounded memory: uploads in parts
//! (multipart above one part), downloads streamed to a temporary sibling that is renamed into
//! place once complete.

use super::{Result, StorageError};
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One part of a multipart upload (S3's minimum is 5 MiB); a file up to this size is stored in
/// a single request.
pub const PART_BYTES: usize = 8 << 20;
/// Parts uploading at once: with the one being filled, memory stays under
/// `(PARTS_IN_FLIGHT + 1) * PART_BYTES` per upload.
const PARTS_IN_FLIGHT: usize = 2;

/// Uploads `src` to `key`; returns its size.
pub(super) async fn put_file(objects: &Arc<dyn ObjectStore>, key: &Key, src: &Path) -> Result<u64> {
    let mut file = tokio::fs::File::open(src).await?;
    let size = file.metadata().await?.len();
    if size <= PART_BYTES as u64 {
        let mut buf = Vec::with_capacity(size as usize);
        file.read_to_end(&mut buf).await?;
        objects.put(key, buf.into()).await?;
        return Ok(size);
    }
    let upload = objects.put_multipart(key).await?;
    let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut buf = vec![0u8; 1 << 20];
    let sent = async {
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, StorageError>(());
            }
            parts.wait_for_capacity(PARTS_IN_FLIGHT).await?;
            parts.write(&buf[..n]);
        }
    }
    .await;
    match sent {
        Ok(()) => {
            parts.finish().await?;
            Ok(size)
        }
        Err(e) => {
            let _ = parts.abort().await;
            Err(e)
        }
    }
}

/// Downloads `key` to `dest` through `dest.part`; skipped when `dest` already has the
/// object's size, unless `fresh`.
pub(super) async fn download(
    objects: &Arc<dyn ObjectStore>,
    key: &Key,
    dest: &Path,
    fresh: bool,
) -> Result<()> {
    if !fresh {
        if let Ok(local) = tokio::fs::metadata(dest).await {
            if local.len() == objects.head(key).await?.size {
                return Ok(());
            }
        }
    }
    let got = objects.get(key).await?;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let tmp = part_path(dest);
    let written = async {
        let mut out = tokio::fs::File::create(&tmp).await?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk?).await?;
        }
        out.sync_all().await?;
        tokio::fs::rename(&tmp, dest).await?;
        Ok::<_, StorageError>(())
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    written
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// The files under `dir`, as `/`-separated paths relative to it.
pub(super) fn files_under(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| std::io::Error::other(format!("file name {n:?} is not UTF-8")))?;
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if entry.file_type()?.is_dir() {
                pending.push((entry.path(), child));
            } else {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}
