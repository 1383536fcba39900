//! The WebSocket upgrade: every check before the 101 (token, origin, per-IP and global caps,
//! the first room's admission), then the socket is handed to its connection task.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};

use super::query;
use super::reply::{ApiError, Body, Reply};
use super::target::{parse_user, parse_ws_target, routed_ws_target, WsTarget};
use super::Api;
use crate::bus::JoinRequest;
use crate::conn::{self, Accepted, ConnectionGuard, Mode};
use crate::core::auth::{self, Grant};
use crate::core::room::Joined;
use crate::core::stats::AuthReason;
use crate::proto::ReplayRequest;
use crate::ws::deflate;

/// `GET /ws`, `/ws/{room}`: the chat protocol. With tokens on, the user name is the token's
/// `sub` (a different `user=` is refused) and the first room must be allowed.
pub async fn chat(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>) -> Reply {
    admit(&api, &req)?;
    let target = parse_ws_target(req.uri().path(), req.uri().query())?;
    chat_in(api, peer, req, target).await
}

/// A chat upgrade on a route template's path, into the `room` the template made (already
/// valid): from here on exactly as `/ws/{room}`.
pub async fn routed(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>, room: String) -> Reply {
    admit(&api, &req)?;
    let target = routed_ws_target(room, req.uri().query())?;
    chat_in(api, peer, req, target).await
}

/// The chat protocol into `target`: every check after the accept rate and the target's own.
async fn chat_in(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>, target: WsTarget) -> Reply {
    let WsTarget { room, user } = target;
    let q: query::Upgrade = query::parse(&req)?;
    let replay = ReplayRequest::from_parts(q.history, q.since, q.epoch.as_deref())
        .map_err(|reason| ApiError::bad_request("bad_param", reason))?;
    if replay.is_some() && room.is_none() {
        return Err(ApiError::bad_request(
            "bad_param",
            "`history` and `since` need a room to join",
        ));
    }
    let grant = api
        .access
        .grant(&req, peer, q.token.as_deref(), room.as_deref())?;
    let user = match &grant {
        Some(grant) => {
            if user.as_deref().is_some_and(|u| u != &*grant.user) {
                api.access.count(AuthReason::ForbiddenUser);
                return Err(ApiError::forbidden(
                    "forbidden_user",
                    "the user name comes from the access token's `sub`",
                ));
            }
            Some(grant.user.to_string())
        }
        None => user,
    };
    // The subprotocol carries the password off the URL (proxies log URLs); the query's is
    // still read, for clients that can set neither headers nor subprotocols.
    let password = match auth::find_password(req.headers()) {
        Ok(Some(p)) => Some(p),
        Ok(None) => q.password,
        Err(e) => return Err(ApiError::bad_request("bad_password", e.to_string())),
    };
    let wanted = Wanted::Rooms {
        first_room: room,
        replay,
        password,
    };
    upgrade(api, peer, req, wanted, grant.map(Arc::new), user).await
}

/// `GET /echo` (`--echo` only): echoes every message, for conformance runs.
pub async fn echo(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>) -> Reply {
    admit(&api, &req)?;
    let user = parse_user(req.uri().query())?;
    upgrade(api, peer, req, Wanted::Echo, None, user).await
}

/// `--accept-rate`, checked first: a storm of upgrades is refused before any token is verified
/// or any room is looked up. Requests that are not upgrades do not count (they are refused
/// later, with 400).
fn admit<B>(api: &Api, req: &Request<B>) -> Result<(), ApiError> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Ok(());
    }
    accept_rate(api)
}

/// 503 `accept_rate` past `--accept-rate` (WebSocket upgrades and event streams together).
pub(super) fn accept_rate(api: &Api) -> Result<(), ApiError> {
    let Some(accept) = &api.accept else {
        return Ok(());
    };
    accept.check().map_err(|not_until| {
        api.stats.accept_rate_refused.inc();
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "accept_rate",
            "the server is accepting new connections at --accept-rate: retry later",
        )
        .retry_after(wait)
    })
}

/// What an upgrade request asks for, before anything is granted.
enum Wanted {
    /// The chat protocol; the first room's name is already valid. `replay` is only asked for
    /// with a first room. The password came as a subprotocol or in the query; it is never
    /// logged.
    Rooms {
        first_room: Option<String>,
        replay: Option<ReplayRequest>,
        password: Option<String>,
    },
    Echo,
}

/// Whether the client offered the `roomcast` subprotocol (then the response selects it).
fn offers_subprotocol<B>(req: &Request<B>) -> bool {
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
    api: Arc<Api>,
    peer: IpAddr,
    mut req: Request<Incoming>,
    wanted: Wanted,
    grant: Option<Arc<Grant>>,
    user: Option<String>,
) -> Reply {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(ApiError::bad_request(
            "bad_request",
            "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        ));
    }
    let cx = &api.conn;
    let guard = hold_connection(&api, peer, &req)?;
    let select_protocol = offers_subprotocol(&req);
    // permessage-deflate: the client's first acceptable offer, if compression is on.
    let deflate = cx.limits.compression.and_then(|_| {
        let offers = req.headers().get_all(SEC_WEBSOCKET_EXTENSIONS);
        deflate::negotiate(offers.iter().map(HeaderValue::as_bytes))
    });
    // Our own text and a number, so always a valid header value; were it not, the socket
    // would simply not compress.
    let extensions = deflate.and_then(|agreed| HeaderValue::from_str(&agreed.response()).ok());
    let deflate = deflate.filter(|_| extensions.is_some());
    let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| ApiError::bad_request("bad_request", e.to_string()))?;
    let id = api.next_id();
    let user: Arc<str> = user.unwrap_or_else(|| format!("anon-{id}")).into();
    let mode = match wanted {
        Wanted::Echo => Mode::Echo,
        Wanted::Rooms {
            first_room: None, ..
        } => Mode::Rooms { first: None, grant },
        Wanted::Rooms {
            first_room: Some(room),
            replay,
            password,
        } => {
            // The replay is taken with the membership (atomic with publishing) and written
            // after the welcome.
            let req = JoinRequest {
                name: &room,
                id,
                user: &user,
                password: password.as_deref(),
                replay,
                grant: grant.as_deref(),
            };
            let joined = join_room(&api, peer, req).await?;
            Mode::Rooms {
                first: Some(joined),
                grant,
            }
        }
    };
    tokio::spawn(conn::run(Box::new(Accepted {
        cx: cx.clone(),
        upgrade,
        id,
        user,
        mode,
        guard,
        deflate,
    })));
    let (mut parts, _) = response.into_parts();
    if select_protocol {
        parts.headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(auth::SUBPROTOCOL),
        );
    }
    if let Some(value) = extensions {
        parts.headers.insert(SEC_WEBSOCKET_EXTENSIONS, value);
    }
    Ok(Response::from_parts(parts, Body::full(Bytes::new())))
}

/// The checks every long-lived connection passes (a WebSocket before its 101, an event stream
/// before its 200): not shutting down (503), an allowed `Origin` (403), `--max-connections-per-ip`
/// (429) and `--max-connections` (503). The guard counts the connection until it is dropped.
pub(super) fn hold_connection<B>(
    api: &Api,
    peer: IpAddr,
    req: &Request<B>,
) -> Result<ConnectionGuard, ApiError> {
    let cx = &api.conn;
    if cx.shutdown.is_shutdown() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    if !api.access.origin_allowed(req) {
        return Err(ApiError::forbidden(
            "origin_not_allowed",
            "this Origin is not in --allowed-origins",
        ));
    }
    let ip = match &cx.per_ip {
        Some(per_ip) => {
            if !per_ip.try_acquire(peer) {
                api.stats.connections_refused.inc();
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections_from_ip",
                    "this address holds --max-connections-per-ip connections",
                ));
            }
            Some(peer)
        }
        None => None,
    };
    // From here on the guard gives back the per-IP count and the gauge on every path.
    api.stats.connections.inc();
    let guard = ConnectionGuard {
        cx: Some(cx.clone()),
        ip,
    };
    if api.stats.connections.get() > api.max_connections as i64 {
        api.stats.connections_refused.inc();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server is at --max-connections",
        ));
    }
    Ok(guard)
}

/// Joins the first room of a connection before it is answered, so that a refusal is a status:
/// 429 while the address is locked out of the room, 403 for a password or a token, 503 for a
/// cap (`room_full`, `max_rooms`). A wrong password counts towards the lockout.
pub(super) async fn join_room(
    api: &Api,
    peer: IpAddr,
    req: JoinRequest<'_>,
) -> Result<Joined, ApiError> {
    api.access.not_locked(peer, req.name)?;
    let room = req.name;
    api.bus.join(req).await.map_err(|e| {
        api.access.join_refused(peer, room, &e);
        let status = if e.is_capacity() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::FORBIDDEN
        };
        ApiError::new(status, e.code(), e.to_string())
    })
}
