//! `GET /v1/fine_tuning/jobs/{job_id}/chat_presets`: example prompts with their tool schemas from
//! the job's validation file (or its training file without one), one per distinct tool set, for
//! the dashboard's playground to offer.

use super::error::{AppError, AppPath};
use super::jobs::no_such_job;
use super::types::List;
use super::AppState;
use crate::train::data::{parse_jsonl, Row};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashSet;
use std::io::Read;

/// Presets returned at most.
const MAX_PRESETS: usize = 20;
/// Bytes of the data file read (whole lines only): the presets come from its start.
const MAX_READ: u64 = 4 << 20;

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/fine_tuning/jobs/{job_id}/chat_presets",
        get(chat_presets),
    )
}

#[derive(Serialize)]
pub struct ChatPreset {
    /// `<file id>:<line>`.
    id: String,
    object: &'static str,
    /// `validation_file` or `training_file`.
    source: &'static str,
    line: usize,
    /// The row's messages before its first assistant turn.
    messages: Vec<Value>,
    /// The row's tool schemas (OpenAI `tools`); empty when it has none.
    tools: Vec<Value>,
}

async fn chat_presets(
    State(s): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<List<ChatPreset>>, AppError> {
    let job = s
        .store
        .get_job(&id)
        .await?
        .ok_or_else(|| no_such_job(&id))?;
    let (source, file_id) = match job.validation_file {
        Some(v) => ("validation_file", v),
        None => ("training_file", job.training_file),
    };
    let gone = || AppError::not_found(format!("the job's {source} {file_id:?} no longer exists"));
    let file = s.store.get_file(&file_id).await?.ok_or_else(gone)?;
    let path = s.store.file_path(&file);
    let fid = file_id.clone();
    let presets = tokio::task::spawn_blocking(move || read_presets(&path, source, &fid))
        .await
        .map_err(AppError::internal)?
        .map_err(|_| gone())?;
    let n = presets.len() as i64;
    Ok(Json(List::page(presets, n, |p| p.id.clone())))
}

/// One preset per distinct tool set (rows without tools count as one set), in file order.
fn read_presets(
    path: &std::path::Path,
    source: &'static str,
    file_id: &str,
) -> std::io::Result<Vec<ChatPreset>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_READ)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 == MAX_READ {
        let end = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        bytes.truncate(end);
    }
    // A file that became invalid still offers its valid rows: errors are skipped.
    let rows = match parse_jsonl(&bytes) {
        Ok(rows) => rows,
        Err(_) => bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .filter_map(|(i, l)| parse_jsonl(l).ok()?.pop().map(|(_, r)| (i + 1, r)))
            .collect(),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, row) in rows {
        let Row::Chat { messages, tools } = row else {
            continue;
        };
        let tools = tools.unwrap_or_default();
        if !seen.insert(serde_json::to_string(&tools).unwrap_or_default()) {
            continue;
        }
        let turn = messages
            .iter()
            .position(|m| m["role"] == "assistant")
            .unwrap_or(messages.len());
        if turn == 0 {
            continue;
        }
        out.push(ChatPreset {
            id: format!("{file_id}:{line}"),
            object: "chat.preset",
            source,
            line,
            messages: messages[..turn].to_vec(),
            tools,
        });
        if out.len() == MAX_PRESETS {
            break;
        }
    }
    Ok(out)
}
