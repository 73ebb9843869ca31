//! A job's checkpoints in the artifact storage, fenced per claim. Each claim publishes its
//! checkpoints under keys of its own epoch (`jobs/<id>/checkpoints/epoch-<E>/step-<N>/…`) and
//! then commits a row naming that key (a write the store fences by epoch). A run resumes only
//! from what committed rows name, and a holder deletes only the checkpoint directories no row
//! names, of its own epoch or older ones. So a worker that lost its claim (frozen, cut off) can
//! write only objects that no committed row refers to, and deletes none that one does; when its
//! row is refused it deletes what it just published ([`withdraw`]).
//!
//! The trainer writes each checkpoint to `jobs/<id>/checkpoints/step-<N>` in the data dir (its
//! staging directory); [`publish`] moves it to the claim's key, then uploads it unless the
//! storage is the data dir itself. Rows written before per-claim keys name
//! `jobs/<id>/checkpoints/step-<N>`; they are resumed from like any row.

use crate::storage::{Storage, StorageError};
use crate::store::jobs::JobError;
use crate::store::{Lease, Store};
use crate::train::checkpoint::{self, durable};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Where a job's checkpoints live: `jobs/<id>/checkpoints`.
pub fn prefix(job_id: &str) -> String {
    format!("jobs/{job_id}/checkpoints")
}

/// The key of the checkpoint of `step` published by the claim `epoch` of `job_id`.
pub fn key(job_id: &str, epoch: i64, step: u64) -> String {
    format!("{}/epoch-{epoch}/step-{step}", prefix(job_id))
}

/// The checkpoint directory a key under `prefix` belongs to, with the epoch that wrote it
/// (0: the layout before per-claim keys, or a staging directory).
pub(super) fn dir_of(key: &str, prefix: &str) -> Option<(String, i64)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let (epoch, rest) = match rest.strip_prefix("epoch-") {
        Some(r) => {
            let (e, r) = r.split_once('/')?;
            (e.parse::<i64>().ok()?, r)
        }
        None => (0, rest),
    };
    let step = rest.split('/').next()?;
    step.strip_prefix("step-")?.parse::<u64>().ok()?;
    let dir = match epoch {
        0 => format!("{prefix}/{step}"),
        e => format!("{prefix}/epoch-{e}/{step}"),
    };
    Some((dir, epoch))
}

/// Publishes the checkpoint of `step` the trainer staged at `staged` under the claim's own key
/// (`lease`'s epoch): moves the directory there in the data dir, then stores every file, the
/// manifest last. Returns the key for the row, which may be committed once this returns.
/// Calling it again after a failure carries on where it stopped.
pub async fn publish(
    storage: &Storage,
    lease: &Lease,
    step: u64,
    staged: &Path,
) -> Result<String, StorageError> {
    let key = key(&lease.job_id, lease.epoch, step);
    let dest = storage.local_path(&key);
    if staged != dest {
        move_dir(staged, &dest)?;
    }
    storage
        .publish_dir(&key, &dest, checkpoint::MANIFEST)
        .await?;
    Ok(key)
}

/// Renames `from` to `to` (replacing a leftover `to`) durably; a no-op when an earlier call
/// already did.
fn move_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.exists() && to.exists() {
        return Ok(());
    }
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    let parent = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    std::fs::rename(from, to)?;
    for dir in [Some(parent), from.parent()].into_iter().flatten() {
        durable::sync_path(dir).map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// Deletes the checkpoint this claim published under `key` after the store did not take its row,
/// unless a committed row names it after all (a retried write whose first try had landed).
/// Otherwise the job is another claim's now, or cancelled: no row will ever name these objects
/// (the key carries this claim's epoch), and the holder's prunes, which would delete them while
/// the job runs, may already be over. Returns whether it deleted.
pub async fn withdraw(
    store: &Store,
    storage: &Storage,
    job_id: &str,
    key: &str,
) -> anyhow::Result<bool> {
    let named = store
        .list_checkpoints(job_id, None, i64::MAX)
        .await?
        .iter()
        .any(|row| row.path == key);
    if named {
        return Ok(false);
    }
    delete_dir(storage, key).await?;
    Ok(true)
}

/// Deletes the checkpoint directory `dir` in the storage and its copy in this data dir.
pub(super) async fn delete_dir(storage: &Storage, dir: &str) -> anyhow::Result<()> {
    storage.delete_prefix(dir).await?;
    match std::fs::remove_dir_all(storage.local_path(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// The checkpoint a run resumes from, and why each newer committed one was passed over.
#[derive(Debug, Default)]
pub struct Committed {
    /// A verified local copy of the newest usable committed checkpoint.
    pub dir: Option<PathBuf>,
    pub passed_over: Vec<String>,
}

/// Makes the newest committed checkpoint of `job_id` available locally, newest row first: the
/// objects its row names, fetched unless this data dir holds a verified copy, and checked
/// against their manifest. One that fails the check or is gone is passed over for the next
/// older row. Nothing that no row names is ever resumed from.
pub async fn fetch_committed(
    store: &Store,
    storage: &Storage,
    job_id: &str,
) -> Result<Committed, JobError> {
    let rows = store
        .list_checkpoints(job_id, None, i64::MAX)
        .await
        .map_err(JobError::internal)?;
    let mut out = Committed::default();
    for row in rows {
        let local = storage.local_path(&row.path);
        let name = format!("committed checkpoint step-{} ({})", row.step, row.path);
        let error = match checkpoint::verify(&local) {
            Ok(_) => {
                out.dir = Some(local);
                return Ok(out);
            }
            Err(e) if storage.is_in_place() => format!("{e:#}"),
            Err(_) => match storage.fetch_dir(&row.path, true).await {
                Ok(fetched) => match checkpoint::verify(&fetched) {
                    Ok(_) => {
                        out.dir = Some(fetched);
                        return Ok(out);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&fetched);
                        format!("{e:#}")
                    }
                },
                Err(StorageError::NotFound(_)) => "it is gone from the artifact storage".into(),
                Err(e) => {
                    return Err(JobError::new(
                        "storage_unavailable",
                        format!("could not fetch the {name} from the artifact storage: {e}"),
                        None,
                    ))
                }
            },
        };
        out.passed_over.push(format!("{name}: {error}"));
    }
    Ok(out)
}

/// Deletes the checkpoint directories of the job `lease` holds that no committed row names
/// (older ones whose rows `save_total_limit` deleted, and objects of claims whose rows were
/// refused), in the storage and in this data dir, but only those of `lease`'s epoch or older:
/// a newer claim's objects may be in flight. Returns the deleted directories' keys. Called by
/// the holder right after it committed a row.
pub async fn prune(store: &Store, storage: &Storage, lease: &Lease) -> anyhow::Result<Vec<String>> {
    let named: HashSet<String> = store
        .list_checkpoints(&lease.job_id, None, i64::MAX)
        .await?
        .into_iter()
        .map(|row| row.path)
        .collect();
    let prefix = prefix(&lease.job_id);
    let mut dirs: BTreeMap<String, i64> = storage
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|o| dir_of(&o.key, &prefix))
        .collect();
    let local_root = storage.local_path(&prefix);
    dirs.extend(local_dirs(&local_root, &prefix));
    let mut deleted = Vec::new();
    for (dir, epoch) in dirs {
        if epoch > lease.epoch || named.contains(&dir) {
            continue;
        }
        delete_dir(storage, &dir).await?;
        deleted.push(dir);
    }
    // Epoch directories left empty (a directory that still holds something stays).
    if let Ok(entries) = std::fs::read_dir(&local_root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("epoch-") {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    Ok(deleted)
}

/// The checkpoint directories under the local `root` (of the key `prefix`), with their epochs.
fn local_dirs(root: &Path, prefix: &str) -> Vec<(String, i64)> {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for name in names(root) {
        if name.starts_with("epoch-") {
            for step in names(&root.join(&name)) {
                out.extend(dir_of(&format!("{prefix}/{name}/{step}/"), prefix));
            }
        } else {
            out.extend(dir_of(&format!("{prefix}/{name}/"), prefix));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_checkpoint_directory_and_epoch() {
        let p = prefix("ftjob-1");
        assert_eq!(key("ftjob-1", 3, 8), format!("{p}/epoch-3/step-8"));
        assert_eq!(
            dir_of(&format!("{p}/epoch-3/step-8/manifest.json"), &p),
            Some((format!("{p}/epoch-3/step-8"), 3))
        );
        assert_eq!(
            dir_of(&format!("{p}/step-4/optimizer.safetensors"), &p),
            Some((format!("{p}/step-4"), 0))
        );
        // A directory being written (`.partial`) and anything else are not checkpoints.
        assert_eq!(dir_of(&format!("{p}/step-4.partial/x"), &p), None);
        assert_eq!(dir_of(&format!("{p}/epoch-x/step-4/x"), &p), None);
        assert_eq!(dir_of("jobs/ftjob-1/adapter/x", &p), None);
        assert_eq!(dir_of(&format!("{p}-2/step-4/x"), &p), None);
    }
}
