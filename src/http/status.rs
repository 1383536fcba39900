//! `GET /healthz`, `GET /api/stats`, `GET /metrics`.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::reply::{self, Body};
use super::Api;
use crate::core::stats::{cpu_seconds, rss_bytes};

/// 200 always; `degraded` while the link to the other processes is down.
pub fn health(api: &Api) -> Response<Body> {
    let body = match api.bus.link() {
        None => json!({"status": "ok"}),
        // The link's state, never its error text: `/healthz` is open to anyone, and Redis
        // errors name hosts and ports (`/api/stats` carries the text).
        Some(link) => json!({
            "status": if link.redis == "up" { "ok" } else { "degraded" },
            "cluster": {
                "redis": link.redis,
                "node": link.node,
                "down_since": link.down_since,
            },
        }),
    };
    reply::json(StatusCode::OK, &body)
}

pub fn metrics(api: &Api) -> Response<Body> {
    reply::typed(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        api.stats.prometheus_text(),
    )
}

/// This process's counters, and connections, rooms and processes of every process together
/// (`local_*` are this process's).
pub async fn stats(api: &Api) -> Response<Body> {
    let s = &api.stats;
    let totals = api.bus.totals().await;
    let mut v = json!({
        "connections": totals.connections,
        "rooms": totals.rooms,
        "nodes": totals.nodes,
        "local_connections": s.connections.get(),
        "local_rooms": api.bus.hub().room_count(),
        "messages_in": s.messages_in.get(),
        "published": s.published.get(),
        "frames_out": s.frames_out.get(),
        "writes": s.writes.get(),
        "frames_encoded": s.frames_encoded.get(),
        "coalesced_batches": s.coalesced_batches.get(),
        "coalesced_frames": s.coalesced_frames.get(),
        "rings_grown": s.rings_grown.get(),
        "evictions": s.evictions.get(),
        "connections_refused": s.connections_refused.get(),
        "rate_limited": s.rate_limited.get(),
        "auth_refused": s.auth_refused.total(),
        "auth_refused_by_reason": s.auth_refused.json(),
        "duplicates": s.duplicates.get(),
        "lag_resyncs": s.lag_resyncs.get(),
        "history_db_written": s.history_db_written.get(),
        "history_db_dropped": s.history_db_dropped.get(),
        "history_db_locked_reads": s.history_db_locked_reads.get(),
        "history_trimmed": s.history_trimmed.get(),
        "rooms_refused": s.rooms_refused.get(),
        "http_write_timeouts": s.http_write_timeouts.get(),
        "history_bytes": api.bus.hub().history().memory_used(),
        "accept_rate_refused": s.accept_rate_refused.get(),
        "shutdown_late_closes": s.shutdown_late_closes.get(),
        "presence_names_dropped": s.presence_names_dropped.get(),
        "rooms_config_reloads_refused": s.rooms_config_reloads_refused.get(),
        "rss_bytes": rss_bytes(),
        // User + system CPU seconds since start: a load test divides deliveries by its
        // change over a window (server cost per delivery).
        "cpu_seconds": cpu_seconds(),
        "uptime_secs": s.uptime().as_secs(),
    });
    for (name, n) in s.dropped.fields().into_iter().chain(s.deflate.fields()) {
        v[name] = n.into();
    }
    for (name, n) in s.accounts.fields() {
        v[name] = n.into();
    }
    for (name, n) in s.sse.fields() {
        v[name] = n.into();
    }
    if let Some(cluster) = api.bus.broker_stats() {
        v["cluster"] = cluster;
        // Whether the totals above are every process's or, the others being unreachable,
        // this one's.
        v["cluster"]["counts"] = if totals.nodes.is_some() { "up" } else { "down" }.into();
    }
    reply::json(StatusCode::OK, &v)
}
