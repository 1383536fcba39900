//! Access tokens: HS256 JWTs checked on every WebSocket upgrade when `--jwt-secret` is set, and
//! the API key that guards the write endpoints. Verification is jsonwebtoken's; the only logic
//! here is where a token may come from and what its `rooms` claim allows.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::{HeaderMap, AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::core::stats::AuthReason;
use crate::proto::names::{direct_users, validate_user};

/// The subprotocol a browser offers next to `bearer.<token>`; the server selects it, since a
/// browser refuses an upgrade whose response selects none of the offered subprotocols.
pub const SUBPROTOCOL: &str = "roomcast";
/// Prefix of the subprotocol entry that carries a token.
pub const SUBPROTOCOL_TOKEN_PREFIX: &str = "bearer.";
/// Prefix of the subprotocol entry that carries the first room's password, base64url-encoded
/// without padding (a subprotocol is an RFC 7230 token: a password's `=`, spaces or commas
/// could not travel as they are).
pub const SUBPROTOCOL_PASSWORD_PREFIX: &str = "password.";

/// Seconds of clock skew tolerated on `exp` and `nbf`, at the upgrade, on a refresh and for
/// the socket's own expiry alike.
const LEEWAY_SECS: u64 = 5;

/// Shortest `--jwt-secret` accepted, in bytes: RFC 7518 § 3.2 requires a key of at least the
/// hash's size for HS256, and a shorter one can be brute-forced from any token it signed.
pub const MIN_SECRET_BYTES: usize = 32;

/// The claims roomcast reads; every other claim is ignored.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user name; must pass the user-name rules.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    /// Rooms the holder may join: exact names, `prefix*` wildcards, or `*` for all.
    /// Absent: every room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<RoomsClaim>,
    /// Audience, written by `issue` only: jsonwebtoken checks it on the way in (where it may
    /// also be an array, which this field could not hold).
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub aud: Option<String>,
    /// Issuer, written by `issue` only; checked by jsonwebtoken on the way in.
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub iss: Option<String>,
}

/// The `rooms` claim as a JSON array or as one comma-separated string.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RoomsClaim {
    List(Vec<String>),
    Csv(String),
}

/// What a verified token lets its holder do, kept by the connection for later joins.
#[derive(Debug)]
pub struct Grant {
    pub user: Arc<str>,
    rooms: Scope,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum RoomPattern {
    Exact(Box<str>),
    Prefix(Box<str>),
}

/// The rooms a grant covers, in a canonical form (sorted, without repeats) so that two tokens
/// with the same `rooms` claim compare equal: the `$lobby` encodes its frames once per distinct
/// scope, not once per member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(Option<Arc<[RoomPattern]>>);

impl Scope {
    /// Every room (no tokens, or a token without a `rooms` claim).
    pub fn all() -> Scope {
        Scope(None)
    }

    /// The scope of a `rooms` claim: exact names and `prefix*` wildcards (`*`: every room).
    pub fn of<'a>(patterns: impl Iterator<Item = &'a str>) -> Scope {
        let mut patterns: Vec<RoomPattern> = patterns
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p.strip_suffix('*') {
                Some(prefix) => RoomPattern::Prefix(prefix.into()),
                None => RoomPattern::Exact(p.into()),
            })
            .collect();
        patterns.sort_unstable();
        patterns.dedup();
        Scope(Some(Arc::from(patterns)))
    }

    /// Whether `room` is covered. `$lobby` is a room like any other here: it needs `$lobby` in
    /// the claim, or `*`.
    pub fn allows(&self, room: &str) -> bool {
        let Some(patterns) = &self.0 else {
            return true;
        };
        patterns.iter().any(|p| match p {
            RoomPattern::Exact(name) => &**name == room,
            RoomPattern::Prefix(prefix) => room.starts_with(&**prefix),
        })
    }
}

impl Grant {
    /// Whether the token allows joining `room` (`$lobby` included: see `Scope::allows`). A
    /// direct-message room (`dm:alice+bob`) is allowed exactly when it names the token's `sub`,
    /// whatever the `rooms` claim says: the claim need not list every conversation, and no
    /// claim (`*`, `dm:*`) opens someone else's.
    pub fn allows(&self, room: &str) -> bool {
        match direct_users(room) {
            Some(mut users) => users.any(|u| u == &*self.user),
            None => self.rooms.allows(room),
        }
    }

    /// The rooms the token covers.
    pub fn scope(&self) -> &Scope {
        &self.rooms
    }

    /// Whether the token has expired (with the same leeway as at the upgrade).
    pub fn expired(&self) -> bool {
        self.expires_in().is_zero()
    }

    /// Time left until `expired` turns true: the upgrade accepts a token while the whole
    /// seconds of now are at most `exp + leeway`, so it ends one second after that.
    pub fn expires_in(&self) -> Duration {
        let end = Duration::from_secs(self.expires_at.saturating_add(LEEWAY_SECS + 1));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        end.saturating_sub(now)
    }
}

/// Why a token was refused. Each maps to HTTP 401; the text is safe to show the client (it never
/// contains the token).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("an access token is required (query `token=`, `Authorization: Bearer`, or subprotocol `bearer.<token>`)")]
    Missing,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is not valid yet (`nbf`)")]
    NotYetValid,
    #[error("the access token's `sub` is not a valid user name")]
    BadSubject,
    #[error("the access token is invalid: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The `auth_refused` label of this refusal.
    pub fn reason(&self) -> AuthReason {
        match self {
            AuthError::Missing => AuthReason::MissingToken,
            AuthError::Expired => AuthReason::TokenExpired,
            AuthError::NotYetValid => AuthReason::TokenNotYetValid,
            AuthError::BadSubject | AuthError::Invalid(_) => AuthReason::BadToken,
        }
    }

    /// Whether this refusal could be a guess: a token that does not verify. A missing or
    /// expired token is a client's mistake, not an attack, and does not count towards the
    /// failure lockout.
    pub fn is_guess(&self) -> bool {
        matches!(self, AuthError::BadSubject | AuthError::Invalid(_))
    }
}

/// A `--jwt-secret` too short to be safe; the server refuses to start with it.
#[derive(Debug, thiserror::Error)]
#[error("--jwt-secret must be at least {MIN_SECRET_BYTES} bytes (this one has {0}); make one with `openssl rand -base64 32`")]
pub struct WeakSecret(usize);

/// Refuses a secret shorter than `MIN_SECRET_BYTES`.
pub fn check_secret(secret: &str) -> Result<(), WeakSecret> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(WeakSecret(secret.len()));
    }
    Ok(())
}

/// Verifies tokens signed with one shared secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for `secret`; `audience` and `issuer`, when set, must be the token's `aud`
    /// and `iss`. Without an audience, a token that names one is refused (RFC 7519 § 4.1.3: a
    /// recipient that is not named must reject it).
    pub fn new(
        secret: &str,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<Self, WeakSecret> {
        check_secret(secret)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(aud) = audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    /// Checks signature, algorithm, expiry, `nbf`, audience, issuer and subject.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (`aud`)".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (`iss`)".into()),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm must be HS256".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim `{c}`"))
                }
                ErrorKind::Json(_) => AuthError::Invalid("claims are not valid".into()),
                _ => AuthError::Invalid("malformed token".into()),
            },
        )?;
        let claims = data.claims;
        validate_user(&claims.sub).map_err(|_| AuthError::BadSubject)?;
        let rooms = claims.rooms.map_or_else(Scope::all, |claim| {
            let list: Vec<String> = match claim {
                RoomsClaim::List(list) => list,
                RoomsClaim::Csv(csv) => csv.split(',').map(str::to_owned).collect(),
            };
            Scope::of(list.iter().map(String::as_str))
        });
        Ok(Grant {
            user: claims.sub.into(),
            rooms,
            expires_at: claims.exp,
        })
    }
}

/// Where a token was found; a token from the subprotocol header means the response must select
/// `SUBPROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Subprotocol,
    Query,
}

/// Finds the token of an upgrade request: `Authorization: Bearer`, then a `bearer.<token>`
/// subprotocol, then the `token` query parameter.
pub fn find_token<'a>(
    headers: &'a HeaderMap,
    query_token: Option<&'a str>,
) -> Option<(&'a str, TokenSource)> {
    if let Some(token) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
    {
        return Some((token, TokenSource::Header));
    }
    let from_protocol =
        subprotocols(headers).find_map(|p| p.strip_prefix(SUBPROTOCOL_TOKEN_PREFIX));
    if let Some(token) = from_protocol {
        return Some((token, TokenSource::Subprotocol));
    }
    query_token.map(|t| (t, TokenSource::Query))
}

/// Entries of the request's `Sec-WebSocket-Protocol` headers.
fn subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// A `password.` subprotocol entry that is not base64url of UTF-8 text.
#[derive(Debug, thiserror::Error)]
#[error("the `password.` subprotocol must be base64url (no padding) of UTF-8 text")]
pub struct BadPasswordEncoding;

/// The room password a browser sent as a `password.<base64url>` subprotocol.
pub fn find_password(headers: &HeaderMap) -> Result<Option<String>, BadPasswordEncoding> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let Some(encoded) =
        subprotocols(headers).find_map(|p| p.strip_prefix(SUBPROTOCOL_PASSWORD_PREFIX))
    else {
        return Ok(None);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| BadPasswordEncoding)?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| BadPasswordEncoding)
}

/// The credential of an `Authorization: Bearer <credential>` value (scheme case-insensitive).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// Whether the request carries `Authorization: Bearer <key>`, compared in constant time.
pub fn api_key_matches(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(key.as_bytes())))
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make a token: {0}")]
pub struct IssueError(String);

/// Signs tokens with one shared secret: `roomcast token`, and the tokens built-in accounts
/// issue (`POST /token`), which the server's own `Verifier` accepts.
pub struct Issuer {
    key: EncodingKey,
    /// `--jwt-audience` / `--jwt-issuer`: written into every token, since the verifier wants them.
    aud: Option<String>,
    iss: Option<String>,
}

impl Issuer {
    pub fn new(secret: &str, aud: Option<&str>, iss: Option<&str>) -> Result<Self, WeakSecret> {
        // A token the server would refuse for its secret alone is no use to anyone.
        check_secret(secret)?;
        Ok(Issuer {
            key: EncodingKey::from_secret(secret.as_bytes()),
            aud: aud.map(str::to_owned),
            iss: iss.map(str::to_owned),
        })
    }

    /// A token for `sub` allowing `rooms` (comma-separated patterns; `None`: every room),
    /// valid for `ttl`; and its `exp`, seconds since the Unix epoch.
    pub fn issue(
        &self,
        sub: &str,
        rooms: Option<&str>,
        ttl: Duration,
    ) -> Result<(String, u64), IssueError> {
        validate_user(sub).map_err(|e| IssueError(e.user_reason().into()))?;
        let exp = jsonwebtoken::get_current_timestamp().saturating_add(ttl.as_secs());
        let claims = Claims {
            sub: sub.to_owned(),
            exp,
            rooms: rooms.map(|r| RoomsClaim::Csv(r.to_owned())),
            aud: self.aud.clone(),
            iss: self.iss.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| IssueError(e.to_string()))?;
        Ok((token, exp))
    }
}

/// Signs a development token (`roomcast token`).
pub fn issue(
    secret: &str,
    sub: &str,
    rooms: Option<&str>,
    ttl: Duration,
) -> Result<String, IssueError> {
    issue_for(secret, sub, rooms, ttl, None, None)
}

/// Signs a development token for a server run with `--jwt-audience` / `--jwt-issuer`.
pub fn issue_for(
    secret: &str,
    sub: &str,
    rooms: Option<&str>,
    ttl: Duration,
    aud: Option<&str>,
    iss: Option<&str>,
) -> Result<String, IssueError> {
    let issuer = Issuer::new(secret, aud, iss).map_err(|e| IssueError(e.to_string()))?;
    issuer.issue(sub, rooms, ttl).map(|(token, _)| token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "unit-test-secret-of-32-bytes-min";
    const OTHER: &str = "another-secret-also-32-bytes-long";

    fn verifier() -> Verifier {
        Verifier::new(K, None, None).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn later() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    #[test]
    fn issued_tokens_verify_and_carry_their_rooms() {
        let t = issue(K, "alice", Some("general, post:*"), Duration::from_secs(60)).unwrap();
        let grant = verifier().verify(&t).unwrap();
        assert_eq!(&*grant.user, "alice");
        assert!(grant.allows("general"));
        assert!(grant.allows("post:1"));
        assert!(grant.allows("post:"));
        assert!(!grant.allows("generals"));
        assert!(!grant.allows("pos"));
        assert!(!grant.expired());
    }

    #[test]
    fn rooms_claim_as_array_and_absent() {
        let v = verifier();
        let g = v
            .verify(&token(
                K,
                serde_json::json!({"sub": "u", "exp": later(), "rooms": ["a", "b*"]}),
            ))
            .unwrap();
        assert!(g.allows("a") && g.allows("bcd") && !g.allows("c"));
        assert!(!g.allows("$lobby"), "the lobby is a grant like any room");
        let same = v
            .verify(&token(
                K,
                serde_json::json!({"sub": "w", "exp": later(), "rooms": "b*, a,a"}),
            ))
            .unwrap();
        assert_eq!(g.scope(), same.scope(), "one scope per distinct claim");
        let g = v
            .verify(&token(K, serde_json::json!({"sub": "u", "exp": later()})))
            .unwrap();
        assert!(g.allows("anything") && g.allows("$lobby"));
        let g = v
            .verify(&token(
                K,
                serde_json::json!({"sub": "u", "exp": later(), "rooms": "*"}),
            ))
            .unwrap();
        assert!(g.allows("anything") && g.allows("$lobby"));
        let g = v
            .verify(&token(
                K,
                serde_json::json!({"sub": "u", "exp": later(), "rooms": []}),
            ))
            .unwrap();
        assert!(!g.allows("anything"), "an empty list allows nothing");
        assert!(!g.allows("$lobby"), "not even the lobby");
    }

    #[test]
    fn refusals_say_why() {
        let v = verifier();
        let now = jsonwebtoken::get_current_timestamp();
        assert!(matches!(
            v.verify(&token(K, serde_json::json!({"sub": "u", "exp": now - 60}))),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            v.verify(&token(
                OTHER,
                serde_json::json!({"sub": "u", "exp": later()})
            )),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(&token(K, serde_json::json!({"sub": "u"}))),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(&token(K, serde_json::json!({"sub": "", "exp": later()}))),
            Err(AuthError::BadSubject)
        ));
        assert!(matches!(v.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
        assert!(matches!(v.verify(""), Err(AuthError::Invalid(_))));
        // alg=none must never pass.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        assert!(matches!(v.verify(none), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn nbf_audience_and_issuer_are_checked() {
        let now = jsonwebtoken::get_current_timestamp();
        let v = verifier();
        assert_eq!(
            v.verify(&token(
                K,
                serde_json::json!({"sub": "u", "exp": later(), "nbf": now + 60})
            ))
            .unwrap_err(),
            AuthError::NotYetValid
        );
        assert!(v
            .verify(&token(
                K,
                serde_json::json!({"sub": "u", "exp": later(), "nbf": now})
            ))
            .is_ok());
        let scoped = Verifier::new(K, Some("chat"), Some("https://id.example")).unwrap();
        let t = issue_for(
            K,
            "u",
            None,
            Duration::from_secs(60),
            Some("chat"),
            Some("https://id.example"),
        )
        .unwrap();
        assert!(scoped.verify(&t).is_ok());
        for (aud, iss) in [
            (None, Some("https://id.example")),
            (Some("chat"), None),
            (Some("other"), Some("https://id.example")),
            (Some("chat"), Some("https://evil.example")),
        ] {
            let t = issue_for(K, "u", None, Duration::from_secs(60), aud, iss).unwrap();
            assert!(
                matches!(scoped.verify(&t), Err(AuthError::Invalid(_))),
                "{aud:?} {iss:?}"
            );
        }
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Verifier::new("short", None, None).is_err());
        assert!(Verifier::new(&"x".repeat(MIN_SECRET_BYTES - 1), None, None).is_err());
        assert!(Verifier::new(&"x".repeat(MIN_SECRET_BYTES), None, None).is_ok());
        assert!(issue("short", "u", None, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn token_sources_in_order() {
        let mut h = HeaderMap::new();
        assert_eq!(find_token(&h, Some("q")), Some(("q", TokenSource::Query)));
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            "roomcast, bearer.abc".parse().unwrap(),
        );
        assert_eq!(
            find_token(&h, Some("q")),
            Some(("abc", TokenSource::Subprotocol))
        );
        h.insert(AUTHORIZATION, "Bearer hdr".parse().unwrap());
        assert_eq!(
            find_token(&h, Some("q")),
            Some(("hdr", TokenSource::Header))
        );
        assert_eq!(find_token(&HeaderMap::new(), None), None);
    }

    #[test]
    fn api_key_needs_the_exact_bearer() {
        let mut h = HeaderMap::new();
        assert!(!api_key_matches(&h, "key"));
        h.insert(AUTHORIZATION, "Bearer key".parse().unwrap());
        assert!(api_key_matches(&h, "key"));
        assert!(!api_key_matches(&h, "ke"));
        assert!(!api_key_matches(&h, "key2"));
        h.insert(AUTHORIZATION, "Basic key".parse().unwrap());
        assert!(!api_key_matches(&h, "key"));
    }
}
