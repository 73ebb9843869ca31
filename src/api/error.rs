//! The one API error type: every failure becomes OpenAI's `{"error":{message,type,param,code}}`
//! with the right status. Internal details are logged, never returned.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Boxed so `Result<_, AppError>` stays small.
#[derive(Debug)]
pub struct AppError(Box<ErrorBody>);

#[derive(Debug)]
pub struct ErrorBody {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Extra structured detail (the bad lines of a rejected upload).
    pub details: Option<serde_json::Value>,
    /// Seconds for a `Retry-After` header (a retryable 503).
    pub retry_after: Option<u64>,
}

impl AppError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody {
            status,
            message: message.into(),
            param: None,
            code: None,
            details: None,
            retry_after: None,
        }))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the upload exceeds the limit of {limit} bytes (SFTD_MAX_UPLOAD_BYTES)"),
        )
        .code("file_too_large")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or incorrect API key: send `Authorization: Bearer <SFTD_API_KEY>` or `X-Api-Key: <SFTD_API_KEY>`",
        )
        .code("invalid_api_key")
    }

    /// A failure that is not the client's: logged here, reported as a bare 500.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error; see the server log",
        )
    }

    /// A failed write of the server's own files. A full disk is the operator's to fix and worth
    /// a retry later: 507, not a bare 500.
    pub fn disk_write(e: std::io::Error) -> Self {
        const ENOSPC: i32 = 28;
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(ENOSPC) {
            tracing::warn!(error = %e, "a write did not fit on the data directory's disk");
            AppError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "the server's disk is full; the upload was not stored (free space in the data \
                 directory and retry)",
            )
            .code("insufficient_storage")
        } else {
            AppError::internal(e)
        }
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.0.param = Some(param.into());
        self
    }

    /// The request parameter the error names, for tests that check it without a response.
    #[cfg(test)]
    pub fn param_name(&self) -> Option<&str> {
        self.0.param.as_deref()
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.0.code = Some(code.into());
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.0.details = Some(details);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.0.retry_after = Some(seconds);
        self
    }

    fn error_type(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::CONFLICT => "conflict_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let kind = self.error_type();
        let e = *self.0;
        let mut error = json!({
            "message": e.message,
            "type": kind,
            "param": e.param,
            "code": e.code,
        });
        if let Some(d) = e.details {
            error["details"] = d;
        }
        let mut resp = (e.status, Json(json!({ "error": error }))).into_response();
        if let Some(secs) = e.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

/// Seconds a client is told to wait before retrying a request the unreachable hub failed.
pub(super) const RETRY_HUB_AFTER_SECS: u64 = 30;

/// A model the local roots or the Hugging Face hub cannot give, for the `model` field: 400 a
/// malformed name or refused path, 404 no such model, 403 the hub refused the server (gated,
/// private, bad HF_TOKEN), 502 the hub answered but the model could not be fetched or used,
/// 503 with `Retry-After` the hub could not be reached.
impl From<crate::hub::HubError> for AppError {
    fn from(e: crate::hub::HubError) -> Self {
        use crate::hub::HubError;
        let code = e.code();
        let error = match e {
            HubError::Invalid(m) => AppError::bad_request(m),
            HubError::NotFound(m) => AppError::not_found(m),
            HubError::Denied(m) => AppError::new(StatusCode::FORBIDDEN, m),
            HubError::Unavailable(m) => AppError::new(StatusCode::BAD_GATEWAY, m),
            HubError::Unreachable(m) => {
                AppError::new(StatusCode::SERVICE_UNAVAILABLE, m).retry_after(RETRY_HUB_AFTER_SECS)
            }
        };
        error.param("model").code(code)
    }
}

impl From<crate::store::StoreError> for AppError {
    fn from(e: crate::store::StoreError) -> Self {
        AppError::internal(e)
    }
}

/// Object storage that does not answer is retryable (503); a local disk error is
/// [`AppError::disk_write`]'s; a row whose object is gone is the server's fault.
impl From<crate::storage::StorageError> for AppError {
    fn from(e: crate::storage::StorageError) -> Self {
        use crate::storage::StorageError;
        match e {
            StorageError::Io(e) => AppError::disk_write(e),
            StorageError::Backend(e) => {
                tracing::error!(error = %e, "artifact storage failed");
                AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the artifact storage (SFTD_STORAGE_URL) is unavailable; retry later",
                )
                .code("storage_unavailable")
                .retry_after(5)
            }
            e => AppError::internal(e),
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        AppError::new(status, format!("invalid request body: {}", r.body_text()))
            .code("invalid_body")
    }
}

impl From<QueryRejection> for AppError {
    fn from(r: QueryRejection) -> Self {
        AppError::bad_request(format!("invalid query string: {}", r.body_text()))
            .code("invalid_query")
    }
}

impl From<PathRejection> for AppError {
    fn from(r: PathRejection) -> Self {
        AppError::bad_request(format!("invalid path: {}", r.body_text()))
    }
}

impl From<MultipartError> for AppError {
    fn from(e: MultipartError) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                AppError::new(StatusCode::PAYLOAD_TOO_LARGE, e.body_text()).code("file_too_large")
            }
            _ => AppError::bad_request(format!("invalid multipart body: {}", e.body_text()))
                .code("invalid_multipart"),
        }
    }
}

impl From<MultipartRejection> for AppError {
    fn from(r: MultipartRejection) -> Self {
        AppError::bad_request(format!(
            "expected a multipart/form-data body: {}",
            r.body_text()
        ))
        .code("invalid_multipart")
    }
}

/// `Json` whose rejections use [`AppError`]'s shape.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub struct AppJson<T>(pub T);

/// `Query` whose rejections use [`AppError`]'s shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(AppError))]
pub struct AppQuery<T>(pub T);

/// `Path` whose rejections use [`AppError`]'s shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(AppError))]
pub struct AppPath<T>(pub T);

/// Unknown routes and methods answer in the same shape.
pub async fn not_found() -> AppError {
    AppError::not_found("no such route").code("unknown_route")
}

pub async fn method_not_allowed() -> AppError {
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}
