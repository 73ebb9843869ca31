//! Running one job on the worker thread: resolve its inputs (fetched from the artifact storage),
//! resume from its newest committed checkpoint, drive the engine (its events go through the
//! [`Recorder`]), and record how the run ended, publishing and registering the result files.

use super::recorder::Recorder;
use super::{artifacts, checkpoints, Ctx};
use crate::hub::Hub;
use crate::storage::Storage;
use crate::store::files::{NewFile, PURPOSE_FINE_TUNE, PURPOSE_RESULTS};
use crate::store::jobs::JobError;
use crate::store::{new_id, JobRow, JobStatus, Lease, NewEvent, Store};
use crate::train::checkpoint::{self, durable};
use crate::train::events::{Control, Outcome};
use crate::train::spec::{JobSpec, TrainConfig};
use crate::train::trainer as engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A job's inputs, resolved to paths.
pub(super) struct Inputs {
    pub model_dir: PathBuf,
    pub training_file: PathBuf,
    pub validation_file: Option<PathBuf>,
    pub tool_eval_file: Option<PathBuf>,
    pub init_adapter: Option<PathBuf>,
    pub spec: JobSpec,
    pub config: TrainConfig,
}

/// Resolves and checks everything a job needs (files in the storage, the model, a starting
/// adapter); the file paths are their local copies, which [`run_job`] fetches. Used both to
/// validate a new job and to start it. Errors are user-facing.
pub(super) async fn prepare(
    store: &Store,
    storage: &Storage,
    hub: &Hub,
    job: &JobRow,
) -> Result<Inputs, JobError> {
    let spec: JobSpec = serde_json::from_str(&job.spec).map_err(JobError::internal)?;
    let config: TrainConfig = serde_json::from_str(&job.config).map_err(JobError::internal)?;
    let training_file = dataset_path(store, storage, &job.training_file, "training_file").await?;
    let validation_file = match &job.validation_file {
        Some(id) => Some(dataset_path(store, storage, id, "validation_file").await?),
        None => None,
    };
    let tool_eval_file = match &spec.tool_eval_file {
        Some(id) => Some(dataset_path(store, storage, id, "tool_eval_file").await?),
        None => None,
    };
    let model_dir = hub
        .resolve(&job.model)
        .await
        .map_err(|e| JobError::new(e.code(), e.to_string(), Some("model")))?;
    let init_adapter = match &spec.init_adapter {
        Some(a) => Some(init_adapter_dir(store, hub, a).await?),
        None => None,
    };
    Ok(Inputs {
        model_dir,
        training_file,
        validation_file,
        tool_eval_file,
        init_adapter,
        spec,
        config,
    })
}

async fn dataset_path(
    store: &Store,
    storage: &Storage,
    id: &str,
    param: &str,
) -> Result<PathBuf, JobError> {
    let missing = || {
        JobError::new(
            "invalid_file",
            format!("{param} {id:?} does not exist (it may have been deleted)"),
            Some(param),
        )
    };
    let file = store
        .get_file(id)
        .await
        .map_err(JobError::internal)?
        .ok_or_else(missing)?;
    if file.purpose != PURPOSE_FINE_TUNE {
        return Err(JobError::new(
            "invalid_file",
            format!(
                "{param} {id:?} has purpose {:?}, not \"fine-tune\"",
                file.purpose
            ),
            Some(param),
        ));
    }
    match storage.size(&file.path).await {
        Ok(Some(_)) => Ok(storage.local_path(&file.path)),
        Ok(None) => Err(missing()),
        Err(e) => Err(JobError::new(
            "storage_unavailable",
            format!("could not check {param} {id:?} in the artifact storage: {e}"),
            Some(param),
        )),
    }
}

/// `init_adapter` is an earlier job (`ftjob-…` or its `ft:…` model name) or an adapter
/// directory under the allowed roots.
pub async fn init_adapter_dir(store: &Store, hub: &Hub, value: &str) -> Result<PathBuf, JobError> {
    let param = Some("init_adapter");
    let job_id = value.rsplit(':').next().unwrap_or(value);
    if job_id.starts_with("ftjob-") {
        let job = store
            .get_job(job_id)
            .await
            .map_err(JobError::internal)?
            .ok_or_else(|| {
                JobError::new(
                    "invalid_init_adapter",
                    format!("job {job_id:?} does not exist"),
                    param,
                )
            })?;
        if job.status != JobStatus::Succeeded {
            return Err(JobError::new(
                "invalid_init_adapter",
                format!(
                    "job {job_id:?} has status {}; only a succeeded job's adapter can be continued",
                    job.status
                ),
                param,
            ));
        }
        let dir = adapter_key(store, job_id)
            .await
            .map_err(JobError::internal)?
            .ok_or_else(|| {
                JobError::new(
                    "invalid_init_adapter",
                    format!("job {job_id:?} has no adapter among its result files (deleted?)"),
                    param,
                )
            })?;
        return Ok(store.data_dir().join(dir));
    }
    let dir = hub
        .allowed_dir(value, "init_adapter")
        .map_err(|e| JobError::new("invalid_init_adapter", e.to_string(), param))?;
    if !dir.join("adapter_config.json").is_file() {
        return Err(JobError::new(
            "invalid_init_adapter",
            format!("{value:?} is not a PEFT adapter directory (no adapter_config.json)"),
            param,
        ));
    }
    Ok(dir)
}

/// The storage key of the directory holding a succeeded job's adapter: where its success row
/// put the weights (its finishing claim's keys). `None` when the job has no such result file.
pub async fn adapter_key(store: &Store, job_id: &str) -> crate::store::Result<Option<String>> {
    let weights = store
        .result_file_path(job_id, checkpoint::ADAPTER_WEIGHTS)
        .await?;
    Ok(weights.map(|w| w.rsplit_once('/').map_or("", |(dir, _)| dir).to_string()))
}

pub fn job_dir(store: &Store, job_id: &str) -> PathBuf {
    store.data_dir().join("jobs").join(job_id)
}

/// How a run ended, for what the worker does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Recorded as succeeded, failed, cancelled or requeued for a shutdown.
    Normally,
    /// The artifact storage was down: the job was requeued (or failed, past its attempts), and
    /// this worker waits a little before it claims again.
    StorageDown,
}

/// Runs `job` (already `running`) to its end on this thread and records the outcome.
pub(super) fn run_job(
    ctx: &Ctx,
    job: &JobRow,
    control: &Control,
    device: &candle_core::Device,
    serving: &super::serve::Serving,
) -> Ended {
    let store = &ctx.store;
    let id = job.id.as_str();
    let lease = job.lease();
    let fail = |err: JobError| {
        tracing::warn!(job = id, error = %err.message, "job failed");
        match ctx.rt.block_on(store.fail_running(&lease, &err)) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                job = id,
                "the failure was not recorded: the job was cancelled or its lease lost"
            ),
            Err(e) => tracing::error!(job = id, error = %e, "could not record the failure"),
        }
        Ended::Normally
    };
    if control.is_suspended() {
        requeue(
            ctx,
            &lease,
            "Server shutting down before the job started; it stays queued",
        );
        return Ended::Normally;
    }
    let inputs = match ctx.rt.block_on(prepare(store, &ctx.storage, &ctx.hub, job)) {
        Ok(i) => i,
        Err(e) if e.code == STORAGE_UNAVAILABLE => return storage_down(ctx, &lease, &e.message),
        Err(e) => return fail(e),
    };
    let output_dir = job_dir(store, id);
    let fetched = ctx.rt.block_on(async {
        artifacts::fetch_inputs(
            &ctx.storage,
            &inputs.training_file,
            inputs.validation_file.as_deref(),
            inputs.tool_eval_file.as_deref(),
            inputs.init_adapter.as_deref(),
        )
        .await?;
        checkpoints::fetch_committed(store, &ctx.storage, id).await
    });
    let committed = match fetched {
        Ok(c) => c,
        Err(e) if e.code == STORAGE_UNAVAILABLE => return storage_down(ctx, &lease, &e.message),
        Err(e) => return fail(e),
    };
    let keep_checkpoints = inputs.config.save_total_limit;
    let mut recorder = Recorder::new(ctx, &lease, control, keep_checkpoints);
    let data_dir = store.data_dir().to_string_lossy().into_owned();
    for reason in committed.passed_over {
        recorder.record(NewEvent {
            level: "warn",
            ..NewEvent::info(format!(
                "Skipping a damaged checkpoint: {}",
                reason.replace(&data_dir, "<data dir>")
            ))
        });
    }
    let resume_from = committed.dir;
    if let Some(ck) = &resume_from {
        recorder.record(NewEvent::info(format!(
            "Resuming from checkpoint {}",
            ck.file_name().unwrap_or_default().to_string_lossy()
        )));
    } else if job.attempts > 1 {
        recorder.record(NewEvent::info(
            "No checkpoint to resume from; restarting from step 0",
        ));
    }
    // Generation requests run between this job's micro-batches, on its model when they use its base.
    let control = &control
        .clone()
        .with_interlude(serving.for_job(inputs.model_dir.clone()));
    let train_job = engine::TrainJob {
        model_dir: inputs.model_dir,
        base_model_name: job.model.clone(),
        training_file: inputs.training_file,
        validation_file: inputs.validation_file,
        tool_eval_file: inputs.tool_eval_file,
        init_adapter: inputs.init_adapter,
        // The recorder deletes old checkpoints (`save_total_limit`) by their rows, as the
        // holder; the trainer's own pruning would touch other claims' directories.
        config: TrainConfig {
            save_total_limit: 0,
            ..inputs.config
        },
        output_dir,
        resume_from,
        device: device.clone(),
    };
    tracing::info!(job = id, attempt = job.attempts, "training started");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine::run(&train_job, control, &mut |ev| recorder.on_event(ev))
    }));
    if recorder.storage_down() {
        if let Some(lost) = recorder.take_lost() {
            return storage_down(ctx, &lease, &lost);
        }
    }
    if let Some(lost) = recorder.take_lost() {
        return fail(JobError::new(
            "events_not_recorded",
            format!("{lost}; the job was stopped so that no step goes unrecorded"),
            None,
        ));
    }
    match result {
        Ok(Ok(Outcome::Completed {
            adapter_dir,
            trained_tokens,
            steps,
        })) => {
            tracing::info!(job = id, steps, trained_tokens, "training completed");
            // No upload once the job is no longer this worker's (cancelled, or its lease lost).
            // The result keys are this claim's own, so a worker that loses its lease during
            // the upload writes only objects that the success row, refused to it, never names.
            if !matches!(ctx.rt.block_on(store.renew_lease(&lease, ctx.claimant.lease)), Ok(true)) {
                tracing::warn!(job = id, "lease lost (or the database unreachable) before the results were uploaded: not recording them; the job is taken over once its lease expires");
                return Ended::Normally;
            }
            if let Err(e) = finish(ctx, job, &inputs.spec, &adapter_dir, trained_tokens) {
                let message = format!("could not register the results: {e:#}");
                let code = if is_disk_full(&message) { "disk_full" } else { "internal_error" };
                return fail(JobError::new(code, message.replace(&data_dir, "<data dir>"), None));
            }
        }
        Ok(Ok(Outcome::Suspended { step, .. })) => requeue(
            ctx,
            &lease,
            &format!("Job suspended at step {step} for a server shutdown; it will resume from this checkpoint"),
        ),
        Ok(Ok(Outcome::Cancelled { step })) => {
            tracing::info!(job = id, step, "training cancelled");
        }
        Ok(Err(_)) | Err(_) if control.is_cancelled() => {}
        Ok(Err(_)) if control.is_suspended() => requeue(ctx, &lease, "Job suspended for a server shutdown"),
        Ok(Err(e)) => {
            let message = user_message(&format!("{e:#}"), job, &train_job, store.data_dir());
            return if is_disk_full(&message) {
                fail(JobError::new(
                    "disk_full",
                    format!("The disk holding the data directory is full: {message}. Nothing partial was kept; free space, then create the job again."),
                    None,
                ))
            } else {
                fail(JobError::new("training_failed", message, None))
            };
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return fail(JobError::new("internal_error", format!("the trainer crashed: {what}"), None));
        }
    }
    Ended::Normally
}

/// The `code` of errors that come from the artifact storage being unreachable.
const STORAGE_UNAVAILABLE: &str = "storage_unavailable";

/// A run stopped because the artifact storage is down: requeued (from its last stored
/// checkpoint, on any worker) as an interruption, so `SFTD_MAX_ATTEMPTS` caps the retries; past
/// them the job fails with `storage_unavailable`.
fn storage_down(ctx: &Ctx, lease: &Lease, reason: &str) -> Ended {
    let store = &ctx.store;
    let id = lease.job_id.as_str();
    let times = ctx.rt.block_on(store.interruptions(id)).unwrap_or(0) + 1;
    let written = if times <= i64::from(ctx.max_attempts) {
        tracing::warn!(
            job = id,
            times,
            reason,
            "artifact storage down: requeueing the job"
        );
        let message = format!(
            "The artifact storage is unavailable ({reason}); the job was requeued and resumes \
             from its last stored checkpoint"
        );
        ctx.rt
            .block_on(store.requeue_held_interrupted(lease, &message))
    } else {
        let message = format!(
            "The artifact storage stayed unavailable ({reason}); the job was requeued {} times \
             (SFTD_MAX_ATTEMPTS) and is not retried again; create it again once the storage is back",
            ctx.max_attempts
        );
        let err = JobError::new(STORAGE_UNAVAILABLE, message, None);
        ctx.rt.block_on(store.fail_running(lease, &err))
    };
    match written {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            job = id,
            "the job was cancelled or its lease lost meanwhile"
        ),
        Err(e) => tracing::error!(job = id, error = %e, "could not record the storage failure"),
    }
    Ended::StorageDown
}

/// Whether an error message (with its causes) reports ENOSPC.
fn is_disk_full(message: &str) -> bool {
    message.contains("os error 28") || message.contains("No space left on device")
}

/// The engine's error with the server's paths replaced by what the user knows: file ids, and
/// `<data dir>` for the rest.
fn user_message(message: &str, job: &JobRow, train: &engine::TrainJob, data_dir: &Path) -> String {
    let mut m = message.replace(&*train.training_file.to_string_lossy(), &job.training_file);
    if let (Some(path), Some(id)) = (&train.validation_file, &job.validation_file) {
        m = m.replace(&*path.to_string_lossy(), id);
    }
    if let (Some(path), Some(id)) = (&train.tool_eval_file, &job_tool_eval_file(job)) {
        m = m.replace(&*path.to_string_lossy(), id);
    }
    m.replace(&*data_dir.to_string_lossy(), "<data dir>")
}

/// The `tool_eval_file` id a job was created with.
fn job_tool_eval_file(job: &JobRow) -> Option<String> {
    serde_json::from_str::<JobSpec>(&job.spec)
        .ok()
        .and_then(|s| s.tool_eval_file)
}

fn requeue(ctx: &Ctx, lease: &Lease, message: &str) {
    let id = lease.job_id.as_str();
    match ctx.rt.block_on(ctx.store.requeue(lease, message)) {
        Ok(true) => tracing::info!(job = id, "job requeued"),
        Ok(false) => {}
        Err(e) => tracing::error!(job = id, error = %e, "could not requeue"),
    }
}

/// Registers the adapter files and the metrics CSV as result files and marks the job succeeded.
fn finish(
    ctx: &Ctx,
    job: &JobRow,
    spec: &JobSpec,
    adapter_dir: &Path,
    trained_tokens: u64,
) -> anyhow::Result<()> {
    let store = &ctx.store;
    let metrics = ctx.rt.block_on(store.metrics_events(&job.id))?;
    let csv_path = job_dir(store, &job.id).join("metrics.csv");
    durable::write_file(&csv_path, metrics_csv(&metrics).as_bytes())?;
    let files = [
        adapter_dir.join(checkpoint::ADAPTER_WEIGHTS),
        adapter_dir.join(checkpoint::ADAPTER_CONFIG),
        csv_path,
    ];
    let lease = job.lease();
    let published = ctx
        .rt
        .block_on(artifacts::publish_results(&ctx.storage, &lease, &files))?;
    // The trainer's staging directory, now empty.
    let _ = std::fs::remove_dir(adapter_dir);
    crate::fault::pause("results_published");
    let results = published
        .into_iter()
        .map(|(key, bytes)| NewFile {
            id: new_id("file"),
            filename: key.rsplit('/').next().unwrap_or_default().to_string(),
            purpose: PURPOSE_RESULTS.into(),
            bytes: bytes as i64,
            path: key,
            rows: None,
            job_id: Some(job.id.clone()),
        })
        .collect::<Vec<_>>();
    let name = fine_tuned_model_name(&job.model, spec.suffix.as_deref(), &job.id);
    let succeeded =
        ctx.rt
            .block_on(store.succeed_job(&lease, trained_tokens as i64, &name, &results))?;
    if !succeeded {
        tracing::warn!(job = %job.id, "success refused (lease lost): deleting this claim's result files");
        let keys: Vec<&str> = results.iter().map(|f| f.path.as_str()).collect();
        ctx.rt
            .block_on(artifacts::withdraw_results(&ctx.storage, &keys));
    }
    Ok(())
}

/// OpenAI-style `ft:<base>:<suffix>:<job id>`; accepted back as `init_adapter`.
pub fn fine_tuned_model_name(model: &str, suffix: Option<&str>, job_id: &str) -> String {
    format!("ft:{model}:{}:{job_id}", suffix.unwrap_or("sftd"))
}

const CSV_COLUMNS: [&str; 13] = [
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "tool_name_accuracy",
    "tool_args_exact",
    "tool_json_valid",
    "no_call_accuracy",
    "tool_args_valid",
];

/// One row per step, merging a step's training and validation metrics.
pub fn metrics_csv(events: &[crate::store::EventRow]) -> String {
    let mut rows: BTreeMap<i64, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    for e in events {
        let (Some(step), Some(data)) = (e.step, e.data.as_deref()) else {
            continue;
        };
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(data) {
            rows.entry(step).or_default().extend(m);
        }
    }
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for (step, m) in rows {
        let cells: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| match (*c, m.get(*c)) {
                ("step", _) => step.to_string(),
                (_, Some(v)) if !v.is_null() => v.to_string(),
                _ => String::new(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventRow;

    fn ev(seq: i64, step: i64, data: serde_json::Value) -> EventRow {
        EventRow {
            job_id: "j".into(),
            seq,
            created_at: 0,
            level: "info".into(),
            kind: "metrics".into(),
            message: String::new(),
            data: Some(data.to_string()),
            step: Some(step),
        }
    }

    #[test]
    fn metrics_csv_merges_train_and_eval_rows_by_step() {
        let csv = metrics_csv(&[
            ev(
                1,
                1,
                serde_json::json!({"step": 1, "train_loss": 2.5, "learning_rate": 0.1, "grad_norm": 1.0, "train_mean_token_accuracy": 0.25, "num_tokens": 10}),
            ),
            ev(
                2,
                2,
                serde_json::json!({"step": 2, "train_loss": 2.0, "learning_rate": 0.1, "grad_norm": 0.5, "train_mean_token_accuracy": 0.5, "num_tokens": 20}),
            ),
            ev(
                3,
                2,
                serde_json::json!({"step": 2, "valid_loss": 2.2, "valid_mean_token_accuracy": 0.4}),
            ),
            ev(
                4,
                2,
                serde_json::json!({"step": 2, "tool_eval_examples": 4, "tool_name_accuracy": 0.5, "tool_args_exact": 0.25, "tool_json_valid": 0.75, "no_call_accuracy": null, "tool_args_valid": 0.5}),
            ),
        ]);
        assert_eq!(
            csv,
            "step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,learning_rate,grad_norm,num_tokens,tool_name_accuracy,tool_args_exact,tool_json_valid,no_call_accuracy,tool_args_valid\n\
             1,2.5,0.25,,,0.1,1.0,10,,,,,\n\
             2,2.0,0.5,2.2,0.4,0.1,0.5,20,0.5,0.25,0.75,,0.5\n"
        );
    }
}
