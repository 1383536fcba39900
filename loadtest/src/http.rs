//! The cross-checks' side door: plain HTTP GETs to a server's JSON API (`/api/stats`,
//! `/api/rooms/{room}`, `/api/rooms?…`) over a fresh hyper client connection each.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::config::Server;

/// Largest API body read, bytes.
const MAX_BODY: usize = 4 << 20;
/// Time one GET may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET path` and parse the JSON body; `Ok((status, body))` for any HTTP status.
/// Cancel-safe (it owns its connection).
pub async fn get_json(server: &Server, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    tokio::time::timeout(
        TIMEOUT,
        get_inner(server.addr, &server.host, server.token.as_deref(), path),
    )
    .await
    .with_context(|| format!("GET {path} on {}: timed out", server.host))?
}

async fn get_inner(
    addr: SocketAddr,
    host: &str,
    token: Option<&str>,
    path: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONNECTION, "close");
    if let Some(token) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: reading body: {e}"))?
        .to_bytes();
    conn.abort();
    let value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "GET {path}: body is not JSON: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    Ok((status, value))
}

/// The fields of `/api/stats` the report uses. In cluster mode (`roomcast --redis`)
/// `connections` and `rooms` are this server's own (`local_connections`, `local_rooms`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub connections: u64,
    pub rooms: u64,
    /// The server runs in cluster mode: rooms spread over servers are one room.
    #[serde(default)]
    pub clustered: bool,
    pub rss_bytes: u64,
    #[serde(default)]
    pub messages_in: u64,
    #[serde(default)]
    pub frames_out: u64,
    /// Socket writes that carried room frames (`frames_out / writes` is the batching).
    #[serde(default)]
    pub writes: u64,
    /// CPU seconds (user + system) the server process has used; absent from older servers.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    #[serde(default)]
    pub evictions: u64,
    /// The process whose /proc entries gave `cpu_seconds` and `rss_bytes`; `None`: the server's
    /// own figures.
    #[serde(default)]
    pub measured_pid: Option<u32>,
}

/// `/api/stats`, with CPU time and RSS from /proc when the server's process is known
/// (`Server::pid`). A process that can no longer be read is an error, never a silent switch to
/// the server's own figures in the middle of a window.
pub async fn stats(server: &Server) -> anyhow::Result<Stats> {
    let mut st = api_stats(server).await?;
    if let Some(pid) = server.pid {
        let gone = |e: std::io::Error| anyhow::anyhow!("server {} process {pid}: {e}", server.url);
        st.cpu_seconds = Some(crate::procfs::cpu_seconds(pid).map_err(gone)?);
        st.rss_bytes = crate::procfs::rss_bytes(pid).map_err(gone)?;
        st.measured_pid = Some(pid);
    }
    Ok(st)
}

async fn api_stats(server: &Server) -> anyhow::Result<Stats> {
    let (status, v) = get_json(server, "/api/stats").await?;
    if status != 200 {
        bail!("GET /api/stats on {}: HTTP {status}: {v}", server.host);
    }
    let mut st: Stats = serde_json::from_value(v.clone())
        .with_context(|| format!("GET /api/stats on {}: unexpected fields", server.host))?;
    if v.get("cluster").is_some_and(|c| c.is_object()) {
        st.clustered = true;
        st.connections = v["local_connections"].as_u64().unwrap_or(st.connections);
        st.rooms = v["local_rooms"].as_u64().unwrap_or(st.rooms);
    }
    Ok(st)
}

/// What `/api/rooms/{room}` says about a room; `None` when the server answers 404.
/// `members` is this server's own (`local_members` in cluster mode).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoomInfo {
    pub members: u64,
    #[serde(default, skip_serializing)]
    pub local_members: Option<u64>,
    #[serde(default)]
    pub last_seq: u64,
    #[serde(default)]
    pub published: u64,
    #[serde(default)]
    pub evicted: u64,
}

pub async fn room(server: &Server, room: &str) -> anyhow::Result<Option<RoomInfo>> {
    // Room names of this tool (`lt-<n>`) need no percent-encoding.
    let path = format!("/api/rooms/{room}?users_limit=1");
    let (status, v) = get_json(server, &path).await?;
    match status {
        200 => {
            let mut info: RoomInfo = serde_json::from_value(v)
                .with_context(|| format!("GET {path} on {}: unexpected fields", server.host))?;
            if let Some(local) = info.local_members {
                info.members = local;
            }
            Ok(Some(info))
        }
        404 => Ok(None),
        s => bail!("GET {path} on {}: HTTP {s}: {v}", server.host),
    }
}
