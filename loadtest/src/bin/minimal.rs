//! `minimal`: the baseline that roomcast's figures are compared with. A room broadcast server
//! written the straightforward way on the same crates with their defaults (tokio's multi-thread
//! runtime, hyper 1 HTTP/1 with the fastwebsockets 0.10 upgrade), speaking just enough of
//! roomcast's protocol for the load generator's `idle`, `chat`, `saturate` and `hot` scenarios:
//!
//! - `GET /ws/{room}?user=NAME` upgrades, joins the room and sends
//!   `{"type":"welcome","room":…,"seq":N}`;
//! - a client's `{"type":"message","text":…}` is numbered under the room's lock, encoded once
//!   as `{"type":"message","room":…,"user":…,"text":…,"seq":N,"ts":MS}` and sent as `Bytes`
//!   into the room's `tokio::sync::broadcast`;
//! - every member's task writes each message itself with `write_frame(Frame::text(…))`: one
//!   frame per write, no batching, no rate limit, no presence, no history;
//! - `GET /api/stats` and `GET /api/rooms/{room}` answer the fields the load generator checks
//!   (connections, rooms, members, last seq, frames written).
//!
//! A member that falls a ring behind is closed with 1008. Nothing else is bounded: it is a
//! yardstick, not a server to deploy.
//!
//! `--direct` is the floor for one write per delivery: no broadcast and no member task woken.
//! The publisher's task encodes the frame once and writes it to every member's socket itself
//! (`try_write` on the shared `TcpStream`) under the room's lock; each member's task only reads.
//! A write that does not take the whole frame drops the member from the room (counted as
//! `evictions`). What a delivery costs there is the socket write and nothing else a server
//! could leave out.
//!
//!     minimal --listen 127.0.0.1:9000 [--direct]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use fastwebsockets::upgrade::{self, UpgradeFut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};

#[derive(Parser)]
#[command(
    name = "minimal",
    about = "A minimal room broadcast server: the baseline for loadtest"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Runtime worker threads. Default: one per core (tokio's default).
    #[arg(long)]
    threads: Option<usize>,
    /// Messages a room's broadcast ring holds (roomcast's `--room-buffer` default).
    #[arg(long, default_value_t = 1024)]
    room_buffer: usize,
    /// Publishers write every member's socket themselves (see the top of this file).
    #[arg(long)]
    direct: bool,
}

/// Everything the connections share.
struct Server {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    room_buffer: usize,
    connections: AtomicU64,
    messages_in: AtomicU64,
    /// Message frames written; each `write_frame` is one socket write, so also the writes.
    frames_out: AtomicU64,
    lagged: AtomicU64,
    direct: bool,
    next_id: AtomicU64,
}

struct Room {
    /// The seq and the member count; the lock also keeps broadcast order equal to seq order.
    state: Mutex<RoomState>,
    tx: broadcast::Sender<Bytes>,
}

struct RoomState {
    seq: u64,
    members: u64,
    /// `--direct`: every member's socket, by member id.
    sockets: Vec<(u64, Arc<TcpStream>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerMessage<'a> {
    Welcome {
        room: &'a str,
        seq: u64,
    },
    Message {
        room: &'a str,
        user: &'a str,
        text: &'a str,
        seq: u64,
        ts: u64,
    },
}

fn json<T: Serialize>(value: &T) -> Bytes {
    // Plain structs of strings and numbers always serialize.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Server {
    /// Joins `name`: the member's receiver and the seq it starts after.
    fn join(&self, name: &str) -> (Arc<Room>, broadcast::Receiver<Bytes>, u64) {
        let mut rooms = lock(&self.rooms);
        let room = rooms
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Room {
                    state: Mutex::new(RoomState {
                        seq: 0,
                        members: 0,
                        sockets: Vec::new(),
                    }),
                    tx: broadcast::channel(self.room_buffer).0,
                })
            })
            .clone();
        let mut state = lock(&room.state);
        state.members += 1;
        let rx = room.tx.subscribe();
        let seq = state.seq;
        drop(state);
        (room, rx, seq)
    }

    /// `--direct`: joins `name` with `socket`, which gets its welcome under the room's lock so
    /// that no message falls between the welcome's seq and the first delivery.
    fn join_direct(&self, name: &str, id: u64, socket: &Arc<TcpStream>) -> Option<Arc<Room>> {
        let (room, _rx, _) = self.join(name);
        let mut state = lock(&room.state);
        let welcome = server_frame(
            OpCode::Text,
            &json(&ServerMessage::Welcome {
                room: name,
                seq: state.seq,
            }),
        );
        if !matches!(socket.try_write(&welcome), Ok(n) if n == welcome.len()) {
            drop(state);
            self.leave(name, &room);
            return None;
        }
        state.sockets.push((id, socket.clone()));
        drop(state);
        Some(room)
    }

    fn leave(&self, name: &str, room: &Room) {
        let mut rooms = lock(&self.rooms);
        let mut state = lock(&room.state);
        state.members -= 1;
        if state.members == 0 {
            rooms.remove(name);
        }
    }
}

impl Room {
    fn publish(&self, server: &Server, room: &str, user: &str, text: &str) {
        let mut state = lock(&self.state);
        state.seq += 1;
        let frame = json(&ServerMessage::Message {
            room,
            user,
            text,
            seq: state.seq,
            ts: unix_millis(),
        });
        if !server.direct {
            // No receivers: nobody to deliver to.
            let _ = self.tx.send(frame);
            return;
        }
        let wire = server_frame(OpCode::Text, &frame);
        let mut written = 0;
        state.sockets.retain(|(_, socket)| {
            if matches!(socket.try_write(&wire), Ok(n) if n == wire.len()) {
                written += 1;
                true
            } else {
                server.lagged.fetch_add(1, Relaxed);
                false
            }
        });
        server.frames_out.fetch_add(written, Relaxed);
    }
}

/// An unmasked final frame, header and payload in one buffer: what a server sends.
fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut head = [0u8; 10];
    let n = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
    [&head[..n], payload].concat()
}

/// The largest client frame `--direct` reads.
const MAX_CLIENT_FRAME: usize = 1 << 20;

/// Takes one whole client frame off the front of `buf`: its opcode and its unmasked payload.
/// `Ok(None)`: more bytes needed. `Err`: a frame this yardstick does not take (unmasked,
/// fragmented, too large).
fn client_frame(buf: &mut BytesMut) -> Result<Option<(u8, Vec<u8>)>, ()> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x80 == 0 || b1 & 0x80 == 0 {
        return Err(());
    }
    let (len, at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (usize::try_from(u64::from_be_bytes(n)).map_err(|_| ())?, 10)
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    if len > MAX_CLIENT_FRAME {
        return Err(());
    }
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let frame = buf.split_to(at + 4 + len);
    let mask = [frame[at], frame[at + 1], frame[at + 2], frame[at + 3]];
    let payload = frame[at + 4..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some((b0 & 0x0f, payload)))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(cli.listen).await?;
        eprintln!("minimal: listening on {}", listener.local_addr()?);
        let server = Arc::new(Server {
            rooms: Mutex::new(HashMap::new()),
            room_buffer: cli.room_buffer.max(1),
            connections: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            direct: cli.direct,
            next_id: AtomicU64::new(0),
        });
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, most likely: back off and go on.
                    eprintln!("minimal: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let server = server.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(server, req)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn route(server: Arc<Server>, mut req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    if let Some(room) = path.strip_prefix("/ws/") {
        if !valid_room(room) {
            return reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "bad_room"}),
            );
        }
        let user = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("user=")))
            .filter(|u| !u.is_empty())
            .unwrap_or("anonymous")
            .to_string();
        return match upgrade::upgrade(&mut req) {
            Ok((response, fut)) => {
                let room = room.to_string();
                tokio::spawn(async move {
                    server.connections.fetch_add(1, Relaxed);
                    if server.direct {
                        direct_member(&server, fut, &room, &user).await;
                    } else {
                        member(&server, fut, &room, &user).await;
                    }
                    server.connections.fetch_sub(1, Relaxed);
                });
                response.map(|_| Full::new(Bytes::new()))
            }
            Err(e) => reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "bad_upgrade", "reason": e.to_string()}),
            ),
        };
    }
    if path == "/api/stats" {
        let rooms = lock(&server.rooms).len();
        let frames = server.frames_out.load(Relaxed);
        return reply(
            StatusCode::OK,
            serde_json::json!({
                "connections": server.connections.load(Relaxed),
                "rooms": rooms,
                "rss_bytes": rss_bytes(),
                "messages_in": server.messages_in.load(Relaxed),
                "frames_out": frames,
                "writes": frames,
                "evictions": server.lagged.load(Relaxed),
            }),
        );
    }
    if let Some(name) = path.strip_prefix("/api/rooms/") {
        let room = lock(&server.rooms).get(name).cloned();
        return match room {
            Some(room) => {
                let state = lock(&room.state);
                reply(
                    StatusCode::OK,
                    serde_json::json!({"room": name, "members": state.members, "last_seq": state.seq}),
                )
            }
            None => reply(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "no_such_room"}),
            ),
        };
    }
    reply(
        StatusCode::NOT_FOUND,
        serde_json::json!({"error": "not_found"}),
    )
}

fn valid_room(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Resident set size, bytes, from /proc (0 where it is absent).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One member's whole life, in this one task: the upgrade, the welcome, then reading and
/// writing side by side until either ends.
async fn member(server: &Server, fut: UpgradeFut, name: &str, user: &str) {
    let Ok(ws) = fut.await else {
        return;
    };
    let (room, mut rx, seq) = server.join(name);
    let (reader, mut writer) = ws.split(tokio::io::split);
    let mut reader = fastwebsockets::FragmentCollectorRead::new(reader);
    // Pongs and the close reply that reading obliges us to send, for the writing side.
    let (owed_tx, mut owed_rx) = mpsc::channel::<(OpCode, Vec<u8>)>(16);

    let welcome = json(&ServerMessage::Welcome { room: name, seq });
    if writer
        .write_frame(Frame::text(Payload::Borrowed(&welcome)))
        .await
        .is_ok()
    {
        // Both loops live as long as the connection: neither read is ever cancelled midway
        // (fastwebsockets' read is not cancel-safe); the writer's waits are.
        let read = async {
            let mut owe = |f: Frame<'_>| {
                let _ = owed_tx.try_send((f.opcode, f.payload.to_vec()));
                std::future::ready(Ok::<(), WebSocketError>(()))
            };
            while let Ok(frame) = reader.read_frame(&mut owe).await {
                match frame.opcode {
                    OpCode::Text => {
                        server.messages_in.fetch_add(1, Relaxed);
                        if let Ok(m) = serde_json::from_slice::<ClientMessage>(&frame.payload) {
                            if m.kind == "message" {
                                room.publish(server, name, user, &m.text);
                            }
                        }
                    }
                    OpCode::Close => break,
                    _ => {}
                }
            }
        };
        let write = async {
            loop {
                tokio::select! {
                    owed = owed_rx.recv() => {
                        let Some((op, data)) = owed else { return };
                        let frame = Frame::new(true, op, None, Payload::Owned(data));
                        if writer.write_frame(frame).await.is_err() {
                            return;
                        }
                    }
                    msg = rx.recv() => match msg {
                        Ok(bytes) => {
                            if writer.write_frame(Frame::text(Payload::Borrowed(&bytes))).await.is_err() {
                                return;
                            }
                            server.frames_out.fetch_add(1, Relaxed);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            server.lagged.fetch_add(1, Relaxed);
                            let _ = writer.write_frame(Frame::close(1008, b"lagged")).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        };
        tokio::select! {
            () = read => {}
            () = write => {}
        }
        // The close reply (queued by the read that saw the client's close) goes out last.
        while let Ok((op, data)) = owed_rx.try_recv() {
            if op == OpCode::Close {
                let _ = writer
                    .write_frame(Frame::new(true, op, None, Payload::Owned(data)))
                    .await;
                break;
            }
        }
    }
    server.leave(name, &room);
}

/// `--direct`: one member's task, which only reads; publishers write to its socket.
async fn direct_member(server: &Server, fut: UpgradeFut, name: &str, user: &str) {
    let Ok(ws) = fut.await else {
        return;
    };
    let Ok(parts) = ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    else {
        return;
    };
    let socket = Arc::new(parts.io.into_inner());
    let mut buf = BytesMut::from(&parts.read_buf[..]);
    let id = server.next_id.fetch_add(1, Relaxed);
    let Some(room) = server.join_direct(name, id, &socket) else {
        return;
    };
    'serve: loop {
        loop {
            match client_frame(&mut buf) {
                Ok(Some((0x1, payload))) => {
                    server.messages_in.fetch_add(1, Relaxed);
                    if let Ok(m) = serde_json::from_slice::<ClientMessage>(&payload) {
                        if m.kind == "message" {
                            room.publish(server, name, user, &m.text);
                        }
                    }
                }
                Ok(Some((0x8, payload))) => {
                    // The reply shares the socket with publishers: under the room's lock.
                    let state = lock(&room.state);
                    let _ = socket.try_write(&server_frame(
                        OpCode::Close,
                        &payload[..payload.len().min(2)],
                    ));
                    drop(state);
                    break 'serve;
                }
                Ok(Some((0x9, payload))) => {
                    let state = lock(&room.state);
                    let _ = socket.try_write(&server_frame(OpCode::Pong, &payload));
                    drop(state);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(()) => break 'serve,
            }
        }
        if socket.readable().await.is_err() {
            break;
        }
        match socket.try_read_buf(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    lock(&room.state)
        .sockets
        .retain(|(member, _)| *member != id);
    server.leave(name, &room);
}
