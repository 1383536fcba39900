//! One WebSocket connection's whole life, owned by one task: reading client frames, answering
//! them, joining and leaving rooms, writing room frames (several per vectored write), pinging
//! idle peers, evicting itself when it falls behind, and closing with a precise code.

use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::{Frame, OpCode, Payload};
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio::time::{sleep_until, Instant};

use crate::auth::Grant;
use crate::frame::{self, close_request, CloseRequest, InFrame};
use crate::history::{LagPolicy, ReplayRequest};
use crate::hub::{JoinError, Joined};
use crate::limit::{retry_after_ms, ConnectionLimiter, Verdict};
use crate::names::{is_server_room, validate_joinable_room, validate_room, NameError};
use crate::protocol::{self, parse_client_message, ClientMessage, Outbound, ProtocolError};
use crate::room::{Publish, Room};
use crate::server::Shared;
use crate::shutdown::Shutdown;

/// Most room frames gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// Bytes asked of the kernel per read. The buffer exists only while bytes are in flight.
const READ_CHUNK: usize = 4096;
/// How long a closing socket is given to answer our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a socket is for.
pub enum Mode {
    /// The chat protocol, with the first room (if the upgrade named one) already joined before
    /// the 101, so that a refused join could still be an HTTP status; the past messages its URL
    /// asked for (`history`/`since`) were taken with the join and are written after the welcome.
    /// `grant` is the verified access token when `--jwt-secret` is set; later joins are checked
    /// against it.
    Rooms {
        first: Option<Joined>,
        grant: Option<Arc<Grant>>,
    },
    /// Echo every message back exactly (`--echo`, for conformance testing only).
    Echo,
}

impl Mode {
    /// Gives back a membership taken before the upgrade when the socket never arrives.
    pub fn abandon(self, shared: &Shared, id: u64) {
        if let Mode::Rooms { first: Some(j), .. } = self {
            leave_room(shared, &j.room, id);
        }
    }
}

/// A room this socket is in.
struct Membership {
    room: Arc<Room>,
    rx: Receiver<Arc<Outbound>>,
    /// Seq of the last message seen from this room (delivered or skipped by `echo:false`).
    last_seq: u64,
    /// `--lag-policy resync`: the first seq this member missed; announced by a `lagged` frame
    /// just before the next message it does get.
    gap_from: Option<u64>,
}

impl Membership {
    fn new(room: Arc<Room>, rx: Receiver<Arc<Outbound>>, last_seq: u64) -> Self {
        Membership {
            room,
            rx,
            last_seq,
            gap_from: None,
        }
    }

    /// Adds a frame from this room (room index `i`) to `batch` if it is for connection
    /// `conn`, preceded by a `lagged` notice when a gap is pending.
    fn accept(
        &mut self,
        i: usize,
        out: Arc<Outbound>,
        conn: u64,
        batch: &mut Batch,
        stats: &crate::stats::Stats,
    ) {
        if out.seq > 0 {
            if let Some(from) = self.gap_from.take() {
                if out.seq > from {
                    stats.lag_resyncs.inc();
                    let notice = Outbound {
                        frame: protocol::lagged_frame(self.room.name(), from, out.seq - 1),
                        origin: 0,
                        skip_origin: false,
                        published_at: out.published_at,
                        seq: 0,
                    };
                    batch.push((i, Arc::new(notice)));
                }
            }
            self.last_seq = out.seq;
        }
        if out.is_for(conn) {
            batch.push((i, out));
        }
    }

    /// The receiver skipped frames (`--lag-policy resync`): everything after the last seq seen
    /// is missing until the next message says where the gap ends.
    fn lagged(&mut self) {
        if self.gap_from.is_none() {
            self.gap_from = Some(self.last_seq + 1);
        }
    }
}

/// Why the connection ends; decides the close frame it sends.
#[derive(Debug)]
enum End {
    /// Send this close frame, then wait briefly for the peer's answer.
    Close(u16, &'static str),
    /// The peer closed (its close was already answered) or vanished: just drop the socket.
    Gone,
}

/// Gives back what an accepted upgrade holds (the connection gauge and the per-IP count) when
/// its task ends, or never starts.
pub(crate) struct ConnectionGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ip: Option<IpAddr>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.shared.stats.connections.dec();
        if let (Some(ip), Some(per_ip)) = (self.ip, &self.shared.per_ip) {
            per_ip.release(ip);
        }
    }
}

/// What the HTTP layer hands over with an accepted upgrade (the 101 is on its way).
pub(crate) struct Accepted {
    pub(crate) shared: Arc<Shared>,
    /// Completes once hyper has written the 101 and let go of the socket.
    pub(crate) upgrade: UpgradeFut,
    pub(crate) id: u64,
    pub(crate) user: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) shutdown: Shutdown,
    pub(crate) guard: ConnectionGuard,
}

/// Everything one connection owns. Dropped when the task ends; `leave_all` runs before.
pub struct Connection {
    id: u64,
    user: Arc<str>,
    shared: Arc<Shared>,
    /// One owner for both directions: reads and writes go through `&TcpStream` and readiness,
    /// so neither holds a buffer or a future while the socket is idle (and no `Arc` is needed
    /// to split it).
    stream: TcpStream,
    /// Bytes read but not yet taken as frames. Holds no allocation except while a frame is only
    /// partly in.
    inbuf: BytesMut,
    shutdown: Shutdown,
    rooms: SmallVec<[Membership; 1]>,
    /// A fragmented message being reassembled, and its first frame's opcode. Boxed (as is
    /// `limiter`) because it is rare and every idle connection would carry its space.
    partial: Option<Box<(OpCode, BytesMut)>>,
    echo: bool,
    grant: Option<Arc<Grant>>,
    /// `--rate-limit` on the messages this socket sends.
    limiter: Option<Box<ConnectionLimiter>>,
    /// Dropped with the connection, whichever way it ends.
    _guard: ConnectionGuard,
}

/// A room batch the socket did not take in full at once: the rest is written by a boxed future
/// (`finish_delivery`), so that the rare full socket, not every idle one, pays for the space.
struct Blocked {
    batch: Batch,
    /// Bytes of the batch already written.
    written: usize,
}

/// Room frames gathered for one write, with the index of the room each came from.
type Batch = SmallVec<[(usize, Arc<Outbound>); 16]>;

/// Runs an accepted upgrade to its end: completes the upgrade, enters the first room, serves,
/// closes. The task's future is sized by its largest state and an idle connection sits in
/// `serve`'s wait for its whole life, so every step that is not that wait (the upgrade, the
/// first welcome and replay, handling a message, closing) runs in a boxed future that exists
/// only while the step does. `accepted` is boxed for the same reason: an async fn keeps its
/// arguments for its whole life.
pub(crate) async fn run(accepted: Box<Accepted>) {
    let Some((mut conn, end)) = Box::pin(open(accepted)).await else {
        return;
    };
    let end = match end {
        Some(end) => end,
        None => conn.serve().await,
    };
    conn.leave_all();
    if let End::Close(code, reason) = end {
        Box::pin(conn.close(code, reason)).await;
    }
}

/// Waits for the upgrade, takes the TCP stream out of hyper and enters the first room (if the
/// upgrade named one). `None`: the socket never arrived. `Some((_, Some(end)))`: entering
/// failed and the connection ends at once.
async fn open(accepted: Box<Accepted>) -> Option<(Connection, Option<End>)> {
    let Accepted {
        shared,
        upgrade,
        id,
        user,
        mode,
        shutdown,
        guard,
    } = *accepted;
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            mode.abandon(&shared, id);
            return None;
        }
    };
    let parts = match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("{}", crate::Error::NotTcp);
            mode.abandon(&shared, id);
            return None;
        }
    };
    // What hyper read past the request (rarely anything) is the start of the first frame.
    // hyper hands it over as a freeze of its whole read buffer: copy just these bytes.
    let inbuf = BytesMut::from(&parts.read_buf[..]);
    let stream = parts.io.into_inner();

    let (first, echo, grant) = match mode {
        Mode::Rooms { first, grant } => (first, false, grant),
        Mode::Echo => (None, true, None),
    };
    // Echo mode is for conformance runs, which send as fast as they can.
    let limiter = if echo {
        None
    } else {
        shared
            .config
            .connection_rate()
            .map(|spec| Box::new(ConnectionLimiter::new(spec)))
    };
    let mut conn = Connection {
        id,
        user,
        shared,
        stream,
        inbuf,
        shutdown,
        rooms: SmallVec::new(),
        partial: None,
        echo,
        grant,
        limiter,
        _guard: guard,
    };
    let end = match first {
        Some(joined) => conn.enter(joined).await.err().map(|e| match e {
            Ok(_) => End::Close(1011, "could not join the room"),
            Err(end) => end,
        }),
        None => None,
    };
    Some((conn, end))
}

impl Connection {
    /// Runs until the connection must end. Reading waits for readiness with no buffer held, so an
    /// idle socket costs no read buffer; `inbuf` holds only a partial frame between reads.
    async fn serve(&mut self) -> End {
        if !self.inbuf.is_empty() {
            if let Err(end) = Box::pin(self.drain_frames()).await {
                return end;
            }
            self.release_inbuf();
        }
        let ping_interval = self.shared.config.ping_interval;
        let mut last_seen = Instant::now();
        let ping_timer = sleep_until(last_seen + ping_interval);
        tokio::pin!(ping_timer);
        loop {
            // Unbiased on purpose: a client that keeps sending must not starve its own deliveries
            // (its receiver would lag and be evicted), and a busy room must not starve reading
            // (its pongs would go unread and it would be dropped for silence).
            // `select!` drops its futures before a handler runs, so the state of a handler and
            // that of the wait share space: the handlers here stay at most as large as the wait.
            tokio::select! {
                _ = self.shutdown.recv() => return End::Close(1001, "server shutting down"),
                // `poll_read_ready` keeps its waker in the socket's own state: unlike
                // `readable()`'s 150-byte future, this wait costs the task nothing.
                ready = std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)) => {
                    if ready.is_err() {
                        return End::Gone;
                    }
                    match self.read_available() {
                        Ok(false) => {}
                        Ok(true) => {
                            last_seen = Instant::now();
                            // Boxed: handling messages (parsing, publishing, joining, answering)
                            // needs far more state than waiting does (see `run`).
                            if let Err(end) = Box::pin(self.drain_frames()).await {
                                return end;
                            }
                            self.release_inbuf();
                        }
                        Err(end) => return end,
                    }
                }
                (index, res) = recv_any(&mut self.rooms) => {
                    if let Some(end) = self.on_room_frame(index, res).await {
                        return end;
                    }
                }
                () = &mut ping_timer => {
                    let silent = last_seen.elapsed();
                    if silent >= ping_interval * 2 {
                        return End::Close(1008, "ping timeout");
                    }
                    if silent >= ping_interval
                        && self.write_frames(&[&protocol::ping_frame()]).await.is_err()
                    {
                        return End::Gone;
                    }
                    let next = if silent >= ping_interval { Instant::now() } else { last_seen };
                    ping_timer.as_mut().reset(next + ping_interval);
                }
            }
        }
    }

    /// One read after a readiness event (one per event, so a fast sender cannot monopolise the
    /// task). Returns whether any bytes came in; the caller then handles the frames.
    fn read_available(&mut self) -> Result<bool, End> {
        self.inbuf.reserve(READ_CHUNK);
        match self.stream.try_read_buf(&mut self.inbuf) {
            Ok(0) => Err(End::Gone),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.release_inbuf();
                Ok(false)
            }
            Err(_) => Err(End::Gone),
        }
    }

    /// Lets go of the read buffer unless it holds part of a frame.
    fn release_inbuf(&mut self) {
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        }
    }

    /// Handles every complete frame in `inbuf`, leaving a partial one in place.
    async fn drain_frames(&mut self) -> Result<(), End> {
        let max = self.shared.config.max_message_bytes as usize;
        loop {
            match frame::decode(&mut self.inbuf, max) {
                Ok(None) => return Ok(()),
                Ok(Some(frame)) => {
                    if let Some(end) = self.on_frame(frame).await {
                        return Err(end);
                    }
                }
                Err(e) => {
                    let (code, reason) = e.close();
                    return Err(End::Close(code, reason));
                }
            }
        }
    }

    /// Handles one frame from the client; `Some` ends the connection.
    async fn on_frame(&mut self, frame: InFrame) -> Option<End> {
        let max = self.shared.config.max_message_bytes as usize;
        let message = match frame.opcode {
            OpCode::Close => {
                return Some(match close_request(&frame.payload) {
                    CloseRequest::Answer(code) => End::Close(code, ""),
                    CloseRequest::Refuse(code, reason) => End::Close(code, reason),
                })
            }
            OpCode::Ping => {
                let pong = protocol::encode_control(Frame::pong(Payload::Borrowed(&frame.payload)));
                return self.write_frames(&[&pong]).await.err();
            }
            OpCode::Pong => return None,
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                return Some(End::Close(1002, "expected a continuation frame"));
            }
            OpCode::Text | OpCode::Binary if frame.fin => (frame.opcode, frame.payload),
            OpCode::Text | OpCode::Binary => {
                self.partial = Some(Box::new((frame.opcode, frame.payload)));
                return None;
            }
            OpCode::Continuation => {
                let Some((_, buf)) = self.partial.as_deref_mut() else {
                    return Some(End::Close(1002, "continuation frame without a message"));
                };
                if buf.len() + frame.payload.len() > max {
                    return Some(End::Close(1009, "message too big"));
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return None;
                }
                let (opcode, buf) = *self.partial.take()?;
                (opcode, buf)
            }
        };
        if self.echo {
            return self.echo_back(message.0, message.1).await;
        }
        match message {
            (OpCode::Binary, _) => Some(End::Close(1003, "binary frames are not supported")),
            (_, bytes) if bytes.len() > max => Some(End::Close(1009, "message too big")),
            (_, bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text).await,
                Err(_) => Some(End::Close(1007, "invalid utf-8")),
            },
        }
    }

    /// Echo mode: writes the message back with its opcode; text must be UTF-8.
    async fn echo_back(&mut self, opcode: OpCode, payload: BytesMut) -> Option<End> {
        if opcode == OpCode::Text && std::str::from_utf8(&payload).is_err() {
            return Some(End::Close(1007, "invalid utf-8"));
        }
        let mut head = [0u8; 10];
        let len = Frame::new(true, opcode, None, Payload::Borrowed(&payload)).fmt_head(&mut head);
        self.write_frames(&[&head[..len], &payload]).await.err()
    }

    /// Handles one complete client text message; protocol errors answer with an error frame.
    async fn on_text(&mut self, text: &str) -> Option<End> {
        self.shared.stats.messages_in.inc();
        if let Some(limiter) = &mut self.limiter {
            match limiter.check() {
                Verdict::Allow => {}
                Verdict::Refuse { retry_after } => {
                    self.shared.stats.rate_limited.inc();
                    let err = ProtocolError::rate_limited(
                        "this socket sends faster than --rate-limit; the message was dropped",
                        retry_after_ms(retry_after),
                    );
                    let frame = protocol::error_frame(&err, None);
                    return self.write_own(&frame).await.err().and_then(Result::err);
                }
                Verdict::Flooding => {
                    self.shared.stats.rate_limited.inc();
                    return Some(End::Close(1008, "rate limit exceeded"));
                }
            }
        }
        // `room` borrows from `text`; it is only needed again to label an error frame.
        let (result, room) = match parse_client_message(text) {
            Ok(ClientMessage::Message {
                room,
                text,
                echo,
                id,
            }) => {
                let res = match self
                    .publish(room.as_deref(), &text, echo, id.as_deref())
                    .await
                {
                    Ok(Some(ack)) => self.write_own(&ack).await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                (res, room)
            }
            Ok(ClientMessage::Join {
                room,
                password,
                replay,
            }) => (
                self.join(&room, password.as_deref(), replay).await,
                Some(room),
            ),
            Ok(ClientMessage::Leave { room }) => (self.leave(&room).await, Some(room)),
            Ok(ClientMessage::Ping) => (self.write_own(&protocol::pong_frame()).await, None),
            Err(e) => (Err(Ok(e)), None),
        };
        match result {
            Ok(()) => None,
            Err(Ok(e)) => {
                // Only a well-formed name is echoed back (`$` names included).
                let room =
                    room.filter(|r| matches!(validate_room(r), Ok(()) | Err(NameError::Reserved)));
                let frame = protocol::error_frame(&e, room.as_deref());
                self.write_own(&frame).await.err().and_then(Result::err)
            }
            Err(Err(end)) => Some(end),
        }
    }

    /// Publishes into the named (or only) room. `Ok(Some(frame))`: the message repeated an
    /// `id` and was not broadcast; the frame acknowledges it to the sender alone.
    async fn publish(
        &mut self,
        room: Option<&str>,
        text: &str,
        echo: bool,
        id: Option<&str>,
    ) -> Result<Option<Bytes>, Result<ProtocolError, End>> {
        let target = match room {
            Some(name) => {
                validate_room(name).map_err(|e| Ok(room_error(e)))?;
                self.rooms.iter().find(|m| m.room.name() == name)
            }
            // The server's rooms (`$lobby`) take no messages, so they never make the choice
            // ambiguous.
            None => {
                let mut chat = self.rooms.iter().filter(|m| !is_server_room(m.room.name()));
                match (chat.next(), chat.next()) {
                    (Some(_), Some(_)) => {
                        return Err(Ok(ProtocolError::new(
                            "room_required",
                            "this socket is in several rooms: name one with \"room\"",
                        )))
                    }
                    (None, _) if !self.rooms.is_empty() => {
                        return Err(Ok(room_error(NameError::Reserved)))
                    }
                    (only, _) => only,
                }
            }
        };
        let Some(member) = target else {
            return Err(Ok(ProtocolError::new(
                "not_joined",
                "join the room before sending to it",
            )));
        };
        if let Err(wait) = member.room.admit() {
            self.shared.stats.rate_limited.inc();
            return Err(Ok(ProtocolError::rate_limited(
                "the room is at its --room-rate-limit; the message was dropped",
                retry_after_ms(wait),
            )));
        }
        let room = member.room.clone();
        let publish = Publish {
            user: &self.user,
            text,
            id,
            origin: self.id,
            skip_origin: !echo,
        };
        let Some(cluster) = &self.shared.cluster else {
            let published = room.publish_message(&publish);
            return Ok(duplicate_ack(&room, id, published.duplicate, published.seq));
        };
        // Cluster mode: a repeated id is recognised from what this process has published or
        // received (a retry racing its first copy through Redis on another process is not).
        if let Some(seq) = room.duplicate_of(id) {
            return Ok(duplicate_ack(&room, id, true, seq));
        }
        // The message comes back to local members through Redis. Boxed so that the cluster's
        // future does not grow every connection's task.
        let sent = Box::pin(cluster.publish(&room, &publish)).await;
        if let Err(e) = sent {
            cluster.publish_local(&room, &publish);
            return Err(Ok(ProtocolError::new(
                "cluster_unavailable",
                format!("{e}: delivered to members on this server only"),
            )));
        }
        Ok(None)
    }

    /// Joins `name` and writes its welcome frame, then the past messages `replay` asks for.
    /// Checks, in order: the name, the access token, then (under the room's lock, in
    /// `Hub::join_with_replay`) password and member cap, subscribing and taking the replay in
    /// the same step. `Err(Ok(_))` is answered with an error frame; `Err(Err(_))` ends the
    /// connection.
    async fn join(
        &mut self,
        name: &str,
        password: Option<&str>,
        replay: Option<ReplayRequest>,
    ) -> Result<(), Result<ProtocolError, End>> {
        validate_joinable_room(name).map_err(|e| Ok(room_error(e)))?;
        if let Some(grant) = &self.grant {
            if grant.expired() {
                return Err(Ok(ProtocolError::new(
                    "token_expired",
                    "the access token has expired: reconnect with a fresh one",
                )));
            }
            if !grant.allows(name) {
                return Err(Ok(ProtocolError::new(
                    "forbidden_room",
                    "the access token does not allow this room",
                )));
            }
        }
        if self.rooms.iter().any(|m| m.room.name() == name) {
            return Err(Ok(ProtocolError::new(
                "already_joined",
                "this socket is already in that room",
            )));
        }
        if self.rooms.len() >= usize::from(self.shared.config.max_rooms_per_connection) {
            return Err(Ok(ProtocolError::new(
                "too_many_rooms",
                format!(
                    "a socket may be in at most {} rooms",
                    self.shared.config.max_rooms_per_connection
                ),
            )));
        }
        let joined = join_room(&self.shared, name, self.id, &self.user, password, replay)
            .await
            .map_err(|e| Ok(ProtocolError::new(e.code(), e.to_string())))?;
        self.enter(joined).await
    }

    /// Takes a membership `Hub::join` granted and writes its welcome frame, then its replay
    /// (announcement and past messages), all before anything live from the room.
    async fn enter(&mut self, joined: Joined) -> Result<(), Result<ProtocolError, End>> {
        self.rooms
            .push(Membership::new(joined.room, joined.rx, joined.last_seq));
        let Some(replay) = joined.replay else {
            return self.write_own(&joined.welcome).await;
        };
        let mut frames: Vec<&[u8]> = Vec::with_capacity(replay.frames.len() + 2);
        frames.push(&joined.welcome);
        frames.push(&replay.header);
        frames.extend(replay.frames.iter().map(|o| &o.frame[..]));
        for chunk in frames.chunks(MAX_BATCH) {
            self.write_frames(chunk).await.map_err(Err)?;
        }
        Ok(())
    }

    async fn leave(&mut self, name: &str) -> Result<(), Result<ProtocolError, End>> {
        validate_joinable_room(name).map_err(|e| Ok(room_error(e)))?;
        let Some(index) = self.rooms.iter().position(|m| m.room.name() == name) else {
            return Err(Ok(ProtocolError::new(
                "not_joined",
                "this socket is not in that room",
            )));
        };
        let m = self.rooms.remove(index);
        leave_room(&self.shared, &m.room, self.id);
        self.write_own(&protocol::left_frame(name)).await
    }

    fn leave_all(&mut self) {
        for m in self.rooms.drain(..) {
            leave_room(&self.shared, &m.room, self.id);
        }
    }

    /// Handles the first frame `recv_any` produced, then drains whatever else is already queued
    /// in any room (up to `MAX_BATCH`) and writes it all in one vectored write. The gathering
    /// and the write the socket takes at once are synchronous (`deliver`): only a batch the
    /// socket could not take in full waits, boxed, in `finish_delivery`.
    async fn on_room_frame(
        &mut self,
        index: usize,
        first: Result<Arc<Outbound>, RecvError>,
    ) -> Option<End> {
        match self.deliver(index, first) {
            Ok(None) => None,
            Ok(Some(blocked)) => Box::pin(self.finish_delivery(blocked)).await,
            Err(end) => Some(end),
        }
    }

    /// Gathers a batch and writes as much of it as the socket takes now. `Ok(Some(_))`: the
    /// socket is full and the rest must be waited for.
    fn deliver(
        &mut self,
        index: usize,
        first: Result<Arc<Outbound>, RecvError>,
    ) -> Result<Option<Box<Blocked>>, End> {
        let mut batch = Batch::new();
        let resync = self.shared.config.lag_policy == LagPolicy::Resync;
        let stats = &self.shared.stats;
        match first {
            Ok(out) => {
                if let Some(m) = self.rooms.get_mut(index) {
                    m.accept(index, out, self.id, &mut batch, stats);
                }
            }
            Err(RecvError::Lagged(_)) if resync => {
                if let Some(m) = self.rooms.get_mut(index) {
                    m.lagged();
                }
            }
            Err(RecvError::Lagged(_)) => return Err(self.evict(index)),
            // The room's sender lives in the Room we hold: it cannot close while we are in it.
            Err(RecvError::Closed) => return Err(End::Close(1011, "room closed")),
        }
        let mut evict = None;
        'rooms: for (i, m) in self.rooms.iter_mut().enumerate() {
            while batch.len() < MAX_BATCH {
                match m.rx.try_recv() {
                    Ok(out) => m.accept(i, out, self.id, &mut batch, stats),
                    Err(TryRecvError::Lagged(_)) if resync => m.lagged(),
                    Err(TryRecvError::Lagged(_)) => {
                        evict = Some(i);
                        break 'rooms;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => continue 'rooms,
                }
            }
            break;
        }
        if let Some(i) = evict {
            return Err(self.evict(i));
        }
        if batch.is_empty() {
            return Ok(None);
        }
        let frames: SmallVec<[&[u8]; 16]> = batch.iter().map(|(_, o)| &o.frame[..]).collect();
        match write_now(&self.stream, &frames) {
            Ok(written) if written == total_len(&frames) => {}
            Ok(written) => {
                drop(frames);
                return Ok(Some(Box::new(Blocked { batch, written })));
            }
            Err(_) => return Err(End::Gone),
        }
        self.count_delivery(&batch);
        Ok(None)
    }

    /// Writes the rest of a batch the socket did not take at once, within `--write-timeout`
    /// (past it the member is evicted as a slow consumer).
    async fn finish_delivery(&mut self, blocked: Box<Blocked>) -> Option<End> {
        let frames: SmallVec<[&[u8]; 16]> =
            blocked.batch.iter().map(|(_, o)| &o.frame[..]).collect();
        let timeout = self.shared.config.write_timeout;
        let rest = write_rest(&self.stream, &frames, blocked.written);
        match tokio::time::timeout(timeout, rest).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(End::Gone),
            Err(_) => {
                let (index, _) = blocked.batch[0];
                return Some(self.evict(index));
            }
        }
        self.count_delivery(&blocked.batch);
        None
    }

    /// Counts a written batch and records, per room, how long its oldest frame waited.
    fn count_delivery(&self, batch: &Batch) {
        let stats = &self.shared.stats;
        stats.frames_out.inc_by(batch.len() as u64);
        stats.writes.inc();
        // One wait sample per room per write: the oldest frame of that room in this batch.
        let now = std::time::Instant::now();
        let mut seen: SmallVec<[usize; 4]> = SmallVec::new();
        for (i, out) in batch {
            if !seen.contains(i) {
                seen.push(*i);
                self.rooms[*i].room.record_wait(out.published_at, now);
            }
        }
    }

    fn evict(&mut self, index: usize) -> End {
        if let Some(m) = self.rooms.get(index) {
            m.room.record_eviction();
        }
        End::Close(1008, "slow consumer")
    }

    /// Writes a frame meant for this socket alone (welcome, error, pong…), bounded by the
    /// write timeout; a timeout evicts.
    async fn write_own(&mut self, frame: &[u8]) -> Result<(), Result<ProtocolError, End>> {
        self.write_frames(&[frame]).await.map_err(Err)
    }

    /// Writes `frames` in order, in full. The socket usually has room: then this is one
    /// `writev`, with no wait and nothing allocated. Otherwise the rest is written by a boxed
    /// future within `--write-timeout`; past it the connection closes as a slow consumer.
    async fn write_frames(&mut self, frames: &[&[u8]]) -> Result<(), End> {
        let written = match write_now(&self.stream, frames) {
            Ok(n) if n == total_len(frames) => return Ok(()),
            Ok(n) => n,
            Err(_) => return Err(End::Gone),
        };
        let timeout = self.shared.config.write_timeout;
        let rest = tokio::time::timeout(timeout, write_rest(&self.stream, frames, written));
        match Box::pin(rest).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(1008, "slow consumer")),
        }
    }

    /// Sends our close frame and our FIN, then reads (and discards) what the peer still sends
    /// for up to `CLOSE_GRACE`: closing a socket with unread input makes the kernel send a
    /// reset, which can destroy the close frame before the peer reads it.
    async fn close(mut self, code: u16, reason: &'static str) {
        let frame = protocol::close_frame(code, reason);
        let sent = tokio::time::timeout(CLOSE_GRACE, write_rest(&self.stream, &[&frame], 0)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = self.stream.shutdown().await;
        let socket = &self.stream;
        let deadline = Instant::now() + CLOSE_GRACE;
        let mut sink = [0u8; 1024];
        while let Ok(Ok(())) = tokio::time::timeout_at(deadline, socket.readable()).await {
            match socket.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// Joins `name`, with the past messages `replay` asks for (see `Hub::join_with_replay`). In
/// cluster mode a chat room's join waits (at most --redis-timeout) for the room's subscription,
/// so that the welcome's seq is exact cluster-wide; boxed so that the cluster's future does not
/// grow every connection's task.
pub(crate) async fn join_room(
    shared: &Shared,
    name: &str,
    id: u64,
    user: &Arc<str>,
    password: Option<&str>,
    replay: Option<ReplayRequest>,
) -> Result<Joined, JoinError> {
    match &shared.cluster {
        None => shared
            .hub
            .join_with_replay(name, id, user, password, replay),
        Some(cluster) => {
            Box::pin(cluster.join(&shared.hub, name, id, user, password, replay)).await
        }
    }
}

/// The `ack` frame for a message whose `id` repeated one already published as `seq`.
fn duplicate_ack(room: &Room, id: Option<&str>, duplicate: bool, seq: u64) -> Option<Bytes> {
    match (duplicate, id) {
        (true, Some(id)) => Some(protocol::duplicate_ack_frame(room.name(), id, seq)),
        _ => None,
    }
}

/// Leaves `room` locally and, in cluster mode, gives up this membership's stake in its channel.
pub(crate) fn leave_room(shared: &Shared, room: &Arc<Room>, id: u64) {
    match &shared.cluster {
        Some(cluster) => cluster.leave(&shared.hub, room, id),
        None => shared.hub.leave(room, id),
    };
}

/// The error frame's content for a refused room name.
fn room_error(e: NameError) -> ProtocolError {
    ProtocolError::new(e.room_code(), e.room_reason())
}

/// Waits for the next frame from any of the rooms. Cancel-safe: `broadcast::Receiver::recv`
/// loses nothing when dropped before completion.
async fn recv_any(rooms: &mut [Membership]) -> (usize, Result<Arc<Outbound>, RecvError>) {
    match rooms {
        [] => std::future::pending().await,
        [only] => (0, only.rx.recv().await),
        many => {
            let futures = many
                .iter_mut()
                .enumerate()
                .map(|(i, m)| Box::pin(async move { (i, m.rx.recv().await) }));
            futures_util::future::select_all(futures).await.0
        }
    }
}

/// Total length of `frames` in bytes.
fn total_len(frames: &[&[u8]]) -> usize {
    frames.iter().map(|f| f.len()).sum()
}

/// Writes as much of `frames` as the socket takes now, without waiting: one `writev`, more
/// only if the kernel took part of it and has room for more. Returns the bytes written; fewer
/// than all means the socket is full (`WouldBlock` is not an error here).
fn write_now(stream: &TcpStream, frames: &[&[u8]]) -> io::Result<usize> {
    let mut slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, 0);
    let mut written = 0;
    while !rest.is_empty() {
        match stream.try_write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Writes what is left of `frames` after the first `skip` bytes, waiting for the socket
/// whenever it is full. Cancel-safe only in that it writes nothing twice: dropped part way, it
/// leaves a partial frame on the wire, so the caller ends the connection.
async fn write_rest(stream: &TcpStream, frames: &[&[u8]], skip: usize) -> io::Result<()> {
    let mut slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, skip);
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
