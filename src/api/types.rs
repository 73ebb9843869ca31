//! Request and response bodies of the API (OpenAI's shapes), and their conversion from rows.

use crate::store::checkpoints::CheckpointRow;
use crate::store::files::FileRow;
use crate::store::{EventRow, JobRow};
use crate::train::spec::TrainConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    /// OpenAI's deprecated upload status; always `processed` (files are validated on upload).
    pub status: &'static str,
    /// Number of examples in an uploaded dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
}

impl From<FileRow> for FileObject {
    fn from(f: FileRow) -> Self {
        Self {
            id: f.id,
            object: "file",
            bytes: f.bytes,
            created_at: f.created_at,
            filename: f.filename,
            purpose: f.purpose,
            status: "processed",
            rows: f.rows,
        }
    }
}

#[derive(Serialize)]
pub struct DeletedObject {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

#[derive(Serialize)]
pub struct JobErrorObject {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Serialize)]
pub struct JobObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub estimated_finish: Option<i64>,
    pub model: String,
    pub fine_tuned_model: Option<String>,
    pub organization_id: &'static str,
    pub status: &'static str,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// sftd extension: the file the tool-call evaluation reads instead of `validation_file`.
    pub tool_eval_file: Option<String>,
    /// The resolved recipe (every knob), plus OpenAI's `learning_rate_multiplier`.
    pub hyperparameters: Value,
    pub method: Value,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<i64>,
    pub error: Option<JobErrorObject>,
    pub seed: i64,
    pub suffix: Option<String>,
    pub user_provided_suffix: Option<String>,
    pub metadata: Option<Value>,
    pub integrations: Vec<Value>,
    pub init_adapter: Option<String>,
    /// sftd extension: the estimated peak memory of the run on the worker's device, in bytes.
    pub estimated_peak_memory_bytes: Option<i64>,
}

impl JobObject {
    pub fn from_row(j: JobRow, result_files: Vec<String>) -> Self {
        let config: Option<TrainConfig> = serde_json::from_str(&j.config).ok();
        let mut hp = serde_json::to_value(&config).unwrap_or(Value::Null);
        if let (Value::Object(m), Some(c)) = (&mut hp, &config) {
            m.remove("seed");
            let default_lr = TrainConfig::default().learning_rate;
            m.insert(
                "learning_rate_multiplier".into(),
                json!(c.learning_rate / default_lr),
            );
        }
        let spec: Value = serde_json::from_str(&j.spec).unwrap_or(Value::Null);
        let error = j.error_message.map(|message| JobErrorObject {
            code: j.error_code.unwrap_or_default(),
            message,
            param: j.error_param,
        });
        Self {
            object: "fine_tuning.job",
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            estimated_finish: j.estimated_finish,
            model: j.model,
            fine_tuned_model: j.fine_tuned_model,
            organization_id: "sftd",
            status: j.status.as_str(),
            training_file: j.training_file,
            validation_file: j.validation_file,
            tool_eval_file: spec
                .get("tool_eval_file")
                .and_then(|v| v.as_str())
                .map(String::from),
            method: json!({"type": "supervised", "supervised": {"hyperparameters": hp}}),
            hyperparameters: hp,
            result_files,
            trained_tokens: j.trained_tokens,
            error,
            seed: j.seed,
            user_provided_suffix: j.suffix.clone(),
            suffix: j.suffix,
            metadata: j.metadata.and_then(|m| serde_json::from_str(&m).ok()),
            integrations: vec![],
            init_adapter: spec
                .get("init_adapter")
                .and_then(|v| v.as_str())
                .map(String::from),
            estimated_peak_memory_bytes: j.estimated_peak_memory_bytes,
            id: j.id,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EventObject {
    pub id: String,
    pub object: String,
    /// Position in the job's event log (1, 2, 3, …); the SSE `id`.
    pub seq: i64,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Option<Value>,
}

impl From<&EventRow> for EventObject {
    fn from(e: &EventRow) -> Self {
        Self {
            id: event_id(&e.job_id, e.seq),
            object: "fine_tuning.job.event".into(),
            seq: e.seq,
            created_at: e.created_at,
            level: e.level.clone(),
            message: e.message.clone(),
            kind: e.kind.clone(),
            data: e.data.as_deref().and_then(|d| serde_json::from_str(d).ok()),
        }
    }
}

/// `ftevent-<job hex>-<seq>`: unique across jobs, and its tail is the `seq`.
pub fn event_id(job_id: &str, seq: i64) -> String {
    let job = job_id.strip_prefix("ftjob-").unwrap_or(job_id);
    format!("ftevent-{job}-{seq}")
}

/// An `after` cursor for events: a `seq` or an event id.
pub fn parse_event_cursor(s: &str) -> Option<i64> {
    let tail = s.rsplit('-').next().unwrap_or(s);
    tail.trim().parse().ok().filter(|n: &i64| *n >= 0)
}

#[derive(Serialize)]
pub struct CheckpointObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: i64,
    pub metrics: Value,
}

impl CheckpointObject {
    pub fn from_row(c: CheckpointRow, fine_tuned_model: &str) -> Self {
        Self {
            object: "fine_tuning.job.checkpoint",
            created_at: c.created_at,
            fine_tuned_model_checkpoint: format!("{fine_tuned_model}:ckpt-step-{}", c.step),
            fine_tuning_job_id: c.job_id,
            step_number: c.step,
            metrics: serde_json::from_str(&c.metrics).unwrap_or(Value::Null),
            id: c.id,
        }
    }
}

/// OpenAI's list envelope.
#[derive(Serialize)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

impl<T> List<T> {
    /// `items` was fetched with `limit + 1` rows so `has_more` needs no second query.
    pub fn page(mut items: Vec<T>, limit: i64, id: impl Fn(&T) -> String) -> Self {
        let has_more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        Self {
            object: "list",
            first_id: items.first().map(&id),
            last_id: items.last().map(&id),
            has_more,
            data: items,
        }
    }
}

/// `?after=&limit=` of list routes.
#[derive(Deserialize, Default)]
pub struct Pagination {
    pub after: Option<String>,
    pub limit: Option<i64>,
}

impl Pagination {
    /// The page size: see [`page_limit`].
    pub fn limit(&self, max: i64) -> Result<i64, super::error::AppError> {
        page_limit(self.limit, max)
    }
}

/// A list route's `?limit=`: 20 by default, between 1 and `max`.
pub fn page_limit(limit: Option<i64>, max: i64) -> Result<i64, super::error::AppError> {
    match limit.unwrap_or(20) {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(super::error::AppError::bad_request(format!(
            "limit must be between 1 and {max}, got {n}"
        ))
        .param("limit")),
    }
}

#[derive(Deserialize, Default)]
pub struct FileListQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
    pub purpose: Option<String>,
    /// `asc` or `desc` (default) by creation time.
    pub order: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct EventsQuery {
    pub after: Option<String>,
    pub limit: Option<i64>,
    /// Stream as SSE (same as `Accept: text/event-stream`).
    pub stream: Option<bool>,
    /// The API key, for EventSource clients that cannot send headers (checked by auth).
    #[allow(dead_code)]
    pub access_token: Option<String>,
}
