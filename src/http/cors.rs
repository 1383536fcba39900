//! CORS for the REST API (`--cors-origins`): which browser pages on other origins may read
//! the API's answers, answered once per request at the edge of the route table.
//!
//! A listed origin may use every API route with credentials (`Authorization`,
//! `X-Room-Password`). `*` opens the read-only routes (GET) to every other origin, without
//! `Authorization`: a page anywhere may read public rooms, never publish, and never send a
//! visitor's token to us from a page we did not list. Anything else gets no CORS header (the
//! browser withholds the answer) and a refused preflight is a 403 counted in `cors_refused`.

use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use hyper::{Method, Response, StatusCode};

use super::reply::{ApiError, Body};

/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";
/// Request headers a listed origin may send.
const LISTED_HEADERS: &str = "Authorization, Content-Type, X-Room-Password";
/// Request headers any origin may send under `*`: no `Authorization`.
const ANY_HEADERS: &str = "Content-Type, X-Room-Password";

/// `--cors-origins`.
pub struct Cors {
    /// Origins allowed everything, compared without a trailing `/`, case-insensitively.
    listed: Vec<String>,
    /// `*` was given: any origin may use the GET routes without credentials.
    any_read: bool,
}

/// What one request's origin is allowed.
enum Allowed {
    /// A listed origin: every method, credentials included. Holds the origin to echo.
    Listed(HeaderValue),
    /// An origin covered by `*` only: GET without credentials.
    AnyRead,
}

impl Cors {
    /// `None` when no origin is given (CORS off: no header is ever added).
    pub fn new(origins: &[String]) -> Option<Cors> {
        let any_read = origins.iter().any(|o| o.trim() == "*");
        let listed: Vec<String> = origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty() && o != "*")
            .collect();
        (any_read || !listed.is_empty()).then_some(Cors { listed, any_read })
    }

    fn allowed(&self, headers: &HeaderMap) -> Option<Allowed> {
        let origin = headers.get(ORIGIN)?;
        let text = origin.to_str().ok()?.trim_end_matches('/');
        if self.listed.iter().any(|o| o.eq_ignore_ascii_case(text)) {
            return Some(Allowed::Listed(origin.clone()));
        }
        self.any_read.then_some(Allowed::AnyRead)
    }

    /// Whether a request is a preflight this module answers.
    pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(ORIGIN)
            && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The answer to a preflight: 204 with what the origin may do, or 403
    /// `origin_not_allowed` when it may not do what it asks (counted by the caller).
    pub fn preflight(&self, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
        let refused = |reason: &'static str| ApiError::forbidden("origin_not_allowed", reason);
        let wants = headers
            .get(ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| m.to_str().ok())
            .unwrap_or("");
        let asks_credentials = headers
            .get(ACCESS_CONTROL_REQUEST_HEADERS)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| {
                h.split(',')
                    .any(|h| h.trim().eq_ignore_ascii_case("authorization"))
            });
        let (origin, methods, allow_headers) = match self.allowed(headers) {
            Some(Allowed::Listed(origin)) => (origin, "GET, POST", LISTED_HEADERS),
            Some(Allowed::AnyRead) if wants == "GET" && !asks_credentials => {
                (HeaderValue::from_static("*"), "GET", ANY_HEADERS)
            }
            Some(Allowed::AnyRead) => {
                return Err(refused(
                    "this Origin may only read (GET, without Authorization): it is not in --cors-origins",
                ))
            }
            None => return Err(refused("this Origin is not in --cors-origins")),
        };
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(VARY, HeaderValue::from_static("Origin"));
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(allow_headers),
        );
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        Ok(response)
    }

    /// Adds the CORS headers to an API answer (refusals included, so a page can read why).
    pub fn decorate(&self, method: &Method, headers: &HeaderMap, response: &mut Response<Body>) {
        let origin = match self.allowed(headers) {
            Some(Allowed::Listed(origin)) => origin,
            Some(Allowed::AnyRead) if matches!(*method, Method::GET | Method::HEAD) => {
                HeaderValue::from_static("*")
            }
            _ => return,
        };
        let h = response.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        // The answer depends on `Origin`: caches must not hand one origin's to another.
        h.append(VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn origin_of(r: &Response<Body>) -> Option<&str> {
        r.headers()
            .get(ACCESS_CONTROL_ALLOW_ORIGIN)
            .and_then(|v| v.to_str().ok())
    }

    #[test]
    fn listed_origins_get_everything_and_star_reads_only() {
        assert!(Cors::new(&[]).is_none());
        let cors = Cors::new(&["https://app.example/".into(), "*".into()]).unwrap();
        let listed = [
            ("origin", "https://APP.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ];
        let ok = cors.preflight(&headers(&listed)).unwrap();
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(origin_of(&ok), Some("https://APP.example"));
        let other_get = [
            ("origin", "https://else.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "content-type"),
        ];
        let ok = cors.preflight(&headers(&other_get)).unwrap();
        assert_eq!(origin_of(&ok), Some("*"));
        let other_post = [
            ("origin", "https://else.example"),
            ("access-control-request-method", "POST"),
        ];
        assert_eq!(
            cors.preflight(&headers(&other_post)).unwrap_err().status(),
            StatusCode::FORBIDDEN
        );
        let other_token = [
            ("origin", "https://else.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "Authorization"),
        ];
        assert!(cors.preflight(&headers(&other_token)).is_err());

        let mut r = Response::new(Body::default());
        cors.decorate(
            &Method::POST,
            &headers(&[("origin", "https://else.example")]),
            &mut r,
        );
        assert_eq!(origin_of(&r), None, "never POST under *");
        cors.decorate(
            &Method::GET,
            &headers(&[("origin", "https://else.example")]),
            &mut r,
        );
        assert_eq!(origin_of(&r), Some("*"));
        assert_eq!(r.headers().get(VARY).unwrap(), "Origin");

        let only = Cors::new(&["https://app.example".into()]).unwrap();
        let mut r = Response::new(Body::default());
        only.decorate(
            &Method::GET,
            &headers(&[("origin", "https://else.example")]),
            &mut r,
        );
        assert_eq!(origin_of(&r), None);
    }
}
