//! Answers: JSON bodies, the error body every refusal uses, and the refusal type handlers
//! return so that they can use `?`.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::core::auth::AuthError;
use crate::core::limit::retry_after_ms;

pub use super::body::Body;

/// A refused request: status, machine-readable code, human reason, and the headers some
/// refusals carry. Turned into a response only at the edge.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    reason: Cow<'static, str>,
    /// `Retry-After` and `retry_after_ms` (429, 503 `accept_rate`).
    retry_after: Option<Duration>,
    /// `WWW-Authenticate: Bearer` (401).
    challenge: bool,
    /// `Allow` (405).
    allow: Option<&'static [Method]>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            code,
            reason: reason.into(),
            retry_after: None,
            challenge: false,
            allow: None,
        }
    }

    pub fn bad_request(code: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, reason)
    }

    pub fn not_found(code: &'static str, reason: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, reason)
    }

    pub fn forbidden(code: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, reason)
    }

    /// 401 with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(reason: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            challenge: true,
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthorized", reason)
        }
    }

    /// 429 with `Retry-After` (whole seconds, rounded up) and `retry_after_ms` in the body.
    pub fn rate_limited(reason: &'static str, wait: Duration) -> Self {
        ApiError {
            retry_after: Some(wait),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", reason)
        }
    }

    /// 429 `too_many_failures` with `Retry-After`: the failure lockout.
    pub fn locked_out(wait: Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            "too many failed attempts from this address for this room: try again later",
        )
        .retry_after(wait)
    }

    /// This refusal with `WWW-Authenticate: Bearer` (a 401 with a code of its own).
    pub fn with_challenge(self) -> Self {
        ApiError {
            challenge: true,
            ..self
        }
    }

    /// This refusal with `Retry-After` and `retry_after_ms`.
    pub fn retry_after(self, wait: Duration) -> Self {
        ApiError {
            retry_after: Some(wait),
            ..self
        }
    }

    /// 405 with `Allow`.
    pub fn method_not_allowed(allowed: &'static [Method]) -> Self {
        ApiError {
            allow: Some(allowed),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// `{"error": code, "reason": text}`, plus `retry_after_ms` when there is a wait.
    pub fn response(&self) -> Response<Body> {
        let mut body = json!({"error": self.code, "reason": self.reason});
        let retry_ms = self.retry_after.map(retry_after_ms);
        if let Some(ms) = retry_ms {
            body["retry_after_ms"] = ms.into();
        }
        let mut resp = json(self.status, &body);
        let headers = resp.headers_mut();
        if let Some(ms) = retry_ms {
            headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        }
        if self.challenge {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(allowed) = self.allow {
            let allow = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                headers.insert(ALLOW, v);
            }
        }
        resp
    }
}

impl From<&AuthError> for ApiError {
    fn from(e: &AuthError) -> Self {
        ApiError::unauthorized(e.to_string())
    }
}

/// What a handler answers.
pub type Reply = Result<Response<Body>, ApiError>;

/// A JSON body with the right content type, never cached.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    raw_json(status, Bytes::from(body))
}

/// Bytes that already are a JSON document.
pub fn raw_json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A body of `content_type`.
pub fn typed(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Body::full(body.into()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
