//! Who may do what: access tokens, the API key, browser origins. Every route asks here, so each
//! rule is written once.

use std::sync::Arc;

use hyper::header::ORIGIN;
use hyper::Request;

use super::reply::ApiError;
use crate::core::auth::{self, Grant, Verifier};
use crate::core::stats::Stats;

/// The server's security settings.
pub struct Access {
    /// `--jwt-secret`: every upgrade (and every room read) needs a token. Shared with the
    /// connections, which check refreshed tokens against the same rules.
    verifier: Option<Arc<Verifier>>,
    /// `--api-key`: backends that present it may publish and read any room.
    api_key: Option<String>,
    /// `--allowed-origins` (empty: any).
    allowed_origins: Vec<String>,
}

impl Access {
    pub fn new(
        verifier: Option<Arc<Verifier>>,
        api_key: Option<String>,
        allowed_origins: Vec<String>,
    ) -> Self {
        Access {
            verifier,
            api_key,
            allowed_origins,
        }
    }

    /// Whether the request carries the API key (`false` when there is none).
    pub fn has_api_key<B>(&self, req: &Request<B>) -> bool {
        self.api_key
            .as_deref()
            .is_some_and(|key| auth::api_key_matches(req.headers(), key))
    }

    /// Whether an API key is configured at all.
    pub fn api_key_on(&self) -> bool {
        self.api_key.is_some()
    }

    /// Whether REST publishing is open to anyone (no tokens and no API key).
    pub fn publish_open(&self) -> bool {
        self.verifier.is_none() && self.api_key.is_none()
    }

    /// The request's grant when tokens are on (`None` when they are off), checked against
    /// `room` when one is named. 401 without a valid token, 403 `forbidden_room` when the token
    /// does not allow the room; both counted in `auth_refused`.
    pub fn grant<B>(
        &self,
        req: &Request<B>,
        query_token: Option<&str>,
        room: Option<&str>,
        stats: &Stats,
    ) -> Result<Option<Grant>, ApiError> {
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let refused = |e: ApiError| {
            stats.auth_refused.inc();
            e
        };
        let Some((token, _)) = auth::find_token(req.headers(), query_token) else {
            return Err(refused(ApiError::from(&auth::AuthError::Missing)));
        };
        let grant = verifier
            .verify(token)
            .map_err(|e| refused(ApiError::from(&e)))?;
        if let Some(room) = room {
            if !grant.allows(room) {
                return Err(refused(ApiError::forbidden(
                    "forbidden_room",
                    "the access token does not allow this room",
                )));
            }
        }
        Ok(Some(grant))
    }

    /// Whether the browser `Origin` of the request may open a WebSocket.
    pub fn origin_allowed<B>(&self, req: &Request<B>) -> bool {
        let allowed = &self.allowed_origins;
        if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
            return true;
        }
        match req.headers().get(ORIGIN) {
            // Not a browser: origin checks protect browsers' ambient credentials only.
            None => true,
            Some(origin) => origin.to_str().is_ok_and(|o| {
                let o = o.trim_end_matches('/');
                allowed
                    .iter()
                    .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(o))
            }),
        }
    }
}
