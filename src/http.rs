//! HTTP routing: the JSON API, the web page, and the WebSocket upgrade (every check on the
//! upgrade request happens here, before the 101, so a refusal is a status code and a JSON body).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ORIGIN, RETRY_AFTER,
    SEC_WEBSOCKET_PROTOCOL, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::archive::payload_of;
use crate::auth::{self, AuthError, Grant};
use crate::connection::{Accepted, ConnectionGuard, Mode};
use crate::history::ReplayRequest;
use crate::limit::retry_after_ms;
use crate::names::{validate_room, validate_user};
use crate::room::Publish;
use crate::server::Shared;
use crate::stats::{cpu_seconds, rss_bytes};
use crate::target::{parse_user, parse_ws_target, WsTarget};

pub type Body = Full<Bytes>;

const INDEX_HTML: &str = include_str!("../web/index.html");

/// Answers one HTTP request. Never fails: every problem is a status code with a JSON body.
pub async fn handle(shared: Arc<Shared>, peer: IpAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    // Cluster mode answers these with cluster-wide figures (src/cluster/api.rs).
    if let Some(cluster) = &shared.cluster {
        if method == Method::GET {
            match segments.as_slice() {
                ["healthz"] => return json_response(StatusCode::OK, &cluster.health_json()),
                ["api", "stats"] => return crate::cluster::api::stats(&shared, cluster).await,
                ["api", "rooms"] => {
                    return crate::cluster::api::list_rooms(&shared, cluster, &req).await
                }
                ["api", "rooms", room] => {
                    return match decode_room(room) {
                        Ok(room) => crate::cluster::api::room_info(&shared, cluster, &room, &req)
                            .await
                            .unwrap_or_else(|e| e.response()),
                        Err(e) => e.response(),
                    };
                }
                _ => {}
            }
        }
    }
    match segments.as_slice() {
        [""] => only(&method, &[Method::GET, Method::HEAD], || html(INDEX_HTML)),
        ["healthz"] => only(&method, &[Method::GET], || {
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        }),
        ["metrics"] => only(&method, &[Method::GET], || metrics(&shared)),
        ["api", "stats"] => only(&method, &[Method::GET], || stats(&shared)),
        ["api", "rooms"] => only(&method, &[Method::GET], || list_rooms(&shared, &req)),
        ["api", "rooms", room] => {
            let room = decode_room(room);
            only(&method, &[Method::GET], || {
                room.and_then(|r| room_info(&shared, &r, &req))
                    .unwrap_or_else(|e| e.response())
            })
        }
        ["api", "rooms", room, "messages"] => {
            if method != Method::POST && method != Method::GET {
                return method_not_allowed(&[Method::GET, Method::POST]);
            }
            match decode_room(room) {
                Ok(room) if method == Method::GET => match read_refusal(&shared, &room, &req) {
                    None => history_page(&shared, room, &req)
                        .await
                        .unwrap_or_else(|e| e.response()),
                    Some(refusal) => refusal,
                },
                Ok(room) => publish(&shared, &room, req).await,
                Err(e) => e.response(),
            }
        }
        ["ws"] | ["ws", _] => {
            if method != Method::GET {
                return method_not_allowed(&[Method::GET]);
            }
            let wanted = parse_ws_target(&path, req.uri().query()).and_then(|t| {
                let replay = requested_replay(&req, t.room.is_some())?;
                Ok((t, replay))
            });
            match wanted {
                Ok((WsTarget { room, user }, replay)) => {
                    websocket(shared, peer, req, room, replay, user).await
                }
                Err(e) => e.response(),
            }
        }
        ["echo"] if shared.config.echo => {
            if method != Method::GET {
                return method_not_allowed(&[Method::GET]);
            }
            match parse_user(req.uri().query()) {
                Ok(user) => upgrade(shared, peer, req, Wanted::Echo, None, user).await,
                Err(e) => e.response(),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

fn only(method: &Method, allowed: &[Method], f: impl FnOnce() -> Response<Body>) -> Response<Body> {
    if allowed.contains(method) {
        f()
    } else {
        method_not_allowed(allowed)
    }
}

fn method_not_allowed(allowed: &[Method]) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    );
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(ALLOW, v);
    }
    resp
}

/// A JSON body with the right content type.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A refused request: status, machine-readable code, human reason. Turned into a JSON response
/// only at the edge, so handlers can use `?`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    reason: Cow<'static, str>,
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
        }
    }

    pub fn response(&self) -> Response<Body> {
        error(self.status, self.code, &self.reason)
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
}

/// The error body every refusal uses: `{"error": code, "reason": text}`.
pub fn error(status: StatusCode, code: &str, reason: &str) -> Response<Body> {
    json_response(status, &json!({"error": code, "reason": reason}))
}

fn html(page: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(page.as_bytes())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// The first value of `key` in the query string, percent-decoded.
pub(crate) fn query_param<'a>(req: &'a Request<Incoming>, key: &str) -> Option<Cow<'a, str>> {
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// A numeric query parameter in `range`, `default` when absent.
pub(crate) fn number_param(
    req: &Request<Incoming>,
    key: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    match query_param(req, key) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_param",
                    format!(
                        "`{key}` must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    }
}

/// A room name from a path segment: percent-decoded, then validated (`$` names refused).
pub(crate) fn decode_room(raw: &str) -> Result<String, ApiError> {
    decode_room_with(raw, validate_room)
}

/// A room name from a path segment, percent-decoded, then checked by `validate`.
pub(crate) fn decode_room_with(
    raw: &str,
    validate: fn(&str) -> Result<(), crate::names::NameError>,
) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_room",
                "room name is not valid UTF-8",
            )
        })?;
    validate(&decoded)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.room_code(), e.room_reason()))?;
    Ok(decoded.into_owned())
}

fn metrics(shared: &Shared) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(shared.stats.prometheus_text())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

fn stats(shared: &Shared) -> Response<Body> {
    json_response(StatusCode::OK, &stats_json(shared))
}

/// This process's figures (cluster mode adds the cluster's to them).
pub(crate) fn stats_json(shared: &Shared) -> serde_json::Value {
    let s = &shared.stats;
    json!({
            "connections": s.connections.get(),
            "rooms": shared.hub.room_count(),
            "messages_in": s.messages_in.get(),
            "published": s.published.get(),
            "frames_out": s.frames_out.get(),
            "writes": s.writes.get(),
            "frames_encoded": s.frames_encoded.get(),
            "evictions": s.evictions.get(),
            "connections_refused": s.connections_refused.get(),
            "rate_limited": s.rate_limited.get(),
            "auth_refused": s.auth_refused.get(),
            "duplicates": s.duplicates.get(),
            "lag_resyncs": s.lag_resyncs.get(),
            "history_db_written": s.history_db_written.get(),
            "history_db_dropped": s.history_db_dropped.get(),
            "rss_bytes": rss_bytes(),
            // User + system CPU seconds since start: a load test divides deliveries by its
            // change over a window (server cost per delivery).
            "cpu_seconds": cpu_seconds(),
            "uptime_secs": s.uptime().as_secs(),
    })
}

fn list_rooms(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    let limit = match number_param(req, "limit", 100, 1..=1000) {
        Ok(n) => n as usize,
        Err(e) => return e.response(),
    };
    let (rooms, total) = shared.hub.list(limit);
    let rooms: Vec<_> = rooms
        .iter()
        .map(|(r, n)| json!({"room": r.name(), "members": n}))
        .collect();
    json_response(StatusCode::OK, &json!({"rooms": rooms, "total": total}))
}

/// The `users_limit` (1–1000, default 100) and `users_after` (a member id) of a room-info
/// request: one page of the room's users.
pub(crate) fn users_page(req: &Request<Incoming>) -> Result<(usize, Option<u64>), ApiError> {
    let limit = number_param(req, "users_limit", 100, 1..=1000)? as usize;
    let after = match query_param(req, "users_after") {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_param",
                "`users_after` must be a member id",
            )
        })?),
    };
    Ok((limit, after))
}

fn room_info(
    shared: &Shared,
    room: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (limit, after) = users_page(req)?;
    let Some(room) = shared.hub.get(room) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_room",
            "no room of that name has members",
        ));
    };
    let info = room.info(limit, after);
    let value = serde_json::to_value(&info).unwrap_or_default();
    Ok(json_response(StatusCode::OK, &value))
}

/// `GET /api/rooms/{room}/messages?limit=&before=`: kept messages, newest first. The room's
/// ring answers first; older pages come from the archive when there is one. Messages are the
/// JSON payloads exactly as they were broadcast (no re-encoding).
async fn history_page(
    shared: &Arc<Shared>,
    room: String,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let limit = number_param(req, "limit", 50, 1..=1000)? as usize;
    let before = match query_param(req, "before") {
        None => u64::MAX,
        Some(v) => v.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_param",
                "`before` must be a positive integer (a seq)",
            )
        })?,
    };
    let history = shared.hub.history().clone();
    let live = shared.hub.get(&room);
    if live.is_none() && history.archive().is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_such_room",
            "no room of that name has members",
        ));
    }
    // One more than asked, to know whether there is a next page.
    let mut page: Vec<(u64, Bytes)> = Vec::new();
    let mut older_than = before;
    if let Some(room) = &live {
        let (frames, ring_first) = room.history_page(before, limit + 1);
        page.extend(frames.iter().map(|o| (o.seq, payload_of(o))));
        if let Some(first) = ring_first {
            older_than = older_than.min(first);
        }
    }
    if page.len() <= limit && history.archive().is_some() {
        let want = limit + 1 - page.len();
        let name = room.clone();
        let rows = tokio::task::spawn_blocking(move || match history.archive() {
            Some(archive) => archive.page(&name, older_than, want),
            None => Ok(Vec::new()),
        })
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "history read failed",
            )
        })?
        .map_err(|e| {
            tracing::warn!(error = %e, "history page read failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "history_unavailable",
                "the history database could not be read",
            )
        })?;
        page.extend(rows.into_iter().map(|(seq, p)| (seq, Bytes::from(p))));
    }
    let more = page.len() > limit;
    page.truncate(limit);
    let next_before = match (more, page.last()) {
        (true, Some((seq, _))) => seq.to_string(),
        _ => "null".to_owned(),
    };
    let room_json = serde_json::to_string(&room).unwrap_or_default();
    let mut body = Vec::with_capacity(64 + page.iter().map(|(_, p)| p.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"room\":");
    body.extend_from_slice(room_json.as_bytes());
    body.extend_from_slice(b",\"messages\":[");
    for (i, (_, payload)) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(payload);
    }
    body.extend_from_slice(b"],\"next_before\":");
    body.extend_from_slice(next_before.as_bytes());
    body.push(b'}');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Why the request may not read `room`'s messages, if it may not: reading is for whoever could
/// join the room. A request carrying `--api-key` reads any room (backends); otherwise
/// `--jwt-secret` needs a token (`Authorization: Bearer` or `?token=`) that allows the room
/// (401/403), and a room with a password needs it as `?password=` (403 `bad_password`), as on
/// the upgrade URL.
fn read_refusal(shared: &Shared, room: &str, req: &Request<Incoming>) -> Option<Response<Body>> {
    if let Some(key) = shared.config.api_key.as_deref() {
        if auth::api_key_matches(req.headers(), key) {
            return None;
        }
    }
    if let Some(verifier) = &shared.auth {
        let query_token = query_param(req, "token");
        let Some((token, _)) = auth::find_token(req.headers(), query_token.as_deref()) else {
            shared.stats.auth_refused.inc();
            return Some(unauthorized(&AuthError::Missing));
        };
        let grant = match verifier.verify(token) {
            Ok(grant) => grant,
            Err(e) => {
                shared.stats.auth_refused.inc();
                return Some(unauthorized(&e));
            }
        };
        if !grant.allows(room) {
            shared.stats.auth_refused.inc();
            return Some(error(
                StatusCode::FORBIDDEN,
                "forbidden_room",
                "the access token does not allow this room",
            ));
        }
    }
    let expected = shared.hub.settings().resolve(room).password?;
    let e = match query_param(req, "password") {
        Some(given) if expected.matches(&given) => return None,
        Some(_) => crate::hub::JoinError::WrongPassword,
        None => crate::hub::JoinError::PasswordRequired,
    };
    Some(error(StatusCode::FORBIDDEN, e.code(), &e.to_string()))
}

/// `history=N` or `since=SEQ` on a chat upgrade URL; only with a room to join.
fn requested_replay(
    req: &Request<Incoming>,
    has_room: bool,
) -> Result<Option<ReplayRequest>, ApiError> {
    let bad = |reason: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_param", reason);
    let history = match query_param(req, "history") {
        None => None,
        Some(v) => Some(
            v.parse::<u32>()
                .map_err(|_| bad("`history` must be a non-negative integer".into()))?,
        ),
    };
    let since = match query_param(req, "since") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| bad("`since` must be a non-negative integer (a seq)".into()))?,
        ),
    };
    let replay = ReplayRequest::from_parts(history, since).map_err(bad)?;
    if replay.is_some() && !has_room {
        return Err(bad("`history` and `since` need a room to join".into()));
    }
    Ok(replay)
}

#[derive(Deserialize)]
struct PublishBody {
    text: Option<serde_json::Value>,
    user: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
}

async fn publish(shared: &Shared, room: &str, req: Request<Incoming>) -> Response<Body> {
    if let Some(key) = shared.config.api_key.as_deref() {
        if !auth::api_key_matches(req.headers(), key) {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs `Authorization: Bearer <api key>`",
            );
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    let max = shared.config.max_message_bytes as usize;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "body is larger than --max-message-bytes",
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "could not read the request body",
            )
        }
    };
    let parsed: PublishBody = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("body is not a JSON object: {e}"),
            )
        }
    };
    let Some(serde_json::Value::String(text)) = parsed.text else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_message",
            "`text` must be a string",
        );
    };
    if text.is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_message", "`text` is empty");
    }
    let user = match parsed.user {
        None => "api".to_owned(),
        Some(serde_json::Value::String(u)) => match validate_user(&u) {
            Ok(()) => u,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_user", e.user_reason()),
        },
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_user",
                "`user` must be a string",
            )
        }
    };
    let id = match parsed.id {
        None => None,
        Some(serde_json::Value::String(id)) => match crate::dedupe::validate_id(&id) {
            Ok(()) => Some(id),
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_id", e),
        },
        Some(_) => return error(StatusCode::BAD_REQUEST, "bad_id", "`id` must be a string"),
    };
    let local = shared.hub.get(room);
    // The room's limit is checked before the message goes anywhere (in cluster mode, before
    // Redis; a room with no member here has no limiter here).
    if let Some(Err(wait)) = local.as_ref().map(|r| r.admit()) {
        return rate_limited(wait);
    }
    if let Some(cluster) = &shared.cluster {
        return crate::cluster::api::publish(shared, cluster, room, &user, &text, id.as_deref())
            .await;
    }
    let Some(room_ref) = local else {
        return error(
            StatusCode::NOT_FOUND,
            "no_such_room",
            "no room of that name has members",
        );
    };
    let published = room_ref.publish_message(&Publish {
        user: &user,
        text: &text,
        id: id.as_deref(),
        origin: 0,
        skip_origin: false,
    });
    json_response(
        StatusCode::ACCEPTED,
        &published_json(room, published.seq, id.as_deref(), published.duplicate),
    )
}

/// The 202 answer of a REST publish: `{"room","seq"}`, plus `id` and `duplicate` when the
/// message carried an id.
pub(crate) fn published_json(
    room: &str,
    seq: u64,
    id: Option<&str>,
    duplicate: bool,
) -> serde_json::Value {
    match id {
        None => json!({"room": room, "seq": seq}),
        Some(id) => json!({"room": room, "seq": seq, "id": id, "duplicate": duplicate}),
    }
}

/// 429 with `Retry-After` (whole seconds, rounded up) and `retry_after_ms` in the body.
fn rate_limited(wait: std::time::Duration) -> Response<Body> {
    let ms = retry_after_ms(wait);
    let mut resp = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({
            "error": "rate_limited",
            "reason": "the room's --room-rate-limit is reached",
            "retry_after_ms": ms,
        }),
    );
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
    resp
}

/// Checks a chat upgrade (token, room grant) and upgrades it. `first_room` is already valid;
/// `replay` (`history`/`since`) is taken with the first room's join.
async fn websocket(
    shared: Arc<Shared>,
    peer: IpAddr,
    req: Request<Incoming>,
    first_room: Option<String>,
    replay: Option<ReplayRequest>,
    user: Option<String>,
) -> Response<Body> {
    let grant = match &shared.auth {
        None => None,
        Some(verifier) => {
            let query_token = query_param(&req, "token");
            let Some((token, _)) = auth::find_token(req.headers(), query_token.as_deref()) else {
                shared.stats.auth_refused.inc();
                return unauthorized(&AuthError::Missing);
            };
            let grant = match verifier.verify(token) {
                Ok(grant) => grant,
                Err(e) => {
                    shared.stats.auth_refused.inc();
                    return unauthorized(&e);
                }
            };
            if let Some(room) = &first_room {
                if !grant.allows(room) {
                    shared.stats.auth_refused.inc();
                    return error(
                        StatusCode::FORBIDDEN,
                        "forbidden_room",
                        "the access token does not allow this room",
                    );
                }
            }
            if user.as_deref().is_some_and(|u| u != &*grant.user) {
                shared.stats.auth_refused.inc();
                return error(
                    StatusCode::FORBIDDEN,
                    "forbidden_user",
                    "the user name comes from the access token's `sub`",
                );
            }
            Some(Arc::new(grant))
        }
    };
    upgrade(
        shared,
        peer,
        req,
        Wanted::Rooms { first_room, replay },
        grant,
        user,
    )
    .await
}

/// What an upgrade request asks for, before anything is granted.
enum Wanted {
    /// The chat protocol; the first room's name is already valid. `replay` is only asked for
    /// with a first room.
    Rooms {
        first_room: Option<String>,
        replay: Option<ReplayRequest>,
    },
    Echo,
}

fn unauthorized(e: &AuthError) -> Response<Body> {
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Whether the browser `Origin` of the request may open a WebSocket (`--allowed-origins`).
fn origin_allowed(shared: &Shared, req: &Request<Incoming>) -> bool {
    let allowed = &shared.config.allowed_origins;
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

/// Whether the client offered the `roomcast` subprotocol (then the response selects it).
fn offers_subprotocol(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == auth::SUBPROTOCOL)
}

/// Checks and upgrades a WebSocket request. The first room is joined here, before the 101, so a
/// wrong password or a full room is an HTTP 403 and leaves no membership behind.
async fn upgrade(
    shared: Arc<Shared>,
    peer: IpAddr,
    mut req: Request<Incoming>,
    wanted: Wanted,
    grant: Option<Arc<Grant>>,
    user: Option<String>,
) -> Response<Body> {
    // With auth on, the user name is the token's `sub` (a different `user=` was refused).
    let user = match &grant {
        Some(grant) => Some(grant.user.to_string()),
        None => user,
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        );
    }
    if shared.shutdown.is_shutdown() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        );
    }
    if !origin_allowed(&shared, &req) {
        return error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin is not in --allowed-origins",
        );
    }
    let ip = match &shared.per_ip {
        Some(per_ip) => {
            if !per_ip.try_acquire(peer) {
                shared.stats.connections_refused.inc();
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections_from_ip",
                    "this address holds --max-connections-per-ip connections",
                );
            }
            Some(peer)
        }
        None => None,
    };
    let stats = &shared.stats;
    // From here on the guard gives back the per-IP count and the gauge on every path.
    stats.connections.inc();
    let guard = ConnectionGuard {
        shared: shared.clone(),
        ip,
    };
    if stats.connections.get() > shared.config.max_connections as i64 {
        stats.connections_refused.inc();
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server is at --max-connections",
        );
    }
    let select_protocol = offers_subprotocol(&req);
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let id = shared.next_id();
    let user: Arc<str> = user.unwrap_or_else(|| format!("anon-{id}")).into();
    let mode = match wanted {
        Wanted::Echo => Mode::Echo,
        Wanted::Rooms {
            first_room: None, ..
        } => Mode::Rooms { first: None, grant },
        Wanted::Rooms {
            first_room: Some(room),
            replay,
        } => {
            // The password travels in the query only; it is never logged. The replay is taken
            // with the membership (atomic with publishing) and written after the welcome.
            let password = query_param(&req, "password");
            match crate::connection::join_room(
                &shared,
                &room,
                id,
                &user,
                password.as_deref(),
                replay,
            )
            .await
            {
                Ok(joined) => Mode::Rooms {
                    first: Some(joined),
                    grant,
                },
                Err(e) => return error(StatusCode::FORBIDDEN, e.code(), &e.to_string()),
            }
        }
    };
    let shutdown = shared.shutdown.clone();
    tokio::spawn(crate::connection::run(Box::new(Accepted {
        shared,
        upgrade,
        id,
        user,
        mode,
        shutdown,
        guard,
    })));
    let (mut parts, _) = response.into_parts();
    if select_protocol {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(auth::SUBPROTOCOL),
        );
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}
