//! HTTP: the route table, the JSON API, the web page and the WebSocket upgrade. Every check on
//! an upgrade happens here, before the 101, so a refusal is a status code and a JSON body.
//!
//! One file per resource: `status` (health, stats, metrics), `rooms` (list and info),
//! `messages` (history pages and REST publish), `upgrade` (the WebSocket handshake). `reply`
//! shapes every answer, `query` reads query strings, `access` decides who may do what.

mod access;
pub mod accounts;
mod body;
mod cors;
mod messages;
mod query;
mod read;
mod reply;
mod rooms;
mod sse;
mod status;
pub mod target;
mod upgrade;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::DefaultDirectRateLimiter;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

pub use access::Access;
pub use reply::{ApiError, Body};

use crate::bus::Bus;
use crate::config::rate::RateSpec;
use crate::conn;
use crate::core::limit::limiter;
use crate::core::stats::Stats;
use crate::proto::names::{validate_room, NameError};
use reply::Reply;

/// What the HTTP layer needs; built once by `server::run`.
pub struct Api {
    pub bus: Arc<Bus>,
    pub stats: Arc<Stats>,
    pub access: Access,
    /// Handed to every connection task an upgrade starts.
    pub conn: Arc<conn::Context>,
    /// `--max-connections`: 503 past it.
    pub max_connections: usize,
    /// `--max-message-bytes`: 413 for a larger REST body.
    pub max_message_bytes: usize,
    /// `--echo`: the `/echo` route exists.
    pub echo: bool,
    /// `--admin-listen` is set: `/metrics` and `/api/stats` are served there only.
    admin_apart: bool,
    /// `--accept-rate`: upgrades past it get 503 before any other work.
    accept: Option<DefaultDirectRateLimiter>,
    /// `--body-timeout`: 408 for a REST body that has not arrived whole by then.
    pub body_timeout: Duration,
    next_id: AtomicU64,
    /// `--sse-heartbeat`: an event stream with nothing to send for this long sends a comment.
    pub sse_heartbeat: Duration,
    /// `--cors-origins`: which other origins' pages may read (and, listed, write) the API.
    cors: Option<cors::Cors>,
    /// `--accounts-db`: the account routes; `None` answers them 404 `accounts_off`.
    accounts: Option<accounts::AccountRoutes>,
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `--listen`: clients, backends, and (without `--admin-listen`) operators.
    Public,
    /// `--admin-listen`: health, stats and metrics, nothing else.
    Admin,
}

impl Api {
    pub fn new(
        bus: Arc<Bus>,
        stats: Arc<Stats>,
        access: Access,
        conn: Arc<conn::Context>,
        max_connections: usize,
        max_message_bytes: usize,
        echo: bool,
    ) -> Self {
        Api {
            bus,
            stats,
            access,
            conn,
            max_connections,
            max_message_bytes,
            echo,
            admin_apart: false,
            accept: None,
            body_timeout: Duration::from_secs(10),
            next_id: AtomicU64::new(1),
            sse_heartbeat: Duration::from_secs(15),
            cors: None,
            accounts: None,
        }
    }

    /// Applies `--cors-origins` to the REST API (`/api/...`).
    pub fn with_cors(mut self, origins: &[String]) -> Self {
        self.cors = cors::Cors::new(origins);
        self
    }

    /// Serves the built-in account routes (`--accounts-db`).
    pub fn with_accounts(mut self, routes: accounts::AccountRoutes) -> Self {
        self.accounts = Some(routes);
        self
    }

    /// Serves `/metrics` and `/api/stats` on the admin listener only.
    pub fn with_admin_listener(mut self) -> Self {
        self.admin_apart = true;
        self
    }

    /// Applies `--accept-rate` to WebSocket upgrades.
    pub fn with_accept_rate(mut self, spec: Option<RateSpec>) -> Self {
        self.accept = spec.map(limiter);
        self
    }

    /// Sets `--body-timeout` (default 10 s).
    pub fn with_body_timeout(mut self, body_timeout: Duration) -> Self {
        self.body_timeout = body_timeout;
        self
    }

    /// Hands out member ids after `base` (cluster mode: this process's range).
    pub fn with_member_ids_after(mut self, base: u64) -> Self {
        self.next_id = AtomicU64::new(base.saturating_add(1));
        self
    }

    /// Sets `--sse-heartbeat` (default 15 s).
    pub fn with_sse_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.sse_heartbeat = heartbeat;
        self
    }

    /// A fresh connection id (also the member id in every room, unique across the cluster).
    /// Never 0.
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

const GET: &[Method] = &[Method::GET];
const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
const GET_POST: &[Method] = &[Method::GET, Method::POST];
const POST: &[Method] = &[Method::POST];

const INDEX_HTML: &str = include_str!("../../web/index.html");
/// The client library the page is built on, for apps to load from the server they talk to.
const ROOMCAST_JS: &str = include_str!("../../web/roomcast.js");

/// Answers one HTTP request. Never fails: every problem is a status code with a JSON body.
pub async fn handle(
    api: Arc<Api>,
    side: Side,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    // CORS (`--cors-origins`) covers the REST API on the public listener: a preflight is
    // answered here, and every answer (refusals too, so a page can read why) is marked.
    let cors_request = match &api.cors {
        Some(cors) if side == Side::Public && req.uri().path().starts_with("/api/") => {
            if cors::Cors::is_preflight(req.method(), req.headers()) {
                return cors.preflight(req.headers()).unwrap_or_else(|e| {
                    api.stats.dropped.cors_refused.inc();
                    e.response()
                });
            }
            Some((req.method().clone(), req.headers().clone()))
        }
        _ => None,
    };
    let mut response = route(api.clone(), side, peer, req)
        .await
        .unwrap_or_else(|e| e.response());
    if let (Some(cors), Some((method, headers))) = (&api.cors, cors_request) {
        cors.decorate(&method, &headers, &mut response);
    }
    response
}

/// The route table.
async fn route(api: Arc<Api>, side: Side, peer: IpAddr, req: Request<Incoming>) -> Reply {
    // Behind a trusted proxy, the client it names; everything below charges this address.
    let peer = api.access.client_addr(&req, peer);
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method();
    let operator_route = matches!(
        segments.as_slice(),
        ["healthz"] | ["metrics"] | ["api", "stats"]
    );
    let served_here = match side {
        Side::Admin => operator_route,
        Side::Public => !(api.admin_apart && operator_route && segments[0] != "healthz"),
    };
    if !served_here {
        return Err(ApiError::not_found("not_found", "no such route"));
    }
    match segments.as_slice() {
        [""] => {
            allow(method, GET_HEAD)?;
            Ok(reply::typed("text/html; charset=utf-8", INDEX_HTML))
        }
        ["roomcast.js"] => {
            allow(method, GET_HEAD)?;
            Ok(reply::typed("text/javascript; charset=utf-8", ROOMCAST_JS))
        }
        ["healthz"] => {
            allow(method, GET)?;
            Ok(status::health(&api))
        }
        ["metrics"] => {
            allow(method, GET)?;
            Ok(status::metrics(&api))
        }
        ["api", "stats"] => {
            allow(method, GET)?;
            Ok(status::stats(&api).await)
        }
        ["api", "server"] => {
            allow(method, GET)?;
            Ok(accounts::server(&api))
        }
        ["api", "rooms"] => {
            allow(method, GET)?;
            rooms::list(&api, peer, &req).await
        }
        ["register"] => {
            allow(method, POST)?;
            accounts::register(&api, peer, req).await
        }
        ["token"] => {
            allow(method, POST)?;
            accounts::token(&api, peer, req).await
        }
        ["token", "refresh"] => {
            allow(method, POST)?;
            accounts::refresh(&api, peer, req).await
        }
        ["users", "me"] => {
            allow(method, GET)?;
            accounts::me(&api, peer, req).await
        }
        ["api", "rooms", room] => {
            allow(method, GET)?;
            let room = decode_room(room)?;
            rooms::info(&api, peer, &room, &req).await
        }
        ["api", "rooms", room, "messages"] => {
            allow(method, GET_POST)?;
            let room = decode_room(room)?;
            if method == Method::GET {
                messages::page(&api, peer, room, &req).await
            } else {
                messages::publish(&api, peer, &room, req).await
            }
        }
        ["ws"] | ["ws", _] => {
            allow(method, GET)?;
            upgrade::chat(api, peer, req).await
        }
        ["sse"] | ["sse", _] => {
            allow(method, GET)?;
            sse::stream(api, peer, req).await
        }
        ["echo"] if api.echo => {
            allow(method, GET)?;
            upgrade::echo(api, peer, req).await
        }
        // Route templates never take a path the arms above answer (refused when the rooms
        // file is read), so their order does not matter.
        _ => match api.bus.hub().settings().routes().find(&path) {
            Some(room) => {
                allow(method, GET)?;
                routed(api, peer, req, room).await
            }
            None => Err(ApiError::not_found("not_found", "no such route")),
        },
    }
}

/// A path a route template (`[routes]` in the rooms file) leads into `room`. The room is
/// checked first (400 `bad_room`), then the request says which transport it wants: a WebSocket
/// upgrade, or `Accept: text/event-stream` for an event stream; anything else is 400.
async fn routed(
    api: Arc<Api>,
    peer: IpAddr,
    req: Request<Incoming>,
    room: Result<String, NameError>,
) -> Reply {
    let room = room.map_err(|e| ApiError::bad_request(e.room_code(), e.room_reason()))?;
    if fastwebsockets::upgrade::is_upgrade_request(&req) {
        upgrade::routed(api, peer, req, room).await
    } else if sse::wants_events(&req) {
        sse::routed(api, peer, req, room).await
    } else {
        Err(ApiError::bad_request(
            "bad_request",
            "this path is a room: open it as a WebSocket (Connection: Upgrade, Upgrade: \
             websocket) or as an event stream (Accept: text/event-stream)",
        ))
    }
}

fn allow(method: &Method, allowed: &'static [Method]) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(allowed))
    }
}

/// A room name from a path segment: percent-decoded, then validated (`$` names refused).
fn decode_room(raw: &str) -> Result<String, ApiError> {
    decode_room_with(raw, validate_room)
}

/// A room name from a path segment, percent-decoded, then checked by `validate`.
pub(crate) fn decode_room_with(
    raw: &str,
    validate: fn(&str) -> Result<(), NameError>,
) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("bad_room", "room name is not valid UTF-8"))?;
    validate(&decoded).map_err(|e| ApiError::bad_request(e.room_code(), e.room_reason()))?;
    Ok(decoded.into_owned())
}

/// The header a backend or script may give a room password in, instead of the query string
/// (which proxies log).
const PASSWORD_HEADER: &str = "x-room-password";

/// The room password of a REST request: the `X-Room-Password` header, else `?password=`.
fn room_password<'a, B>(req: &'a Request<B>, query: Option<&'a str>) -> Option<&'a str> {
    req.headers()
        .get(PASSWORD_HEADER)
        .and_then(|v| v.to_str().ok())
        .or(query)
}

/// Whether the request may read `room` (its info, members, messages; see `Access::may_read`),
/// against the password the settings in force give the room.
fn may_read_room<B>(
    api: &Api,
    req: &Request<B>,
    peer: IpAddr,
    room: &str,
    query_token: Option<&str>,
    query_password: Option<&str>,
    query_user: Option<&str>,
) -> Result<(), ApiError> {
    let settings = api.bus.hub().settings().resolve(room);
    api.access.may_read(
        req,
        peer,
        room,
        query_token,
        (
            settings.password.as_ref(),
            room_password(req, query_password),
        ),
        query_user,
    )
}

/// 404 `no_such_room`, the answer for a room nobody is in.
fn no_such_room() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_room",
        "no room of that name has members",
    )
}
