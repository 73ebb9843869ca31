//! A job's artifacts between the artifact storage and the local paths training needs: inputs
//! fetched before a run, result files published before the job succeeds, and the local copies
//! a run needed dropped when it ends. With the default storage (the data dir itself) there is
//! nothing to copy and each of these only checks. Checkpoints are `checkpoints.rs`'s.

use crate::storage::{Storage, StorageError};
use crate::store::jobs::JobError;
use crate::store::{JobRow, Lease, Store};
use crate::train::spec::JobSpec;
use std::path::{Path, PathBuf};

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
    // An earlier job's adapter (under `jobs/<id>/`); other adapters are local directories.
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

/// Where the claim `epoch` of job `job_id` stores its result file `name`. Per claim, like its
/// checkpoints: a worker that lost its lease before it finished uploading can only write keys
/// that the success row, committed by the lease holder alone, never names.
fn result_key(job_id: &str, epoch: i64, name: &str) -> String {
    format!("jobs/{job_id}/results/epoch-{epoch}/{name}")
}

/// The job and claim epoch of a key [`result_key`] made; `None` for any other key.
pub(super) fn result_key_owner(key: &str) -> Option<(&str, i64)> {
    let (job_id, rest) = key.strip_prefix("jobs/")?.split_once('/')?;
    let (epoch, name) = rest.strip_prefix("results/epoch-")?.split_once('/')?;
    let epoch = epoch.parse().ok()?;
    (!name.is_empty() && !name.contains('/')).then_some((job_id, epoch))
}

/// Moves a finished run's result files into the storage under this claim's keys
/// ([`result_key`]); returns each one's key and size.
pub(super) async fn publish_results(
    storage: &Storage,
    lease: &Lease,
    files: &[PathBuf],
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow::anyhow!("result file {} has no name", path.display()))?;
        let key = result_key(&lease.job_id, lease.epoch, name);
        let bytes = storage.move_in_keeping_copy(&key, path).await?;
        out.push((key, bytes));
    }
    Ok(out)
}

/// Deletes result files that no row names or ever will, object and local copy: those
/// [`publish_results`] stored before the store refused the success that would name them (the job
/// is another claim's now, or cancelled), or that the start-up sweep found of a fenced claim.
/// Returns the keys deleted; a failure is a warning, and the rest are still tried.
pub(super) async fn withdraw_results<'k>(storage: &Storage, keys: &[&'k str]) -> Vec<&'k str> {
    let mut deleted = Vec::new();
    for &key in keys {
        match storage.delete(key).await {
            Ok(()) => {
                storage.forget_local(key).await;
                deleted.push(key);
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "could not delete a result file no row names")
            }
        }
    }
    deleted
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
    remove(&storage.local_path(&super::checkpoints::prefix(&job.id)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_keys_name_their_job_and_claim() {
        let key = result_key("ftjob-1", 3, "adapter_model.safetensors");
        assert_eq!(result_key_owner(&key), Some(("ftjob-1", 3)));
        // The layout before per-claim keys, checkpoints and malformed keys are not result keys.
        assert_eq!(
            result_key_owner("jobs/ftjob-1/adapter/adapter_config.json"),
            None
        );
        assert_eq!(result_key_owner("jobs/ftjob-1/metrics.csv"), None);
        assert_eq!(
            result_key_owner("jobs/ftjob-1/checkpoints/epoch-3/step-2/x"),
            None
        );
        assert_eq!(result_key_owner("jobs/ftjob-1/results/epoch-x/a"), None);
        assert_eq!(result_key_owner("jobs/ftjob-1/results/epoch-3/"), None);
        assert_eq!(result_key_owner("jobs/ftjob-1/results/epoch-3/a/b"), None);
    }
}
