//! Accepting and cancelling jobs: every check that can be answered before anything is stored,
//! then the insert, then the asynchronous `validating_files → queued` step.

use super::{run, Worker};
use crate::hub::{HubError, ModelRef};
use crate::store::files::PURPOSE_FINE_TUNE;
use crate::store::jobs::{Created, JobError, NewJob};
use crate::store::{new_id, JobRow, StoreError};
use crate::train::device::DeviceInfo;
use crate::train::device_from_str;
use crate::train::memory::{self, InsufficientMemory, ModelDims, Recipe, Target};
use crate::train::spec::{JobSpec, TrainConfig, DEMO_MODEL};
use std::path::Path;

/// Why a job was not accepted; `param` names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{message}")]
    Invalid {
        param: String,
        code: &'static str,
        message: String,
    },
    /// The `model` cannot be used (or the hub cannot say whether it can).
    #[error(transparent)]
    Model(HubError),
    #[error("Idempotency-Key {0:?} was already used with a different request body")]
    IdempotencyConflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> SubmitError {
    SubmitError::Invalid {
        param: param.into(),
        code,
        message: message.into(),
    }
}

impl Worker {
    /// Checks `spec` completely, stores the job (or returns the one stored under the same
    /// idempotency key, with `true`), and starts its validation.
    pub async fn submit(
        &self,
        spec: JobSpec,
        idempotency_key: Option<String>,
    ) -> Result<(JobRow, bool), SubmitError> {
        let config = spec.resolve().map_err(|e| SubmitError::Invalid {
            param: e.param,
            code: "invalid_hyperparameter",
            message: e.message,
        })?;
        if let Some(device) = self.memory.as_ref().map(|m| &m.info) {
            config.precision.resolve(device).map_err(|e| {
                invalid(
                    "method.supervised.hyperparameters.precision",
                    "unsupported_precision",
                    e.to_string(),
                )
            })?;
        }
        self.check_dataset(&spec.training_file, "training_file")
            .await?;
        if let Some(v) = &spec.validation_file {
            self.check_dataset(v, "validation_file").await?;
        }
        if let Some(v) = &spec.tool_eval_file {
            self.check_dataset(v, "tool_eval_file").await?;
        }
        let model = self
            .hub
            .check(&spec.model)
            .await
            .map_err(SubmitError::Model)?;
        let estimate = self.estimate_memory(&model, &config).await?;
        if let Some(a) = &spec.init_adapter {
            run::init_adapter_dir(&self.store, &self.hub, a)
                .await
                .map_err(|e| invalid("init_adapter", "invalid_init_adapter", e.message))?;
        }
        let spec_text = serde_json::to_string(&spec).expect("a JobSpec serializes. This is a bug.");
        let new = NewJob {
            id: new_id("ftjob"),
            model: spec.model.clone(),
            training_file: spec.training_file.clone(),
            validation_file: spec.validation_file.clone(),
            spec: spec_text.clone(),
            config: serde_json::to_string(&config)
                .expect("a TrainConfig serializes. This is a bug."),
            seed: config.seed as i64,
            suffix: spec.suffix.clone(),
            metadata: spec
                .metadata
                .as_ref()
                .map(|m| serde_json::to_string(m).expect("a map serializes. This is a bug.")),
            idempotency_key: idempotency_key.clone(),
        };
        match self.store.create_job(&new).await? {
            Created::New(mut row) => {
                tracing::info!(job = %row.id, model = %row.model, "job created");
                if let Some(bytes) = estimate {
                    row = self
                        .store
                        .set_estimated_memory(&row.id, bytes)
                        .await?
                        .unwrap_or(row);
                }
                self.validate(row.clone());
                Ok((row, false))
            }
            Created::Existing(row) if row.spec == spec_text => Ok((row, true)),
            Created::Existing(_) => Err(SubmitError::IdempotencyConflict(
                idempotency_key.unwrap_or_default(),
            )),
        }
    }

    /// The job's peak memory on the worker's device when the model's config is at hand (the
    /// demo model, a local directory); a hub model is estimated once the worker has fetched it.
    async fn estimate_memory(
        &self,
        model: &ModelRef,
        config: &TrainConfig,
    ) -> Result<Option<u64>, SubmitError> {
        let Some(budget) = &self.memory else {
            return Ok(None);
        };
        let dir = match model {
            ModelRef::Demo => self
                .hub
                .resolve(DEMO_MODEL)
                .await
                .map_err(|e| invalid("model", "invalid_model", e.to_string()))?,
            ModelRef::Local(dir) => dir.clone(),
            ModelRef::Hub(_) => return Ok(None),
        };
        budget
            .check(&dir, config)
            .map_err(|e| invalid(MEMORY_PARAM, "insufficient_memory", e.message()))
    }

    async fn check_dataset(&self, id: &str, param: &str) -> Result<(), SubmitError> {
        let Some(file) = self.store.get_file(id).await? else {
            return Err(invalid(
                param,
                "file_not_found",
                format!("{param} {id:?} does not exist; upload it with POST /v1/files first"),
            ));
        };
        if file.purpose != PURPOSE_FINE_TUNE {
            return Err(invalid(
                param,
                "invalid_file",
                format!("{param} {id:?} has purpose {:?}; upload the dataset with purpose \"fine-tune\"", file.purpose),
            ));
        }
        Ok(())
    }

    /// Cancels a job that has not finished. `None`: no such job; `Some(Err(row))`: it had
    /// already finished (returned unchanged).
    pub async fn cancel_job(&self, id: &str) -> Result<Option<Result<JobRow, JobRow>>, StoreError> {
        match self.store.cancel_job(id).await? {
            Some(row) => {
                self.cancel(id);
                Ok(Some(Ok(row)))
            }
            None => Ok(self.store.get_job(id).await?.map(Err)),
        }
    }
}

/// Where a memory error points: the recipe's knobs.
pub(super) const MEMORY_PARAM: &str = "method.supervised.hyperparameters";

/// The device jobs are checked against, probed once when the worker starts (so a job is judged
/// against the memory it will have when it runs, not what a running job leaves free).
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    pub info: DeviceInfo,
    cuda: bool,
}

impl MemoryBudget {
    /// `None` when the device cannot be opened (the worker reports that itself).
    pub fn probe(device: &str) -> Option<Self> {
        let d = device_from_str(device).ok()?;
        let info = DeviceInfo::probe(&d).ok()?;
        Some(Self {
            info,
            cuda: d.is_cuda(),
        })
    }

    /// Estimates a job on this device. `Ok(None)`: the model's config cannot be read (loading
    /// the model reports that).
    pub fn check(
        &self,
        model_dir: &Path,
        config: &TrainConfig,
    ) -> Result<Option<u64>, InsufficientMemory> {
        let Ok(dims) = ModelDims::from_dir(model_dir) else {
            return Ok(None);
        };
        let recipe = Recipe::from_config(config);
        // A precision this device cannot honour is rejected before the estimate is asked for.
        let Ok(precision) = config.precision.resolve(&self.info) else {
            return Ok(None);
        };
        let target = Target {
            cuda: self.cuda,
            weight_dtype: precision.base_dtype,
        };
        let e = memory::check(
            &dims,
            &recipe,
            target,
            &self.info.id,
            self.info.available_memory_bytes,
        )?;
        Ok(Some(e.estimated_peak_memory_bytes))
    }
}

/// The validation-time check (the model is resolved by now, hub models included): the same
/// estimate and message as at creation, as the job's error.
pub(super) fn memory_estimate(
    budget: Option<&MemoryBudget>,
    model_dir: &Path,
    config: &TrainConfig,
) -> Result<Option<u64>, JobError> {
    let Some(budget) = budget else {
        return Ok(None);
    };
    budget
        .check(model_dir, config)
        .map_err(|e| JobError::new("insufficient_memory", e.message(), Some(MEMORY_PARAM)))
}
