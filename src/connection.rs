//! One WebSocket connection's whole life, owned by one task: reading client frames, answering
//! them, joining and leaving rooms, writing room frames (several per vectored write), pinging
//! idle peers, evicting itself when it falls behind, and closing with a precise code.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload};
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
        batch: &mut SmallVec<[(usize, Arc<Outbound>); 16]>,
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

/// Everything one connection owns. Dropped when the task ends; `leave_all` runs before.
pub struct Connection {
    id: u64,
    user: Arc<str>,
    shared: Arc<Shared>,
    writer: OwnedWriteHalf,
    rooms: SmallVec<[Membership; 1]>,
    /// A fragmented message being reassembled, and its first frame's opcode.
    partial: Option<(OpCode, BytesMut)>,
    echo: bool,
    grant: Option<Arc<Grant>>,
    /// `--rate-limit` on the messages this socket sends.
    limiter: Option<ConnectionLimiter>,
}

/// Splits the upgraded TCP stream and runs the connection to its end.
/// `leftover` holds bytes the HTTP layer read past the upgrade request.
pub async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    leftover: Bytes,
    id: u64,
    user: Arc<str>,
    mode: Mode,
    mut shutdown: Shutdown,
) {
    let (read, writer) = stream.into_split();
    // What hyper read past the request (rarely anything) is the start of the first frame.
    // hyper hands it over as a freeze of its whole read buffer: copy just these bytes.
    let inbuf = BytesMut::from(&leftover[..]);
    drop(leftover);

    let (first, echo, grant) = match mode {
        Mode::Rooms { first, grant } => (first, false, grant),
        Mode::Echo => (None, true, None),
    };
    // Echo mode is for conformance runs, which send as fast as they can.
    let limiter = if echo {
        None
    } else {
        shared.config.connection_rate().map(ConnectionLimiter::new)
    };
    let mut conn = Connection {
        id,
        user,
        shared,
        writer,
        rooms: SmallVec::new(),
        partial: None,
        echo,
        grant,
        limiter,
    };
    let end = match first {
        Some(joined) => conn.enter(joined).await.err().map(|e| match e {
            Ok(_) => End::Close(1011, "could not join the room"),
            Err(end) => end,
        }),
        None => None,
    };
    let end = match end {
        Some(end) => end,
        None => conn.serve(read, inbuf, &mut shutdown).await,
    };
    conn.leave_all();
    if let End::Close(code, reason) = end {
        conn.close(code, reason).await;
    }
}

impl Connection {
    /// Runs until the connection must end. Reading waits for readiness with no buffer held, so an
    /// idle socket costs no read buffer; `inbuf` holds only a partial frame between reads.
    async fn serve(
        &mut self,
        read: OwnedReadHalf,
        mut inbuf: BytesMut,
        shutdown: &mut Shutdown,
    ) -> End {
        if let Err(end) = self.drain_frames(&mut inbuf).await {
            return end;
        }
        let ping_interval = self.shared.config.ping_interval;
        let mut last_seen = Instant::now();
        let ping_timer = sleep_until(last_seen + ping_interval);
        tokio::pin!(ping_timer);
        loop {
            // Unbiased on purpose: a client that keeps sending must not starve its own deliveries
            // (its receiver would lag and be evicted), and a busy room must not starve reading
            // (its pongs would go unread and it would be dropped for silence).
            tokio::select! {
                _ = shutdown.recv() => return End::Close(1001, "server shutting down"),
                ready = read.readable() => {
                    if ready.is_err() {
                        return End::Gone;
                    }
                    match self.read_available(&read, &mut inbuf).await {
                        Ok(true) => last_seen = Instant::now(),
                        Ok(false) => {}
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
                    if silent >= ping_interval && self.write_raw(&protocol::ping_frame()).await.is_err() {
                        return End::Gone;
                    }
                    let next = if silent >= ping_interval { Instant::now() } else { last_seen };
                    ping_timer.as_mut().reset(next + ping_interval);
                }
            }
        }
    }

    /// One read after a readiness event (one per event, so a fast sender cannot monopolise the
    /// task), then every complete frame handled in order. Returns whether any bytes came in.
    /// The buffer is released as soon as it holds no partial frame.
    async fn read_available(
        &mut self,
        read: &OwnedReadHalf,
        inbuf: &mut BytesMut,
    ) -> Result<bool, End> {
        inbuf.reserve(READ_CHUNK);
        match read.try_read_buf(inbuf) {
            Ok(0) => return Err(End::Gone),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if inbuf.is_empty() {
                    *inbuf = BytesMut::new();
                }
                return Ok(false);
            }
            Err(_) => return Err(End::Gone),
        }
        self.drain_frames(inbuf).await?;
        if inbuf.is_empty() {
            *inbuf = BytesMut::new();
        }
        Ok(true)
    }

    /// Handles every complete frame in `inbuf`, leaving a partial one in place.
    async fn drain_frames(&mut self, inbuf: &mut BytesMut) -> Result<(), End> {
        let max = self.shared.config.max_message_bytes as usize;
        loop {
            match frame::decode(inbuf, max) {
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
                return self.write_raw(&pong).await.err();
            }
            OpCode::Pong => return None,
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                return Some(End::Close(1002, "expected a continuation frame"));
            }
            OpCode::Text | OpCode::Binary if frame.fin => (frame.opcode, frame.payload),
            OpCode::Text | OpCode::Binary => {
                self.partial = Some((frame.opcode, frame.payload));
                return None;
            }
            OpCode::Continuation => {
                let Some((_, buf)) = self.partial.as_mut() else {
                    return Some(End::Close(1002, "continuation frame without a message"));
                };
                if buf.len() + frame.payload.len() > max {
                    return Some(End::Close(1009, "message too big"));
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return None;
                }
                let (opcode, buf) = self.partial.take()?;
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
        let timeout = self.shared.config.write_timeout;
        let parts: [&[u8]; 2] = [&head[..len], &payload];
        let write = write_all_vectored(&mut self.writer, &parts);
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(End::Gone),
            Err(_) => Some(End::Close(1008, "slow consumer")),
        }
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
        let timeout = self.shared.config.write_timeout;
        for chunk in frames.chunks(MAX_BATCH) {
            match tokio::time::timeout(timeout, write_all_vectored(&mut self.writer, chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Err(End::Gone)),
                Err(_) => return Err(Err(End::Close(1008, "slow consumer"))),
            }
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
    /// in any room (up to `MAX_BATCH`) and writes it all in one vectored write.
    async fn on_room_frame(
        &mut self,
        index: usize,
        first: Result<Arc<Outbound>, RecvError>,
    ) -> Option<End> {
        let mut batch: SmallVec<[(usize, Arc<Outbound>); 16]> = SmallVec::new();
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
            Err(RecvError::Lagged(_)) => return Some(self.evict(index)),
            // The room's sender lives in the Room we hold: it cannot close while we are in it.
            Err(RecvError::Closed) => return Some(End::Close(1011, "room closed")),
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
            return Some(self.evict(i));
        }
        if batch.is_empty() {
            return None;
        }
        let frames: SmallVec<[&[u8]; 16]> = batch.iter().map(|(_, o)| &o.frame[..]).collect();
        let timeout = self.shared.config.write_timeout;
        match tokio::time::timeout(timeout, write_all_vectored(&mut self.writer, &frames)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(End::Gone),
            Err(_) => {
                let (index, _) = batch[0];
                return Some(self.evict(index));
            }
        }
        let stats = &self.shared.stats;
        stats.frames_out.inc_by(batch.len() as u64);
        stats.writes.inc();
        // One wait sample per room per write: the oldest frame of that room in this batch.
        let now = std::time::Instant::now();
        let mut seen: SmallVec<[usize; 4]> = SmallVec::new();
        for (i, out) in &batch {
            if !seen.contains(i) {
                seen.push(*i);
                self.rooms[*i].room.record_wait(out.published_at, now);
            }
        }
        None
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
        let timeout = self.shared.config.write_timeout;
        match tokio::time::timeout(timeout, self.writer.write_all(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Err(End::Gone)),
            Err(_) => Err(Err(End::Close(1008, "slow consumer"))),
        }
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), End> {
        self.write_own(bytes)
            .await
            .map_err(|e| e.err().unwrap_or(End::Gone))
    }

    /// Sends our close frame and our FIN, then reads (and discards) what the peer still sends
    /// for up to `CLOSE_GRACE`: closing a socket with unread input makes the kernel send a
    /// reset, which can destroy the close frame before the peer reads it.
    async fn close(mut self, code: u16, reason: &'static str) {
        let frame = protocol::close_frame(code, reason);
        let sent = tokio::time::timeout(CLOSE_GRACE, self.writer.write_all(&frame)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = self.writer.shutdown().await;
        let socket: &TcpStream = self.writer.as_ref();
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

/// Writes every frame, as few syscalls as the kernel allows: one `writev` for the whole batch
/// unless the socket buffer fills part way.
async fn write_all_vectored(writer: &mut OwnedWriteHalf, frames: &[&[u8]]) -> io::Result<()> {
    let mut slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        let n = writer.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
