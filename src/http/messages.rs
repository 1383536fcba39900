//! `GET /api/rooms/{room}/messages` (kept messages, newest first) and
//! `POST /api/rooms/{room}/messages` (publish from a backend).

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::query::{self, bounded};
use super::read::read_body;
use super::reply::{self, ApiError, Reply};
use super::{may_read_room, no_such_room, room_password, Api};
use crate::bus::{Fallback, PublishError};
use crate::core::archive::payload_of;
use crate::core::auth::Grant;
use crate::core::dedupe::Author;
use crate::core::room::Publish;
use crate::core::stats::AuthReason;
use crate::proto::names::validate_user;
use crate::proto::Epoch;

/// Most bytes of messages in one page: a client that never reads pins at most this much (in
/// the kernel's socket buffer), whatever `limit` it asks for.
pub const PAGE_MAX_BYTES: usize = 1 << 20;

/// A page of kept messages: each is the JSON payload exactly as it was broadcast.
#[derive(Serialize)]
struct Page<'a> {
    room: &'a str,
    /// What the seqs count in: the live room's epoch, or that of its last archived message
    /// (`null`: the room has no message anywhere).
    epoch: Option<Epoch>,
    messages: Vec<&'a RawValue>,
    next_before: Option<u64>,
}

/// Kept messages, newest first. The room's ring answers first; older pages come from the
/// archive when there is one. Reading is for whoever could join the room (see `may_read`).
pub async fn page(api: &Api, peer: IpAddr, room: String, req: &Request<Incoming>) -> Reply {
    let q: query::Messages = query::parse(req)?;
    may_read_room(
        api,
        req,
        peer,
        &room,
        q.token.as_deref(),
        q.password.as_deref(),
        q.user.as_deref(),
    )?;
    let limit = bounded("limit", q.limit, 50, 1, 1000)? as usize;
    let before = bounded("before", q.before, u64::MAX, 1, u64::MAX).map_err(|_| {
        ApiError::bad_request("bad_param", "`before` must be a positive integer (a seq)")
    })?;
    let hub = api.bus.hub();
    let history = hub.history().clone();
    let live = hub.get(&room);
    if live.is_none() && history.archive().is_none() {
        return Err(no_such_room());
    }
    let mut epoch = live.as_ref().map(|r| r.epoch());
    // One more than asked, to know whether there is a next page.
    let mut rows: Vec<(u64, Bytes)> = Vec::new();
    let mut older_than = before;
    if let Some(room) = &live {
        let (frames, ring_first) = room.history_page(before, limit + 1);
        rows.extend(frames.iter().map(|o| (o.seq, payload_of(o))));
        if let Some(first) = ring_first {
            older_than = older_than.min(first);
        }
    }
    if let Some(archive) = history.archive().filter(|_| rows.len() <= limit) {
        let want = limit + 1 - rows.len();
        let name = room.clone();
        // A flood of page reads queues here, not on the blocking pool.
        let slot = archive.page_slot().await;
        let read = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            match history.archive() {
                Some(archive) => archive.page(&name, older_than, want),
                None => Ok((Vec::new(), None)),
            }
        });
        let archived = read
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
        let (archived, archived_epoch) = archived;
        epoch = epoch.or(archived_epoch);
        rows.extend(archived.into_iter().map(|(seq, p)| (seq, Bytes::from(p))));
    }
    let mut more = rows.len() > limit;
    rows.truncate(limit);
    // A page is bounded in bytes too: whole messages up to `PAGE_MAX_BYTES` (at least one),
    // and `next_before` continues where it stopped.
    let mut bytes = 0;
    let fit = rows
        .iter()
        .position(|(_, p)| {
            bytes += p.len();
            bytes > PAGE_MAX_BYTES
        })
        .map_or(rows.len(), |i| i.max(1));
    if fit < rows.len() {
        rows.truncate(fit);
        more = true;
    }
    // Our own frames: a payload that is not JSON would be a bug, and is left out, not sent.
    let messages = rows
        .iter()
        .filter_map(|(_, p)| serde_json::from_slice::<&RawValue>(p).ok())
        .collect();
    let page = Page {
        room: &room,
        epoch,
        messages,
        next_before: rows.last().filter(|_| more).map(|(seq, _)| *seq),
    };
    Ok(reply::json(StatusCode::OK, &page))
}

/// Who a REST publish speaks for.
enum Publisher {
    /// Presented `--api-key`: any room, any `user`.
    Key,
    /// Presented an access token that allows the room: publishes as its `sub`.
    Token(Grant),
    /// Neither tokens nor an API key are configured: REST publishing is open (the server
    /// warns at start).
    Open,
}

/// Who may publish into `room` over REST, before the body is read. With `--jwt-secret`, the API
/// key or a bearer token that allows the room (401/403 from `Access::grant`); with only
/// `--api-key`, the key (401). The token is taken from `Authorization` only: a backend can set
/// headers, and a token in a URL ends up in logs. All refusals count in `auth_refused`.
fn may_publish(
    api: &Api,
    peer: IpAddr,
    room: &str,
    req: &Request<Incoming>,
) -> Result<Publisher, ApiError> {
    if api.access.has_api_key(req) {
        return Ok(Publisher::Key);
    }
    match api.access.grant(req, peer, None, Some(room))? {
        Some(grant) => Ok(Publisher::Token(grant)),
        None if api.access.api_key_on() => Err(api.access.need_api_key()),
        None => Ok(Publisher::Open),
    }
}

/// The body of a REST publish. Values are checked one by one so that each has its own error.
#[derive(Deserialize)]
struct PublishBody {
    text: Option<serde_json::Value>,
    user: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    /// The room's password (or `?password=`), for callers without the API key.
    password: Option<serde_json::Value>,
}

/// The 202 answer of a REST publish: `id` and `duplicate` only when the message carried an id.
#[derive(Serialize)]
struct Accepted<'a> {
    room: &'a str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
}

/// Publishes a backend's message into `room` (every process's members, in cluster mode).
/// Who may publish: see `may_publish`; a room with a password needs it too, unless the caller
/// holds the API key.
pub async fn publish(api: &Arc<Api>, peer: IpAddr, room: &str, req: Request<Incoming>) -> Reply {
    let publisher = may_publish(api, peer, room, &req)?;
    let q: query::Publish = query::parse(&req)?;
    let header_password = room_password(&req, q.password.as_deref()).map(str::to_owned);
    let body = read_body(
        req,
        api.max_message_bytes,
        "--max-message-bytes",
        api.body_timeout,
    )
    .await
    .inspect_err(|e| {
        if e.code() == "body_timeout" {
            api.stats.dropped.body_timeouts.inc();
        }
    })?;
    let parsed: PublishBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("bad_json", format!("body is not a JSON object: {e}"))
    })?;
    if !matches!(publisher, Publisher::Key) {
        let password = match &parsed.password {
            None => header_password.as_deref(),
            Some(serde_json::Value::String(p)) => Some(p.as_str()),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "bad_password",
                    "`password` must be a string",
                ))
            }
        };
        let settings = api.bus.hub().settings().resolve(room);
        api.access
            .password(peer, room, settings.password.as_ref(), password)?;
    }
    let text = match parsed.text {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t,
        Some(serde_json::Value::String(_)) => {
            return Err(ApiError::bad_request("bad_message", "`text` is empty"))
        }
        _ => {
            return Err(ApiError::bad_request(
                "bad_message",
                "`text` must be a string",
            ))
        }
    };
    let user = match parsed.user {
        None => None,
        Some(serde_json::Value::String(u)) => {
            validate_user(&u).map_err(|e| ApiError::bad_request("bad_user", e.user_reason()))?;
            Some(u)
        }
        Some(_) => return Err(ApiError::bad_request("bad_user", "`user` must be a string")),
    };
    // A token speaks for its `sub` alone, as on the upgrade: another name is refused rather
    // than replaced, so a caller never believes it published as someone it is not.
    let (user, author) = match &publisher {
        Publisher::Token(grant) => {
            if user.as_deref().is_some_and(|u| u != &*grant.user) {
                api.access.count(AuthReason::ForbiddenUser);
                return Err(ApiError::forbidden(
                    "forbidden_user",
                    "the user name comes from the access token's `sub`",
                ));
            }
            (grant.user.to_string(), Author::User(&grant.user))
        }
        Publisher::Key | Publisher::Open => (user.unwrap_or_else(|| "api".to_owned()), Author::Api),
    };
    // Open publishing speaks for whoever it names, but a direct-message room still hears only
    // from the users it lists (a token's `sub` was checked by the grant; the key may do all).
    if matches!(publisher, Publisher::Open) {
        api.access.direct(room, &user)?;
    }
    let id = match parsed.id {
        None => None,
        Some(serde_json::Value::String(id)) => {
            crate::proto::validate_id(&id).map_err(|e| ApiError::bad_request("bad_id", e))?;
            Some(id)
        }
        Some(_) => return Err(ApiError::bad_request("bad_id", "`id` must be a string")),
    };
    let message = Publish {
        user: &user,
        text: &text,
        id: id.as_deref(),
        author,
        origin: 0,
        skip_origin: false,
    };
    match api.bus.publish(room, &message, Fallback::Nothing).await {
        Ok(p) => Ok(reply::json(
            StatusCode::ACCEPTED,
            &Accepted {
                room,
                seq: p.seq,
                id: id.as_deref(),
                duplicate: id.is_some().then_some(p.duplicate),
            },
        )),
        Err(PublishError::RateLimited(wait)) => Err(ApiError::rate_limited(
            "the room's --room-rate-limit is reached",
            wait,
        )),
        Err(PublishError::NoSuchRoom) => Err(no_such_room()),
        Err(PublishError::Unavailable { reason, .. }) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            format!("{reason}: nothing was published"),
        )),
    }
}
