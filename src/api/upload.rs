//! Receiving `POST /v1/files` with bounded memory: the request body is metered against the
//! upload limit, the `file` field streams to a temporary file under the data dir while a
//! blocking thread validates it line by line, and a request refused before its body was read
//! has the rest of its body read and discarded (up to a bound) first, so the client gets the
//! error response instead of a connection reset.

use super::error::AppError;
use crate::store::{new_id, Store};
use crate::train::data::{DatasetSummary, InvalidDataset, JsonlValidator};
use axum::body::{Body, Bytes};
use axum::extract::multipart::Field;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Multipart framing allowance on top of the file itself.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Longest accepted `purpose` field.
const MAX_PURPOSE_BYTES: usize = 1024;
/// How much of a refused body is read and discarded so the response reaches the client; past
/// this, or after `DRAIN_TIME`, the connection is closed on whatever the client is still sending.
const DRAIN_BYTES: u64 = 1 << 30;
const DRAIN_TIME: Duration = Duration::from_secs(60);
/// Chunks in flight between the socket and the writer thread.
const CHANNEL_CHUNKS: usize = 16;
/// The writer thread's buffer.
const WRITE_BUFFER: usize = 1 << 20;

/// A received, valid upload: its bytes are in a temporary file under the data dir.
pub(super) struct Upload {
    pub tmp: TempPath,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    pub rows: usize,
}

/// Reads the multipart request into a validated temporary file. On refusal the returned
/// response is complete: the body has been drained, or the connection will close.
pub(super) async fn receive(store: &Store, req: Request, max: u64) -> Result<Upload, Response> {
    let (parts, body) = req.into_parts();
    let body_limit = max.saturating_add(MULTIPART_OVERHEAD);
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > body_limit) {
        let refusal = AppError::too_large(max).param("file");
        // A client waiting for `100 Continue` never sends the body: nothing to drain.
        if expects_continue(&parts.headers) {
            return Err(closing(refusal.into_response()));
        }
        let (body, meter) = Meter::start(body, 0);
        drop(body);
        return Err(refuse(refusal, meter.finish().await));
    }
    let (body, meter) = Meter::start(body, body_limit);
    match read_form(store, Request::from_parts(parts, body), max).await {
        Ok(upload) => Ok(upload),
        Err(e) => {
            let drained = meter.finish().await;
            let e = if drained.too_large {
                AppError::too_large(max).param("file")
            } else {
                e
            };
            Err(refuse(e, drained))
        }
    }
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// The error response; `Connection: close` when the body could not be read to its end.
fn refuse(e: AppError, drained: Drained) -> Response {
    let resp = e.into_response();
    if drained.complete {
        resp
    } else {
        closing(resp)
    }
}

fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn read_form(store: &Store, req: Request, max: u64) -> Result<Upload, AppError> {
    let mut multipart = Multipart::from_request(req, &()).await?;
    let mut purpose = None;
    let mut file: Option<(TempPath, String, u64, DatasetSummary)> = None;
    while let Some(field) = multipart.next_field().await? {
        match field.name() {
            Some("purpose") => purpose = Some(small_text(field, "purpose").await?),
            Some("file") if file.is_some() => {
                return Err(
                    AppError::bad_request("more than one `file` field; send one").param("file"),
                )
            }
            Some("file") => file = Some(stream_file(store, field, max).await?),
            // Other fields are skipped unread.
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        AppError::bad_request("missing form field `purpose` (use \"fine-tune\")").param("purpose")
    })?;
    if purpose != crate::store::files::PURPOSE_FINE_TUNE {
        return Err(AppError::bad_request(format!(
            "purpose must be \"fine-tune\", got {purpose:?}"
        ))
        .param("purpose"));
    }
    let (tmp, filename, bytes, summary) =
        file.ok_or_else(|| AppError::bad_request("missing form field `file`").param("file"))?;
    Ok(Upload {
        tmp,
        filename,
        purpose,
        bytes,
        rows: summary.rows,
    })
}

/// A short text field, refused past `MAX_PURPOSE_BYTES`.
async fn small_text(mut field: Field<'_>, name: &str) -> Result<String, AppError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_PURPOSE_BYTES {
            return Err(AppError::bad_request(format!(
                "form field `{name}` is longer than {MAX_PURPOSE_BYTES} bytes"
            ))
            .param(name));
        }
    }
    String::from_utf8(bytes)
        .map_err(|_| AppError::bad_request(format!("form field `{name}` is not UTF-8")).param(name))
}

/// Streams the field to a temporary file through the writer thread; returns it once the whole
/// field has been received and found valid.
async fn stream_file(
    store: &Store,
    mut field: Field<'_>,
    max: u64,
) -> Result<(TempPath, String, u64, DatasetSummary), AppError> {
    let filename = clean_filename(field.file_name());
    let tmp = TempPath(store.data_dir().join("tmp").join(new_id("upload")));
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let path = tmp.0.clone();
    let writer = tokio::task::spawn_blocking(move || write_and_validate(&path, rx));
    let mut bytes = 0u64;
    let mut refused = None;
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                bytes += chunk.len() as u64;
                if bytes > max {
                    refused = Some(AppError::too_large(max).param("file"));
                    break;
                }
                // A closed channel means the writer stopped on an error, which it returns.
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                refused = Some(e.into());
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(AppError::internal)?;
    if let Some(e) = refused {
        return Err(e);
    }
    match written.map_err(AppError::disk_write)? {
        Ok(summary) => Ok((tmp, filename, bytes, summary)),
        Err(invalid) => Err(invalid_dataset(&invalid)),
    }
}

/// The writer thread: validates every chunk and writes it to `path` until the file is known to
/// be invalid (it will be removed; validation goes on so that every bad line is reported).
/// The file is flushed to stable storage before the verdict.
fn write_and_validate(
    path: &Path,
    mut chunks: mpsc::Receiver<Bytes>,
) -> io::Result<Result<DatasetSummary, InvalidDataset>> {
    let file = std::fs::File::create(path)?;
    let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut validator = JsonlValidator::new();
    while let Some(chunk) = chunks.blocking_recv() {
        validator.push(&chunk);
        if validator.errors_so_far() == 0 {
            out.write_all(&chunk)?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    let verdict = validator.finish();
    if verdict.is_ok() {
        file.sync_all()?;
    }
    Ok(verdict)
}

fn invalid_dataset(invalid: &InvalidDataset) -> AppError {
    let details: Vec<_> = invalid
        .errors
        .iter()
        .map(|r| serde_json::json!({"line": r.line, "code": r.code, "message": r.message}))
        .collect();
    let first = invalid
        .errors
        .first()
        .map(|r| format!("; line {}: {}", r.line, r.message))
        .unwrap_or_default();
    let listed = if invalid.total > details.len() {
        format!(" (the first {} are listed)", details.len())
    } else {
        String::new()
    };
    AppError::bad_request(format!(
        "the file is not a valid fine-tuning dataset: {} bad line(s){listed}{first}",
        invalid.total
    ))
    .param("file")
    .code("invalid_file")
    .details(serde_json::Value::Array(details))
}

/// Removes a temporary upload unless it was moved into place.
pub(super) struct TempPath(pub PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// How reading the request body ended.
#[derive(Debug, Clone, Copy)]
struct Drained {
    /// The body went past the limit.
    too_large: bool,
    /// The body was read to its end (the connection can carry the response and stay open).
    complete: bool,
}

/// Pumps the request body to the multipart parser while it stays under the limit; once over
/// it, or once the parser is gone, reads and discards the rest (within `DRAIN_BYTES` and
/// `DRAIN_TIME`) so that the client, which is still sending, can read the response.
struct Meter {
    task: tokio::task::JoinHandle<Drained>,
}

impl Meter {
    /// The body the parser reads, and the meter to wait on before refusing the request.
    fn start(body: Body, limit: u64) -> (Body, Meter) {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
        let task = tokio::spawn(async move {
            let mut frames = body.into_data_stream();
            let mut seen = 0u64;
            let mut too_large = false;
            let mut forwarding = true;
            let mut discarded = 0u64;
            let mut deadline = tokio::time::Instant::now() + DRAIN_TIME;
            loop {
                let next = if forwarding {
                    frames.next().await
                } else {
                    match tokio::time::timeout_at(deadline, frames.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            return Drained {
                                too_large,
                                complete: false,
                            }
                        }
                    }
                };
                let chunk = match next {
                    None => {
                        return Drained {
                            too_large,
                            complete: true,
                        }
                    }
                    Some(Err(e)) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return Drained {
                            too_large,
                            complete: false,
                        };
                    }
                    Some(Ok(chunk)) => chunk,
                };
                seen += chunk.len() as u64;
                if !forwarding {
                    discarded += chunk.len() as u64;
                    if discarded > DRAIN_BYTES {
                        return Drained {
                            too_large,
                            complete: false,
                        };
                    }
                    continue;
                }
                let sent = if seen > limit {
                    too_large = true;
                    let _ = tx
                        .send(Err(io::Error::other("the request body exceeds the limit")))
                        .await;
                    false
                } else {
                    tx.send(Ok(chunk)).await.is_ok()
                };
                if !sent {
                    forwarding = false;
                    deadline = tokio::time::Instant::now() + DRAIN_TIME;
                }
            }
        });
        let stream = OneAtATime { rx, yielded: false };
        (Body::from_stream(stream), Meter { task })
    }

    /// Waits until the body has been drained (or given up on).
    async fn finish(self) -> Drained {
        self.task.await.unwrap_or(Drained {
            too_large: false,
            complete: false,
        })
    }
}

/// The forwarded chunks, one per poll: after each it answers `Pending` once (waking itself at
/// once). The multipart parser appends everything a stream has ready to one buffer, so without
/// this pause a fast client fills that buffer with as much as the socket delivers; with it the
/// parser holds one chunk at a time.
struct OneAtATime {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    yielded: bool,
}

impl futures::Stream for OneAtATime {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.yielded {
            self.yielded = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let next = self.rx.poll_recv(cx);
        self.yielded = matches!(next, std::task::Poll::Ready(Some(_)));
        next
    }
}

/// The client's file name reduced to its last path component, without control characters or
/// quotes (it ends up in a `Content-Disposition` header), at most 255 characters.
pub(super) fn clean_filename(name: Option<&str>) -> String {
    let base = name
        .unwrap_or_default()
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default();
    let clean: String = base
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '"' | ';'))
        .take(255)
        .collect();
    if clean.trim().is_empty() {
        "upload.jsonl".into()
    } else {
        clean
    }
}
