//! Deletes the job objects that no row names and none ever will: checkpoints and result files a
//! claim stored under its own keys after it lost the job, by a worker that then died before the
//! store refused the row that would have named them (a worker that lives deletes its own, and
//! the holder's pruning catches a checkpoint that landed before it). Run at start-up, so the
//! host that replaces a dead worker cleans up after it, and then every `SFTD_SWEEP_INTERVAL_MS`,
//! so that a cluster whose nodes run for months does not keep such objects for months.
//!
//! A key of claim `E` of a job is left alone unless every claim up to `E` is fenced
//! ([`Store::fenced_epochs`], read before the rows): the running holder's uploads in flight are
//! never touched, on any host. Keys of the layout before per-claim keys, and the trainer's
//! staging directories (`checkpoints/step-<N>`, epoch 0 here), are not swept: in a data dir
//! shared without object storage a running trainer writes its staging directory there.

use super::artifacts::{result_key_owner, withdraw_results};
use super::checkpoints::{delete_dir, dir_of, prefix};
use crate::storage::Storage;
use crate::store::Store;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

/// Deletes what no row names, of fenced claims only; returns the deleted checkpoint
/// directories' and result files' keys.
pub async fn sweep_fenced_objects(store: &Store, storage: &Storage) -> anyhow::Result<Vec<String>> {
    // Bounds first: rows of claims up to a bound cannot change after this read.
    let fenced = store.fenced_epochs().await?;
    let named: HashSet<String> = store
        .all_checkpoint_paths()
        .await?
        .into_iter()
        .chain(store.all_file_paths().await?)
        .collect();
    // What no row names, of a fenced claim (epoch 0 — staging, the old layout — never is).
    let garbage = |job_id: &str, epoch: i64, key: &str| {
        epoch > 0 && fenced.get(job_id).is_some_and(|&bound| epoch <= bound) && !named.contains(key)
    };
    let mut checkpoint_dirs = BTreeSet::new();
    let mut result_files = Vec::new();
    for object in storage.list("jobs").await? {
        let key = object.key;
        if let Some((job_id, epoch)) = result_key_owner(&key) {
            if garbage(job_id, epoch, &key) {
                result_files.push(key);
            }
        } else if let Some(job_id) = key.strip_prefix("jobs/").and_then(|r| r.split('/').next()) {
            // A checkpoint's files go with their directory, which is what a row names.
            if let Some((dir, epoch)) = dir_of(&key, &prefix(job_id)) {
                if garbage(job_id, epoch, &dir) {
                    checkpoint_dirs.insert(dir);
                }
            }
        }
    }
    let mut deleted = Vec::new();
    for dir in checkpoint_dirs {
        delete_dir(storage, &dir).await?;
        deleted.push(dir);
    }
    let result_files: Vec<&str> = result_files.iter().map(String::as_str).collect();
    for key in withdraw_results(storage, &result_files).await {
        deleted.push(key.to_string());
    }
    Ok(deleted)
}

/// [`sweep_fenced_objects`] in the background: now, then every `every` (`None`: only now).
/// Each deletion is logged; a failure (storage or database unreachable) is a warning, and the
/// next round tries again.
pub fn spawn_sweeps(store: Store, storage: Storage, every: Option<Duration>) {
    tokio::spawn(async move {
        loop {
            match sweep_fenced_objects(&store, &storage).await {
                Ok(deleted) => {
                    for key in &deleted {
                        tracing::info!(key, "deleted objects of a claim that lost its job");
                    }
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "could not sweep the objects of claims that lost their jobs"
                ),
            }
            let Some(every) = every else { return };
            tokio::time::sleep(every).await;
        }
    });
}
