//! The HTTP API in cluster mode: the same routes, with cluster-wide figures beside this
//! process's (`members` / `local_members`, `connections` / `local_connections`, …).
//!
//! While Redis is unreachable these still answer: the cluster-wide figures fall back to this
//! process's and `"cluster": "down"` says so.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::{Cluster, ClusterError};
use crate::http::{
    error, json_response, number_param, published_json, stats_json, users_page, ApiError, Body,
};
use crate::server::Shared;

fn link_state(res: &Result<impl Sized, ClusterError>) -> &'static str {
    if res.is_ok() {
        "up"
    } else {
        "down"
    }
}

/// `GET /api/stats`.
pub async fn stats(shared: &Shared, cluster: &Cluster) -> Response<Body> {
    let mut v = stats_json(shared);
    let local_connections = shared.stats.connections.get().max(0) as u64;
    let local_rooms = shared.hub.room_count();
    let snap = cluster.snapshot(&shared.hub, local_connections).await;
    v["local_connections"] = json!(local_connections);
    v["local_rooms"] = json!(local_rooms);
    v["cluster"] = cluster.stats_json();
    v["cluster"]["counts"] = json!(link_state(&snap));
    match snap {
        Ok(snap) => {
            v["connections"] = json!(snap.connections);
            v["rooms"] = json!(snap.rooms.len());
            v["nodes"] = json!(snap.nodes);
        }
        Err(_) => v["nodes"] = Value::Null,
    }
    json_response(StatusCode::OK, &v)
}

/// `GET /api/rooms?limit=N`: every room with members anywhere, largest first.
pub async fn list_rooms(
    shared: &Shared,
    cluster: &Cluster,
    req: &Request<Incoming>,
) -> Response<Body> {
    let limit = match number_param(req, "limit", 100, 1..=1000) {
        Ok(n) => n as usize,
        Err(e) => return e.response(),
    };
    let local: std::collections::HashMap<String, usize> = shared
        .hub
        .list(usize::MAX)
        .0
        .into_iter()
        .map(|(r, n)| (r.name().to_owned(), n))
        .collect();
    let snap = cluster.snapshot(&shared.hub, 0).await;
    let state = link_state(&snap);
    let all = match snap {
        Ok(snap) => snap.rooms,
        Err(_) => local.clone(),
    };
    let mut rooms: Vec<(String, usize)> = all.into_iter().collect();
    rooms.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let total = rooms.len();
    let rooms: Vec<Value> = rooms
        .into_iter()
        .take(limit)
        .map(|(room, members)| {
            let local_members = local.get(&room).copied().unwrap_or(0);
            json!({"room": room, "members": members, "local_members": local_members})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"rooms": rooms, "total": total, "cluster": state}),
    )
}

/// `GET /api/rooms/{room}`: 404 only when no process has a member in it. `users` and the
/// traffic figures are this process's.
pub async fn room_info(
    shared: &Shared,
    cluster: &Cluster,
    room: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (limit, after) = users_page(req)?;
    let counts = cluster.room_counts(room).await;
    let state = link_state(&counts);
    let counts = counts.unwrap_or_default();
    let local = shared.hub.get(room);
    let mut v = match &local {
        Some(r) => serde_json::to_value(r.info(limit, after)).unwrap_or_default(),
        None if counts.remote > 0 => {
            let settings = shared.hub.settings().resolve(room);
            json!({
                "room": room,
                "users": [],
                "next_users_after": null,
                "published": 0,
                "evicted": 0,
                "messages_per_sec": 0.0,
                "p99_wait_ms": null,
                "password_protected": settings.password.is_some(),
                "max_members": settings.max_members,
            })
        }
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_such_room",
                "no room of that name has members",
            ))
        }
    };
    let local_members = local.as_ref().map_or(0, |r| r.member_count());
    v["members"] = json!(local_members + counts.remote);
    v["local_members"] = json!(local_members);
    v["cluster"] = json!(state);
    Ok(json_response(StatusCode::OK, &v))
}

/// `POST /api/rooms/{room}/messages` in cluster mode: through Redis, to every process. A
/// repeated `id` is recognised from what this process has seen of the room.
pub async fn publish(
    shared: &Shared,
    cluster: &Cluster,
    room: &str,
    user: &str,
    text: &str,
    id: Option<&str>,
) -> Response<Body> {
    if let Some(seq) = shared.hub.get(room).and_then(|r| r.duplicate_of(id)) {
        return json_response(StatusCode::ACCEPTED, &published_json(room, seq, id, true));
    }
    match cluster
        .publish_rest(&shared.hub, room, user, text, id)
        .await
    {
        Ok(Some(seq)) => json_response(StatusCode::ACCEPTED, &published_json(room, seq, id, false)),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no_such_room",
            "no room of that name has members",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            &format!("{e}: nothing was published"),
        ),
    }
}
