//! One WebSocket connection's whole life, owned by one task: reading client frames, answering
//! them, joining and leaving rooms, writing room frames (several per vectored write), pinging
//! idle peers, evicting itself when it falls behind, and closing with a precise code.

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Cursor, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Chain};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio::time::{sleep_until, Instant};

use crate::names::validate_room;
use crate::protocol::{self, parse_client_message, ClientMessage, Outbound, ProtocolError};
use crate::room::Room;
use crate::server::Shared;
use crate::shutdown::Shutdown;

type Reader = WebSocketRead<Chain<Cursor<Bytes>, OwnedReadHalf>>;
type ReadOutcome = (Reader, Result<InFrame, WebSocketError>, Vec<u8>);
type ReadFuture = Pin<Box<dyn Future<Output = ReadOutcome> + Send>>;

/// Most room frames gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// How long a closing socket is given to answer our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a socket is for.
#[derive(Debug)]
pub enum Mode {
    /// The chat protocol, optionally joining a first room straight away.
    Rooms { first_room: Option<String> },
    /// Echo every message back exactly (`--echo`, for conformance testing only).
    Echo,
}

/// A room this socket is in.
struct Membership {
    room: Arc<Room>,
    rx: Receiver<Arc<Outbound>>,
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
    // hyper hands over what it read past the request as a freeze of its whole read buffer
    // (8 KiB or more): holding that `Bytes` would keep the buffer alive for the connection's
    // life. Keep a copy of just the leftover bytes (usually none).
    let leftover = Bytes::copy_from_slice(&leftover);
    let read = Cursor::new(leftover).chain(read);
    // We write through our own half (pre-encoded frames); fastwebsockets only reads, and the
    // control frames it owes (pong, close echo) come back to us through `read_next`.
    let (mut reader, _) =
        fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    // fastwebsockets refuses frames of `len >= max`; our limit is inclusive.
    reader.set_max_message_size(shared.config.max_message_bytes as usize + 1);

    let (first_room, echo) = match mode {
        Mode::Rooms { first_room } => (first_room, false),
        Mode::Echo => (None, true),
    };
    let mut conn = Connection {
        id,
        user,
        shared,
        writer,
        rooms: SmallVec::new(),
        partial: None,
        echo,
    };
    let end = match first_room {
        Some(room) => match conn.join(&room).await {
            Ok(()) => None,
            Err(Ok(_)) => Some(End::Close(1011, "could not join the room")),
            Err(Err(end)) => Some(end),
        },
        None => None,
    };
    let end = match end {
        Some(end) => end,
        None => conn.serve(reader, &mut shutdown).await,
    };
    conn.leave_all();
    if let End::Close(code, reason) = end {
        conn.close(code, reason).await;
    }
}

/// A frame read from the client, detached from the reader's buffer.
struct InFrame {
    fin: bool,
    opcode: OpCode,
    payload: BytesMut,
}

impl From<Frame<'_>> for InFrame {
    fn from(frame: Frame<'_>) -> Self {
        let payload = match frame.payload {
            // fastwebsockets hands out the bytes it read as `Payload::Bytes`: no copy.
            Payload::Bytes(b) => b,
            other => BytesMut::from(&other[..]),
        };
        InFrame {
            fin: frame.fin,
            opcode: frame.opcode,
            payload,
        }
    }
}

/// Starts reading the next complete frame. fastwebsockets' `read_frame` is not cancel-safe, so
/// the future owns the reader and is kept alive across `select!` iterations until it finishes;
/// then it hands the reader back for the next one.
fn read_next(mut reader: Reader) -> ReadFuture {
    Box::pin(async move {
        let mut owed = Vec::new();
        let res = reader
            .read_frame(&mut |frame: Frame<'_>| {
                owed.extend_from_slice(&protocol::encode_control(frame));
                std::future::ready(Ok::<(), Infallible>(()))
            })
            .await
            .map(InFrame::from);
        (reader, res, owed)
    })
}

impl Connection {
    /// Runs until the connection must end. The pending read is dropped on return: nothing else
    /// reads from the socket until `close` drains it.
    async fn serve(&mut self, reader: Reader, shutdown: &mut Shutdown) -> End {
        let mut read_fut = read_next(reader);
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
                (reader, res, owed) = &mut read_fut => {
                    last_seen = Instant::now();
                    if !owed.is_empty() && self.write_raw(&owed).await.is_err() {
                        return End::Gone;
                    }
                    let frame = match res {
                        Ok(frame) => frame,
                        Err(e) => return end_for_read_error(e),
                    };
                    read_fut = read_next(reader);
                    if let Some(end) = self.on_frame(frame).await {
                        return end;
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

    /// Handles one frame from the client; `Some` ends the connection.
    async fn on_frame(&mut self, frame: InFrame) -> Option<End> {
        let max = self.shared.config.max_message_bytes as usize;
        let message = match frame.opcode {
            OpCode::Close => return Some(End::Gone), // fastwebsockets answered it already
            OpCode::Ping | OpCode::Pong => return None,
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
        // `room` borrows from `text`; it is only needed again to label an error frame.
        let (result, room) = match parse_client_message(text) {
            Ok(ClientMessage::Message { room, text, echo }) => {
                (self.publish(room.as_deref(), &text, echo).await, room)
            }
            Ok(ClientMessage::Join { room }) => (self.join(&room).await, Some(room)),
            Ok(ClientMessage::Leave { room }) => (self.leave(&room).await, Some(room)),
            Ok(ClientMessage::Ping) => (self.write_own(&protocol::pong_frame()).await, None),
            Err(e) => (Err(Ok(e)), None),
        };
        match result {
            Ok(()) => None,
            Err(Ok(e)) => {
                let room = room.filter(|r| validate_room(r).is_ok());
                let frame = protocol::error_frame(&e, room.as_deref());
                self.write_own(&frame).await.err().and_then(Result::err)
            }
            Err(Err(end)) => Some(end),
        }
    }

    async fn publish(
        &mut self,
        room: Option<&str>,
        text: &str,
        echo: bool,
    ) -> Result<(), Result<ProtocolError, End>> {
        let target = match room {
            Some(name) => {
                validate_room(name)
                    .map_err(|e| Ok(ProtocolError::new("bad_room", e.room_reason())))?;
                self.rooms.iter().find(|m| m.room.name() == name)
            }
            None if self.rooms.len() > 1 => {
                return Err(Ok(ProtocolError::new(
                    "room_required",
                    "this socket is in several rooms: name one with \"room\"",
                )))
            }
            None => self.rooms.first(),
        };
        let Some(member) = target else {
            return Err(Ok(ProtocolError::new(
                "not_joined",
                "join the room before sending to it",
            )));
        };
        let Some(cluster) = &self.shared.cluster else {
            member.room.publish(&self.user, text, self.id, !echo);
            return Ok(());
        };
        // Cluster mode: the message comes back to local members through Redis. Boxed so that
        // the cluster's future does not grow every connection's task.
        let room = member.room.clone();
        let sent = Box::pin(cluster.publish(&room, &self.user, text, self.id, !echo)).await;
        if let Err(e) = sent {
            cluster.publish_local(&room, &self.user, text, self.id, !echo);
            return Err(Ok(ProtocolError::new(
                "cluster_unavailable",
                format!("{e}: delivered to members on this server only"),
            )));
        }
        Ok(())
    }

    /// Joins `name` and writes its welcome frame. `Err(Ok(_))` is answered with an error frame;
    /// `Err(Err(_))` ends the connection.
    async fn join(&mut self, name: &str) -> Result<(), Result<ProtocolError, End>> {
        validate_room(name).map_err(|e| Ok(ProtocolError::new("bad_room", e.room_reason())))?;
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
        let joined = match &self.shared.cluster {
            None => self.shared.hub.join(name, self.id, &self.user),
            // Waits (at most --redis-timeout) for the room's subscription, so that the welcome's
            // seq is exact cluster-wide. Boxed for the same reason as in `publish`.
            Some(cluster) => {
                Box::pin(cluster.join(&self.shared.hub, name, self.id, &self.user)).await
            }
        };
        self.rooms.push(Membership {
            room: joined.room,
            rx: joined.rx,
        });
        self.write_own(&joined.welcome).await
    }

    async fn leave(&mut self, name: &str) -> Result<(), Result<ProtocolError, End>> {
        validate_room(name).map_err(|e| Ok(ProtocolError::new("bad_room", e.room_reason())))?;
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
        match first {
            Ok(out) => {
                if out.is_for(self.id) {
                    batch.push((index, out));
                }
            }
            Err(RecvError::Lagged(_)) => return Some(self.evict(index)),
            // The room's sender lives in the Room we hold: it cannot close while we are in it.
            Err(RecvError::Closed) => return Some(End::Close(1011, "room closed")),
        }
        'rooms: for (i, m) in self.rooms.iter_mut().enumerate() {
            while batch.len() < MAX_BATCH {
                match m.rx.try_recv() {
                    Ok(out) => {
                        if out.is_for(self.id) {
                            batch.push((i, out));
                        }
                    }
                    Err(TryRecvError::Lagged(_)) => {
                        return Some(self.evict(i));
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => continue 'rooms,
                }
            }
            break;
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

/// Leaves `room` locally and, in cluster mode, gives up this membership's stake in its channel.
fn leave_room(shared: &Shared, room: &Arc<Room>, id: u64) {
    match &shared.cluster {
        Some(cluster) => cluster.leave(&shared.hub, room, id),
        None => shared.hub.leave(room, id),
    };
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

/// The close code for a frame the reader refused.
fn end_for_read_error(e: WebSocketError) -> End {
    match e {
        // fastwebsockets already queued its own close 1002 for a bad close code: it was sent
        // with `owed` above.
        WebSocketError::InvalidCloseCode => End::Gone,
        WebSocketError::FrameTooLarge => End::Close(1009, "message too big"),
        WebSocketError::InvalidUTF8 => End::Close(1007, "invalid utf-8"),
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => End::Gone,
        _ => End::Close(1002, "protocol error"),
    }
}
