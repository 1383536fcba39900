//! `GET /api/rooms` and `GET /api/rooms/{room}`.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::query::{self, bounded};
use super::reply::{self, Reply};
use super::{no_such_room, Api};

/// Rooms with members anywhere, largest first.
pub async fn list(api: &Api, req: &Request<Incoming>) -> Reply {
    let q: query::ListRooms = query::parse(req)?;
    let limit = bounded("limit", q.limit, 100, 1, 1000)? as usize;
    Ok(reply::json(StatusCode::OK, &api.bus.rooms(limit).await))
}

/// A room's figures and one page of its users; 404 when no process has a member in it.
pub async fn info(api: &Api, room: &str, req: &Request<Incoming>) -> Reply {
    let q: query::RoomInfo = query::parse(req)?;
    let limit = bounded("users_limit", q.users_limit, 100, 1, 1000)? as usize;
    let info = api
        .bus
        .room_info(room, limit, q.users_after)
        .await
        .ok_or_else(no_such_room)?;
    Ok(reply::json(StatusCode::OK, &info))
}
