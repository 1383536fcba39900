//! Who may do what: access tokens, the API key, room passwords, private rooms, browser origins
//! and the failure lockout. Every route asks here, so each rule is written once; every refusal
//! is counted in `auth_refused` with its reason.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::header::{FORWARDED, ORIGIN};
use hyper::Request;
use ipnet::IpNet;

use super::reply::ApiError;
use crate::config::rooms::Password;
use crate::core::auth::{self, Grant, Scope, Verifier};
use crate::core::hub::JoinError;
use crate::core::lockout::Lockout;
use crate::core::stats::{AuthReason, Stats};
use crate::proto::names::direct_admits;

/// The server's security settings.
pub struct Access {
    /// `--jwt-secret`: every upgrade (and every room read) needs a token. Shared with the
    /// connections, which check refreshed tokens against the same rules.
    verifier: Option<Arc<Verifier>>,
    /// `--api-key`: backends that present it may publish and read any room.
    api_key: Option<String>,
    /// `--allowed-origins` (empty: any).
    allowed_origins: Vec<String>,
    /// Failed passwords and tokens per address and room; shared with the connections.
    lockout: Arc<Lockout>,
    stats: Arc<Stats>,
    /// `--trusted-proxies`: peers whose `Forwarded` / `X-Forwarded-For` name the client.
    trusted_proxies: Vec<IpNet>,
}

/// Who is asking to see rooms, and so which rooms they are shown.
pub enum Viewer {
    /// Holds the API key: every room, private ones included.
    Backend,
    /// Tokens off: every public room. Tokens on: the public rooms the grant covers.
    Scoped(Scope),
}

impl Viewer {
    /// Whether a room appears in this viewer's listings. A private room (`private = true`, or
    /// one with a password) is listed to backends only: its name is for its members.
    pub fn shows(&self, room: &str, private: bool) -> bool {
        match self {
            Viewer::Backend => true,
            Viewer::Scoped(scope) => !private && scope.allows(room),
        }
    }
}

impl Access {
    pub fn new(
        verifier: Option<Arc<Verifier>>,
        api_key: Option<String>,
        allowed_origins: Vec<String>,
        lockout: Arc<Lockout>,
        stats: Arc<Stats>,
    ) -> Self {
        Access {
            verifier,
            api_key,
            allowed_origins,
            lockout,
            stats,
            trusted_proxies: Vec::new(),
        }
    }

    /// Believes `Forwarded` / `X-Forwarded-For` from these peers (`--trusted-proxies`).
    pub fn with_trusted_proxies(mut self, proxies: Vec<IpNet>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The address a request is charged to (per-IP cap, failure lockout): the TCP peer, or,
    /// when the peer is a trusted proxy, the last address its forwarding headers name that is
    /// not itself a trusted proxy. `Forwarded` (RFC 7239) wins over `X-Forwarded-For`; an
    /// entry that is not an address (`unknown`, an obfuscated name) ends the walk there.
    pub fn client_addr<B>(&self, req: &Request<B>, peer: IpAddr) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let headers = req.headers();
        let hops: Vec<Option<IpAddr>> = if headers.contains_key(FORWARDED) {
            headers
                .get_all(FORWARDED)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(forwarded_for)
                .collect()
        } else {
            headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|hop| hop.trim().parse::<IpAddr>().ok())
                .collect()
        };
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if self.trusted(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
        client
    }

    fn refused(&self, reason: AuthReason, e: ApiError) -> ApiError {
        self.stats.auth_refused.inc(reason);
        e
    }

    /// Counts a refusal decided elsewhere (a join the hub refused).
    pub fn count(&self, reason: AuthReason) {
        self.stats.auth_refused.inc(reason);
    }

    /// Whether the request carries the API key (`false` when there is none).
    pub fn has_api_key<B>(&self, req: &Request<B>) -> bool {
        self.api_key
            .as_deref()
            .is_some_and(|key| auth::api_key_matches(req.headers(), key))
    }

    /// Whether upgrades need a token (`--jwt-secret`).
    pub fn tokens_on(&self) -> bool {
        self.verifier.is_some()
    }

    /// Whether an API key is configured at all.
    pub fn api_key_on(&self) -> bool {
        self.api_key.is_some()
    }

    /// Whether REST publishing is open to anyone (no tokens and no API key).
    pub fn publish_open(&self) -> bool {
        self.verifier.is_none() && self.api_key.is_none()
    }

    /// 401 for a request that needs the API key and lacks it.
    pub fn need_api_key(&self) -> ApiError {
        self.refused(
            AuthReason::BadApiKey,
            ApiError::unauthorized("this endpoint needs `Authorization: Bearer <api key>`"),
        )
    }

    /// 429 while `peer` is locked out of `room` (`""`: attempts that named no room).
    pub fn not_locked(&self, peer: IpAddr, room: &str) -> Result<(), ApiError> {
        self.lockout
            .check(peer, room)
            .map_err(|wait| self.refused(AuthReason::TooManyFailures, ApiError::locked_out(wait)))
    }

    /// Notes a failed guess (a wrong password, a token that does not verify).
    fn failed(&self, peer: IpAddr, room: &str) {
        // The refusal at hand is answered as it is; the lockout bites on the next attempt.
        let _ = self.lockout.failed(peer, room);
    }

    /// The request's grant when tokens are on (`None` when they are off), checked against
    /// `room` when one is named: 401 without a valid token, 403 `forbidden_room` when the token
    /// does not allow the room, 429 while this address is locked out of the room. A token that
    /// does not verify counts towards the lockout.
    pub fn grant<B>(
        &self,
        req: &Request<B>,
        peer: IpAddr,
        query_token: Option<&str>,
        room: Option<&str>,
    ) -> Result<Option<Grant>, ApiError> {
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let scope = room.unwrap_or("");
        self.not_locked(peer, scope)?;
        let Some((token, _)) = auth::find_token(req.headers(), query_token) else {
            let e = auth::AuthError::Missing;
            return Err(self.refused(e.reason(), ApiError::from(&e)));
        };
        let grant = verifier.verify(token).map_err(|e| {
            if e.is_guess() {
                self.failed(peer, scope);
            }
            self.refused(e.reason(), ApiError::from(&e))
        })?;
        if let Some(room) = room {
            if !grant.allows(room) {
                return Err(self.refused(
                    AuthReason::ForbiddenRoom,
                    ApiError::forbidden(
                        "forbidden_room",
                        "the access token does not allow this room",
                    ),
                ));
            }
        }
        Ok(Some(grant))
    }

    /// Checks a room password given over HTTP: 403 `bad_password` when the room has one and
    /// `given` is not it (a wrong one counts towards the lockout), 429 while locked out.
    pub fn password(
        &self,
        peer: IpAddr,
        room: &str,
        expected: Option<&Password>,
        given: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        self.not_locked(peer, room)?;
        let refused = match given {
            Some(given) if expected.matches(given) => return Ok(()),
            Some(_) => {
                self.failed(peer, room);
                JoinError::WrongPassword
            }
            None => JoinError::PasswordRequired,
        };
        Err(self.refused(
            AuthReason::BadPassword,
            ApiError::forbidden(refused.code(), refused.to_string()),
        ))
    }

    /// Counts a join the hub refused for its password, and notes a wrong one against the
    /// lockout.
    pub fn join_refused(&self, peer: IpAddr, room: &str, e: &JoinError) {
        if let Some(reason) = e.auth_reason() {
            self.count(reason);
        }
        if e.is_guess() {
            self.failed(peer, room);
        }
    }

    /// Who is asking to see rooms: the API key sees everything; with tokens on, a token is
    /// needed (401) and its grant bounds what is shown.
    pub fn viewer<B>(
        &self,
        req: &Request<B>,
        peer: IpAddr,
        query_token: Option<&str>,
    ) -> Result<Viewer, ApiError> {
        if self.has_api_key(req) {
            return Ok(Viewer::Backend);
        }
        Ok(match self.grant(req, peer, query_token, None)? {
            Some(grant) => Viewer::Scoped(grant.scope().clone()),
            None => Viewer::Scoped(Scope::all()),
        })
    }

    /// Whether the request may read `room` (its info, members and messages): what joining it
    /// needs (a token that allows it, its password `(expected, given)`) or the API key. A
    /// direct-message room is read by the users it names: with tokens, the token's `sub`;
    /// without, whoever names one of them as `user` (no more proof than joining asks).
    pub fn may_read<B>(
        &self,
        req: &Request<B>,
        peer: IpAddr,
        room: &str,
        query_token: Option<&str>,
        (expected, given): (Option<&Password>, Option<&str>),
        user: Option<&str>,
    ) -> Result<(), ApiError> {
        if self.has_api_key(req) {
            return Ok(());
        }
        if self.grant(req, peer, query_token, Some(room))?.is_none() {
            self.direct(room, user.unwrap_or(""))?;
        }
        self.password(peer, room, expected, given)
    }

    /// 403 `forbidden_room` when `room` is a direct-message room that does not name `user`.
    pub fn direct(&self, room: &str, user: &str) -> Result<(), ApiError> {
        if direct_admits(room, user) {
            return Ok(());
        }
        let e = JoinError::NotAddressed;
        Err(self.refused(
            AuthReason::ForbiddenRoom,
            ApiError::forbidden(e.code(), e.to_string()),
        ))
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

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The address of one `Forwarded` element's `for=` parameter: `for=192.0.2.60`,
/// `for="192.0.2.60:4711"`, `for="[2001:db8::1]:4711"`. `None` for anything else.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then(|| value.trim())
    })?;
    let value = value.trim_matches('"');
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    value
        .parse()
        .ok()
        .or_else(|| value.rsplit_once(':')?.0.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(proxies: &[&str]) -> Access {
        Access::new(
            None,
            None,
            Vec::new(),
            Arc::new(Lockout::default()),
            Arc::new(Stats::new()),
        )
        .with_trusted_proxies(proxies.iter().map(|p| p.parse().unwrap()).collect())
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let xff = [("x-forwarded-for", "203.0.113.7, 10.0.0.2")];
        // Not a trusted peer: the headers are anyone's words.
        assert_eq!(
            access(&[]).client_addr(&req(&xff), ip("10.0.0.1")),
            ip("10.0.0.1")
        );
        let a = access(&["10.0.0.0/8"]);
        // The last hop that is not a trusted proxy.
        assert_eq!(a.client_addr(&req(&xff), ip("10.0.0.1")), ip("203.0.113.7"));
        // A client cannot hide behind an address it wrote itself further left.
        let spoofed = [("x-forwarded-for", "1.2.3.4, 198.51.100.9")];
        assert_eq!(
            a.client_addr(&req(&spoofed), ip("10.0.0.1")),
            ip("198.51.100.9")
        );
        // RFC 7239 wins, with ports, quotes and IPv6 brackets.
        let fwd = [
            (
                "forwarded",
                r#"for="[2001:db8::1]:4711";proto=https, for=10.0.0.3"#,
            ),
            ("x-forwarded-for", "198.51.100.1"),
        ];
        assert_eq!(a.client_addr(&req(&fwd), ip("10.0.0.1")), ip("2001:db8::1"));
        let fwd = [("forwarded", r#"for="192.0.2.60:4711""#)];
        assert_eq!(a.client_addr(&req(&fwd), ip("10.0.0.1")), ip("192.0.2.60"));
        // An obfuscated hop ends the walk at the last trusted one.
        let hidden = [("forwarded", "for=_hidden, for=10.0.0.9")];
        assert_eq!(a.client_addr(&req(&hidden), ip("10.0.0.1")), ip("10.0.0.9"));
        // No headers: the proxy itself.
        assert_eq!(a.client_addr(&req(&[]), ip("10.0.0.1")), ip("10.0.0.1"));
    }
}
