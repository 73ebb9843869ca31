//! A job's artifacts between the artifact storage and the local paths training needs: inputs
//! fetched before a run, the newest stored checkpoint fetched for a resume on any host,
//! checkpoints published (manifest last) before their row is committed, result files published
//! before the job succeeds, and the local copies a run needed dropped when it ends. With the
//! default storage (the data dir itself) there is nothing to copy and each of these only checks.

use crate::storage::{Storage, StorageError};
use crate::store::jobs::JobError;
use crate::store::{JobRow, Store};
use crate::train::checkpoint;
use crate::train::spec::JobSpec;
use std::path::{Path, PathBuf};

/// Where a job's checkpoints are stored: `jobs/<id>/checkpoints/step-<N>/…`.
fn checkpoints_prefix(job_id: &str) -> String {
    format!("jobs/{job_id}/checkpoints")
}

/// The step and file name of a key under `prefix/step-<N>/`.
fn step_of<'k>(key: &'k str, prefix: &str) -> Option<(u64, &'k str)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("/step-")?;
    let (step, file) = rest.split_once('/')?;
    Some((step.parse().ok()?, file))
}

fn storage_failure(what: &str, e: &StorageError) -> JobError {
    JobError::new(
        "storage_unavailable",
        format!("could not fetch {what} from the artifact storage: {e}"),
        None,
    )
}

/// Fetches the local copies of a run's dataset files and of an earlier job's adapter.
pub(super) async fn fetch_inputs(
    storage: &Storage,
    training_file: &Path,
    validation_file: Option<&Path>,
    tool_eval_file: Option<&Path>,
    init_adapter: Option<&Path>,
) -> Result<(), JobError> {
    for (param, path) in [
        ("training_file", Some(training_file)),
        ("validation_file", validation_file),
        ("tool_eval_file", tool_eval_file),
    ] {
        let Some(key) = path.and_then(|p| storage.key_of(p)) else {
            continue;
        };
        match storage.fetch(&key).await {
            Ok(_) => {}
            Err(StorageError::NotFound(_)) => {
                return Err(JobError::new(
                    "invalid_file",
                    format!(
                        "the {param} is gone from the artifact storage (it may have been deleted)"
                    ),
                    Some(param),
                ))
            }
            Err(e) => return Err(storage_failure(&format!("the {param}"), &e)),
        }
    }
    // An earlier job's adapter (`jobs/<id>/adapter`); other adapters are local directories.
    if let Some(key) = init_adapter
        .and_then(|p| storage.key_of(p))
        .filter(|k| k.starts_with("jobs/"))
    {
        storage
            .fetch_dir(&key, false)
            .await
            .map_err(|e| storage_failure("the init_adapter's files", &e))?;
    }
    Ok(())
}

/// Makes the newest complete stored checkpoint of `job_id` available under `output_dir`, so a
/// run on any host resumes from it. A stored checkpoint is complete when its manifest is there
/// (published last); one whose files then fail the manifest's check is passed over. Returns
/// why each newer one was passed over.
pub(super) async fn fetch_latest_checkpoint(
    storage: &Storage,
    job_id: &str,
    output_dir: &Path,
) -> Result<Vec<String>, JobError> {
    if storage.is_in_place() {
        return Ok(Vec::new());
    }
    let prefix = checkpoints_prefix(job_id);
    let objects = storage
        .list(&prefix)
        .await
        .map_err(|e| storage_failure("the job's checkpoints", &e))?;
    let mut steps: Vec<u64> = objects
        .iter()
        .filter_map(|o| step_of(&o.key, &prefix))
        .filter(|(_, file)| *file == checkpoint::MANIFEST)
        .map(|(step, _)| step)
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    let mut rejected = Vec::new();
    for step in steps {
        let local = checkpoint::checkpoint_dir(output_dir, step);
        if checkpoint::verify(&local).is_ok() {
            return Ok(rejected);
        }
        let key = format!("{prefix}/step-{step}");
        let fetched = storage
            .fetch_dir(&key, true)
            .await
            .map_err(|e| storage_failure(&format!("checkpoint step-{step}"), &e))?;
        match checkpoint::verify(&fetched) {
            Ok(_) => return Ok(rejected),
            Err(e) => {
                rejected.push(format!("stored checkpoint step-{step}: {e:#}"));
                let _ = std::fs::remove_dir_all(&fetched);
            }
        }
    }
    Ok(rejected)
}

/// Publishes a checkpoint directory written by the trainer, manifest last; returns its key.
/// Its row may be committed once this returns.
pub(super) async fn publish_checkpoint(
    storage: &Storage,
    dir: &Path,
) -> Result<String, StorageError> {
    let key = storage
        .key_of(dir)
        .ok_or_else(|| StorageError::NotFound(dir.display().to_string()))?;
    // Already stored (a resume re-registering the checkpoint it fetched): the manifest names
    // every file's hash, so the same manifest means the same checkpoint.
    let manifest_key = format!("{key}/{}", checkpoint::MANIFEST);
    if !storage.is_in_place() && storage.size(&manifest_key).await?.is_some() {
        let local = tokio::fs::read(dir.join(checkpoint::MANIFEST)).await?;
        if storage.get_bytes(&manifest_key).await? == local {
            return Ok(key);
        }
    }
    storage.publish_dir(&key, dir, checkpoint::MANIFEST).await?;
    Ok(key)
}

/// Deletes the stored checkpoints of `job_id` beyond the `keep` newest (`save_total_limit`;
/// 0 keeps all), as the trainer does with its local directories.
pub(super) async fn prune_checkpoints(
    storage: &Storage,
    job_id: &str,
    keep: u32,
) -> Result<(), StorageError> {
    if keep == 0 || storage.is_in_place() {
        return Ok(());
    }
    let prefix = checkpoints_prefix(job_id);
    let mut steps: Vec<u64> = storage
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|o| step_of(&o.key, &prefix).map(|(step, _)| step))
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    for step in steps.into_iter().skip(keep as usize) {
        storage
            .delete_prefix(&format!("{prefix}/step-{step}"))
            .await?;
    }
    Ok(())
}

/// Publishes a finished run's result files; returns each one's key and size.
pub(super) async fn publish_results(
    storage: &Storage,
    files: &[PathBuf],
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for path in files {
        let key = storage
            .key_of(path)
            .ok_or_else(|| anyhow::anyhow!("{} is outside the data directory", path.display()))?;
        let bytes = storage.put_file(&key, path).await?;
        out.push((key, bytes));
    }
    Ok(out)
}

/// Deletes this host's copies of what a run of `job` fetched or wrote that the artifact storage
/// keeps: its dataset files and its checkpoints (the adapter stays, for chat on a node that
/// shares this data dir). Any later run, here or elsewhere, fetches them again. Nothing is
/// deleted when the storage is the data dir itself: those files are the objects.
pub(super) async fn drop_local_copies(store: &Store, storage: &Storage, job: &JobRow) {
    if storage.is_in_place() {
        return;
    }
    let tool_eval = serde_json::from_str::<JobSpec>(&job.spec)
        .ok()
        .and_then(|s| s.tool_eval_file);
    let ids = [Some(&job.training_file), job.validation_file.as_ref()];
    for id in ids.into_iter().flatten().chain(tool_eval.as_ref()) {
        match store.get_file(id).await {
            Ok(Some(file)) => remove(&storage.local_path(&file.path)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(file = %id, error = %e, "could not look up a local copy to drop")
            }
        }
    }
    remove(&storage.local_path(&checkpoints_prefix(&job.id)));
}

fn remove(path: &Path) {
    let gone = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match gone {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not drop a local copy"),
    }
}
