//! `GET /api/rooms` and `GET /api/rooms/{room}`. Both show only what the caller may see (see
//! `Access::viewer` and `Access::may_read`).

use std::net::IpAddr;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::query::{self, bounded};
use super::reply::{self, Reply};
use super::{may_read_room, no_such_room, Api};

/// Rooms with members anywhere, largest first: the public rooms the caller's grant covers
/// (every room for the API key).
pub async fn list(api: &Api, peer: IpAddr, req: &Request<Incoming>) -> Reply {
    let q: query::ListRooms = query::parse(req)?;
    let limit = bounded("limit", q.limit, 100, 1, 1000)? as usize;
    let viewer = api.access.viewer(req, peer, q.token.as_deref())?;
    let settings = api.bus.hub().settings();
    let shown = |room: &str| viewer.shows(room, settings.is_private(room));
    Ok(reply::json(
        StatusCode::OK,
        &api.bus.rooms(limit, shown).await,
    ))
}

/// A room's figures and one page of its users, for whoever could join it; 404 when no process
/// has a member in it. The access check comes first, so a refusal says nothing about whether
/// the room is live.
pub async fn info(api: &Api, peer: IpAddr, room: &str, req: &Request<Incoming>) -> Reply {
    let q: query::RoomInfo = query::parse(req)?;
    may_read_room(
        api,
        req,
        peer,
        room,
        q.token.as_deref(),
        q.password.as_deref(),
        q.user.as_deref(),
    )?;
    let limit = bounded("users_limit", q.users_limit, 100, 1, 1000)? as usize;
    let info = api
        .bus
        .room_info(room, limit, q.users_after)
        .await
        .ok_or_else(no_such_room)?;
    Ok(reply::json(StatusCode::OK, &info))
}
