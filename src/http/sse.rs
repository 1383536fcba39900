//! `GET /sse/{room}`, `GET /sse?rooms=a,b` (and route templates' paths asked for
//! `text/event-stream`): Server-Sent Events. Every check a WebSocket upgrade
//! passes (accept rate, token, origin, caps, password, the lockout) happens here, and every
//! room is joined, before the 200: a refusal is a status and a JSON body, as for an upgrade.
//! The stream itself is `conn::sse`.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::body::Body;
use super::query;
use super::reply::{ApiError, Reply};
use super::room_password;
use super::target::{parse_sse_target, routed_sse_target, SseTarget};
use super::upgrade::{accept_rate, hold_connection, join_room};
use super::Api;
use crate::bus::JoinRequest;
use crate::conn::sse::{self, StreamNote};
use crate::core::stats::AuthReason;
use crate::proto::sse::{parse_composite_id, parse_event_id, IdError};
use crate::proto::ReplayRequest;

const LAST_EVENT_ID: &str = "last-event-id";

/// Opens an event stream on the rooms the request names.
pub async fn stream(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>) -> Reply {
    accept_rate(&api)?;
    let target = parse_sse_target(req.uri().path(), req.uri().query())?;
    stream_in(api, peer, req, target).await
}

/// An event stream on a route template's path, into the `room` the template made (already
/// valid): from here on exactly as `/sse/{room}`.
pub async fn routed(api: Arc<Api>, peer: IpAddr, req: Request<Incoming>, room: String) -> Reply {
    accept_rate(&api)?;
    let target = routed_sse_target(room, req.uri().query())?;
    stream_in(api, peer, req, target).await
}

/// Whether a request asks for an event stream (`Accept: text/event-stream`, what
/// `EventSource` sends): how a route template's path tells a stream from a page load.
pub fn wants_events<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// The stream into `target`'s rooms: every check after the accept rate and the target's own.
async fn stream_in(
    api: Arc<Api>,
    peer: IpAddr,
    req: Request<Incoming>,
    target: SseTarget,
) -> Reply {
    let rooms = target.rooms;
    let max_rooms = api.conn.limits.max_rooms;
    if rooms.len() > max_rooms {
        return Err(ApiError::bad_request(
            "too_many_rooms",
            format!("a stream may be in at most {max_rooms} rooms (--max-rooms-per-connection)"),
        ));
    }
    let q: query::Sse = query::parse(&req)?;
    let replays = replays(&req, &rooms, &q)?;
    let grant = api.access.grant(
        &req,
        peer,
        q.token.as_deref(),
        rooms.first().map(String::as_str),
    )?;
    let user = match &grant {
        Some(grant) => {
            if target.user.as_deref().is_some_and(|u| u != &*grant.user) {
                api.access.count(AuthReason::ForbiddenUser);
                return Err(ApiError::forbidden(
                    "forbidden_user",
                    "the user name comes from the access token's `sub`",
                ));
            }
            if rooms.iter().any(|r| !grant.allows(r)) {
                api.access.count(AuthReason::ForbiddenRoom);
                return Err(ApiError::forbidden(
                    "forbidden_room",
                    "the access token does not allow every room named",
                ));
            }
            Some(grant.user.to_string())
        }
        None => target.user,
    };
    let guard = hold_connection(&api, peer, &req)?;
    let id = api.next_id();
    let user: Arc<str> = user.unwrap_or_else(|| format!("anon-{id}")).into();
    let password = room_password(&req, q.password.as_deref());
    let grant = grant.map(Arc::new);
    let mut joined = Vec::with_capacity(rooms.len());
    for (room, replay) in rooms.iter().zip(replays) {
        let join = JoinRequest {
            name: room,
            id,
            user: &user,
            password,
            replay,
            grant: grant.as_deref(),
        };
        match join_room(&api, peer, join).await {
            Ok(j) => joined.push(j),
            Err(e) => {
                // All or nothing: the rooms already joined are left before the refusal.
                for j in &joined {
                    api.bus.leave(&j.room, id);
                }
                return Err(e);
            }
        }
    }
    let note = req.extensions().get::<Arc<StreamNote>>().cloned();
    let events = sse::events(sse::Start {
        cx: api.conn.clone(),
        id,
        joined,
        grant,
        guard,
        heartbeat: api.sse_heartbeat,
        note,
    });
    let mut resp = Response::new(Body::Events(events));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // A stream is its connection's last response: no request can follow it on this socket.
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    // nginx buffers responses unless told not to; events must go out as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// What each room replays. `Last-Event-ID` (what `EventSource` sends when it reconnects) wins:
/// each room it names gets the messages after its position (a room it does not name, none).
/// Without it, `?since=` (one room only) or `?history=` (each room).
fn replays<B>(
    req: &Request<B>,
    rooms: &[String],
    q: &query::Sse,
) -> Result<Vec<Option<ReplayRequest>>, ApiError> {
    let last = req
        .headers()
        .get(LAST_EVENT_ID)
        .map(|v| v.to_str().map(str::trim))
        .transpose()
        .map_err(|_| bad_id(IdError::Malformed))?
        .filter(|v| !v.is_empty());
    if let Some(last) = last {
        return match rooms {
            [_] => {
                let (epoch, seq) =
                    parse_event_id(last).ok_or_else(|| bad_id(IdError::Malformed))?;
                Ok(vec![Some(ReplayRequest::Since(seq, epoch))])
            }
            _ => {
                let positions = parse_composite_id(last).map_err(bad_id)?;
                Ok(rooms
                    .iter()
                    .map(|room| {
                        positions
                            .iter()
                            .find(|(r, _)| r == room)
                            .map(|(_, (epoch, seq))| ReplayRequest::Since(*seq, *epoch))
                    })
                    .collect())
            }
        };
    }
    if q.since.is_some() && rooms.len() > 1 {
        return Err(ApiError::bad_request(
            "bad_param",
            "`since` is for one room: a stream in several uses `Last-Event-ID`",
        ));
    }
    let replay = ReplayRequest::from_parts(q.history, q.since, q.epoch.as_deref())
        .map_err(|reason| ApiError::bad_request("bad_param", reason))?;
    Ok(vec![replay; rooms.len()])
}

fn bad_id(e: IdError) -> ApiError {
    ApiError::bad_request("bad_last_event_id", e.to_string())
}
