//! HTTP: the route table, the JSON API, the web page and the WebSocket upgrade. Every check on
//! an upgrade happens here, before the 101, so a refusal is a status code and a JSON body.
//!
//! One file per resource: `status` (health, stats, metrics), `rooms` (list and info),
//! `messages` (history pages and REST publish), `upgrade` (the WebSocket handshake). `reply`
//! shapes every answer, `query` reads query strings, `access` decides who may do what.

mod access;
mod messages;
mod query;
mod reply;
mod rooms;
mod status;
pub mod target;
mod upgrade;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

pub use access::Access;
pub use reply::{ApiError, Body};

use crate::bus::Bus;
use crate::conn;
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
    /// `--body-timeout`: 408 for a REST body that has not arrived whole by then.
    pub body_timeout: Duration,
    next_id: AtomicU64,
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
            body_timeout: Duration::from_secs(10),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sets `--body-timeout` (default 10 s).
    pub fn with_body_timeout(mut self, body_timeout: Duration) -> Self {
        self.body_timeout = body_timeout;
        self
    }

    /// A fresh connection id (also the member id in every room). Never 0.
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

const GET: &[Method] = &[Method::GET];
const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
const GET_POST: &[Method] = &[Method::GET, Method::POST];

const INDEX_HTML: &str = include_str!("../../web/index.html");

/// Answers one HTTP request. Never fails: every problem is a status code with a JSON body.
pub async fn handle(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>) -> Response<Body> {
    route(api, peer, req).await.unwrap_or_else(|e| e.response())
}

/// The route table.
async fn route(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method();
    match segments.as_slice() {
        [""] => {
            allow(method, GET_HEAD)?;
            Ok(reply::typed("text/html; charset=utf-8", INDEX_HTML))
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
        ["api", "rooms"] => {
            allow(method, GET)?;
            rooms::list(&api, &req).await
        }
        ["api", "rooms", room] => {
            allow(method, GET)?;
            let room = decode_room(room)?;
            rooms::info(&api, &room, &req).await
        }
        ["api", "rooms", room, "messages"] => {
            allow(method, GET_POST)?;
            let room = decode_room(room)?;
            if method == Method::GET {
                messages::page(&api, room, &req).await
            } else {
                messages::publish(&api, &room, req).await
            }
        }
        ["ws"] | ["ws", _] => {
            allow(method, GET)?;
            upgrade::chat(api, peer, req).await
        }
        ["echo"] if api.echo => {
            allow(method, GET)?;
            upgrade::echo(api, peer, req).await
        }
        _ => Err(ApiError::not_found("not_found", "no such route")),
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

/// 404 `no_such_room`, the answer for a room nobody is in.
fn no_such_room() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_room",
        "no room of that name has members",
    )
}
