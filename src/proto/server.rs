//! What the server sends: one `ServerFrame` enum, tagged by `type`, each encoded exactly once
//! into a complete WebSocket text frame (header + JSON payload in one shared `Bytes`).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use fastwebsockets::{Frame, Payload};
use serde::Serialize;

use super::client::ProtocolError;
use super::epoch::Epoch;

/// Every frame the server sends, as its JSON shape (docs/PROTOCOL.md lists them).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// A chat message, to every member (the sender's copy is its acknowledgement).
    Message {
        room: &'a str,
        user: &'a str,
        text: &'a str,
        seq: u64,
        ts: u64,
        /// The publisher's idempotency key, when it gave one (lets it match its own copy).
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    /// The answer to a join: `seq` is the last message the joiner does not get live.
    Welcome {
        room: &'a str,
        user: &'a str,
        members: usize,
        seq: u64,
        /// The incarnation `seq` belongs to: give it back with `since` to recover.
        epoch: Epoch,
        /// The first page of the room's members by id, the joiner included; absent where the
        /// room shows no names (presence `counts` or `off`).
        #[serde(skip_serializing_if = "Option::is_none")]
        users: Option<&'a [UserEntry]>,
        /// There are more members: the next page starts after this id (`users_after`).
        #[serde(skip_serializing_if = "Option::is_none")]
        next_users_after: Option<u64>,
        /// Cluster mode: the other processes' members could not be read; `users` are this
        /// process's only.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        users_partial: bool,
    },
    /// Joins and leaves of one presence interval, coalesced.
    Presence {
        room: &'a str,
        joined: Names<'a>,
        left: Names<'a>,
        members: usize,
        /// Names were left out (more joined or left in one interval than a frame lists).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        /// The member ids of `joined` and `left`, in the same order: a client keeping a member
        /// list applies a change once however often it hears of it. Both absent where the frame
        /// names nobody, or where an older process did not say.
        #[serde(skip_serializing_if = "Option::is_none")]
        joined_ids: Option<Ids<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        left_ids: Option<Ids<'a>>,
    },
    /// A refused client message; the socket stays open.
    Error {
        code: &'a str,
        reason: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// The refused message's `id`: a client with several messages in flight knows which
        /// one failed (its own copies of the others may still be on their way).
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
    Pong,
    /// The socket left `room`: it asked to, or (with `reason`) a refreshed token no longer
    /// allows the room.
    Left {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// The answer to a valid `refresh`: the socket now lives until this `exp` (plus leeway).
    Refreshed {
        exp: u64,
    },
    /// The next `count` message frames of `room` are past messages (a `history` join).
    History {
        room: &'a str,
        count: usize,
        epoch: Epoch,
    },
    /// The next `count` message frames of `room` are past messages from seq `from` (a `since`
    /// join); `complete` is false when messages between `since` and `from` are no longer kept,
    /// or when `since` was in another epoch than `epoch`, the room's now (then `count` is 0:
    /// the client's position means nothing in this numbering).
    Recovery {
        room: &'a str,
        since: u64,
        complete: bool,
        from: u64,
        count: usize,
        epoch: Epoch,
    },
    /// `--lag-policy resync`: this member missed `missed_from..=missed_to`.
    Lagged {
        room: &'a str,
        missed_from: u64,
        missed_to: u64,
    },
    /// A message whose `id` was already published within the dedupe window: not broadcast
    /// again; `seq` is the first copy's.
    Ack {
        room: &'a str,
        id: &'a str,
        seq: u64,
        duplicate: bool,
    },
    /// `$lobby`: one room created.
    RoomCreated {
        room: &'a str,
        /// Joining it needs the room's password (as `GET /api/rooms` says).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        password_protected: bool,
    },
    /// `$lobby`: one room closed.
    RoomClosed {
        room: &'a str,
    },
    /// `$lobby`: a burst of creations and closures within one tick.
    RoomsChanged {
        created: &'a [&'a str],
        /// The rooms of `created` that need a password.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        password_protected: &'a [&'a str],
        closed: &'a [&'a str],
        /// More changed than one frame lists: re-read `GET /api/rooms`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// `$lobby`: the busiest rooms and how many rooms there are.
    RoomCounts {
        rooms: &'a [RoomCount<'a>],
        total: usize,
    },
}

/// A member: its id (the connection's, unique across the cluster) and its user name. Several
/// members may share a user name (one user, two tabs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserEntry {
    pub id: u64,
    pub user: Arc<str>,
}

/// The user names of some members, serialised as a list of names.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a>(pub &'a [UserEntry]);

impl Serialize for Names<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| &*e.user))
    }
}

/// The ids of some members, serialised as a list of ids.
#[derive(Debug, Clone, Copy)]
pub struct Ids<'a>(pub &'a [UserEntry]);

impl Serialize for Ids<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| e.id))
    }
}

/// One room of a `room_counts` frame.
#[derive(Debug, Serialize)]
pub struct RoomCount<'a> {
    pub room: &'a str,
    pub members: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub password_protected: bool,
}

impl ServerFrame<'_> {
    /// The complete WebSocket text frame.
    pub fn encode(&self) -> Bytes {
        encode_frame(self)
    }
}

/// One frame on its way to every member of a room. Shared through an `Arc`: the broadcast ring
/// holds one pointer per slot, and the frame bytes are never copied per member.
#[derive(Debug)]
pub struct Outbound {
    /// The complete WebSocket frame: header and JSON payload.
    pub frame: Bytes,
    /// Connection that published it (0 for the server or REST).
    pub origin: u64,
    /// The origin asked not to receive its own copy (`"echo": false`).
    pub skip_origin: bool,
    /// When it was published, to measure how long it waited before being written.
    pub published_at: Instant,
    /// The room seq of a chat message; 0 for every other frame (presence, notices).
    pub seq: u64,
    /// The Server-Sent Events form of `frame`, made by the first SSE member to deliver it and
    /// shared by the rest: empty in rooms with no SSE member.
    pub sse: OnceLock<Bytes>,
    /// The permessage-deflate frame of the same message, made the first time a member that
    /// negotiated compression needs it and shared by all of them (it is the plain frame again
    /// when compressing did not shrink it). `None`: this frame always goes plain (presence,
    /// notices, a room with `compression = false`).
    pub deflated: Option<OnceLock<Bytes>>,
    /// Not a frame: the room moved to a larger ring, and this is the last item of the old one.
    /// Each member takes its receiver of the new ring from the room (`Room::moved_receiver`),
    /// subscribed when the ring was replaced, so nothing falls between the two.
    pub moved: bool,
}

impl Outbound {
    /// A frame the server makes itself (presence, lobby events, notices): for every member, no
    /// seq, never compressed.
    pub fn notice(frame: Bytes) -> Self {
        Outbound::numbered(frame, 0)
    }

    /// A message numbered `seq` that comes from elsewhere than a local publication (Redis, the
    /// archive, a replay): from no connection here, sent plain.
    pub fn numbered(frame: Bytes, seq: u64) -> Self {
        Outbound {
            frame,
            origin: 0,
            skip_origin: false,
            published_at: Instant::now(),
            seq,
            sse: OnceLock::new(),
            deflated: None,
            moved: false,
        }
    }

    /// The last item of a ring the room replaced with a larger one (see `moved`).
    pub fn moved() -> Self {
        Outbound {
            moved: true,
            ..Outbound::notice(Bytes::new())
        }
    }

    /// Whether the connection `conn` should receive this frame.
    pub fn is_for(&self, conn: u64) -> bool {
        !(self.skip_origin && self.origin == conn)
    }

    /// The frame as one Server-Sent Event (`proto::sse::frame_event`), encoded once per frame
    /// whatever the number of SSE members; `true` when this call encoded it.
    /// `epoch` is the room's: a frame's event is encoded by the first SSE member that needs it.
    pub fn sse_event(&self, epoch: Epoch) -> (&Bytes, bool) {
        let mut encoded = false;
        let event = self.sse.get_or_init(|| {
            encoded = true;
            super::sse::frame_event(epoch, self.seq, frame_payload(&self.frame))
        });
        (event, encoded)
    }
}

/// Largest WebSocket header of an unmasked server frame.
const MAX_HEAD: usize = 10;

/// Serialises `value` as JSON straight into a buffer that already has room for the frame header,
/// then writes the header in front: one allocation, no copy of the payload.
fn encode_frame<T: Serialize>(value: &T) -> Bytes {
    let mut buf = BytesMut::with_capacity(128);
    buf.put_bytes(0, MAX_HEAD);
    let mut writer = buf.writer();
    // Serialising our own plain types into memory cannot fail: every map key is a string and
    // the writer is infallible.
    if serde_json::to_writer(&mut writer, value).is_err() {
        unreachable!("serialising a server frame into memory failed");
    }
    let mut buf = writer.into_inner();
    let mut head = [0u8; MAX_HEAD];
    let head_len = Frame::text(Payload::Borrowed(&buf[MAX_HEAD..])).fmt_head(&mut head);
    let start = MAX_HEAD - head_len;
    buf[start..MAX_HEAD].copy_from_slice(&head[..head_len]);
    let _ = buf.split_to(start);
    buf.freeze()
}

/// The JSON payload of a complete unmasked frame made by `encode` (its header skipped).
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    let start = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(start..).unwrap_or(&[])
}

/// A complete text frame around a JSON payload that is already encoded (history read back from
/// disk): only the header is written, the JSON is copied as it is.
pub fn frame_from_payload(payload: &[u8]) -> Bytes {
    let mut head = [0u8; MAX_HEAD];
    let head_len = Frame::text(Payload::Borrowed(payload)).fmt_head(&mut head);
    let mut buf = BytesMut::with_capacity(head_len + payload.len());
    buf.extend_from_slice(&head[..head_len]);
    buf.extend_from_slice(payload);
    buf.freeze()
}

// The frames made in more than one place, by name.

pub fn message_frame(room: &str, user: &str, text: &str, seq: u64, ts: u64) -> Bytes {
    message_frame_with_id(room, user, text, seq, ts, None)
}

pub fn message_frame_with_id(
    room: &str,
    user: &str,
    text: &str,
    seq: u64,
    ts: u64,
    id: Option<&str>,
) -> Bytes {
    ServerFrame::Message {
        room,
        user,
        text,
        seq,
        ts,
        id,
    }
    .encode()
}

pub fn error_frame(err: &ProtocolError, room: Option<&str>) -> Bytes {
    message_error_frame(err, room, None)
}

/// The error frame refusing a chat message, naming its `id` when it had a valid one.
pub fn message_error_frame(err: &ProtocolError, room: Option<&str>, id: Option<&str>) -> Bytes {
    ServerFrame::Error {
        code: err.code,
        reason: &err.reason,
        room,
        retry_after_ms: err.retry_after_ms,
        id: id.filter(|id| crate::proto::client::validate_id(id).is_ok()),
    }
    .encode()
}
