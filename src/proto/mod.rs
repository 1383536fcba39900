//! The wire protocol: parsing what clients send, and encoding what the server sends exactly once
//! into complete WebSocket frames (header + JSON payload in one shared `Bytes`).
//!
//! docs/PROTOCOL.md is the contract; this module is its only implementation.

pub mod names;

use std::borrow::Cow;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use fastwebsockets::{Frame, Payload};
use serde::{Deserialize, Serialize};

use crate::core::history::ReplayRequest;

/// What a client asked for in one text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// A chat message. `room` is `None` when the client did not name one.
    Message {
        room: Option<Cow<'a, str>>,
        text: Cow<'a, str>,
        /// `false` when the sender asked not to receive its own copy.
        echo: bool,
        /// Idempotency key: a repeat within `--dedupe-window` is acknowledged, not broadcast.
        id: Option<Cow<'a, str>>,
    },
    Join {
        room: Cow<'a, str>,
        /// For a password-protected room (`--rooms-config`). Never logged.
        password: Option<Cow<'a, str>>,
        /// Past messages to send before live ones (`history` or `since`).
        replay: Option<ReplayRequest>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Ping,
}

/// A client frame the server refuses; answered with an error frame, the socket stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: &'static str,
    pub reason: Cow<'static, str>,
    /// For `rate_limited`: when the client may send again.
    pub retry_after_ms: Option<u64>,
}

impl ProtocolError {
    pub fn new(code: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        ProtocolError {
            code,
            reason: reason.into(),
            retry_after_ms: None,
        }
    }

    /// A message dropped by a rate limit; the client may retry after `retry_after_ms`.
    pub fn rate_limited(reason: &'static str, retry_after_ms: u64) -> Self {
        ProtocolError {
            code: "rate_limited",
            reason: Cow::Borrowed(reason),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

#[derive(Deserialize)]
struct RawClientMessage<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    history: Option<u32>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(borrow, default)]
    password: Option<Cow<'a, str>>,
}

/// Parses one client text frame. Text whose first non-blank character is not `{` is a plain chat
/// message; anything starting with `{` must be a JSON object of a known shape.
pub fn parse_client_message(input: &str) -> Result<ClientMessage<'_>, ProtocolError> {
    if !input.trim_start().starts_with('{') {
        if input.trim().is_empty() {
            return Err(ProtocolError::new("bad_message", "message text is empty"));
        }
        return Ok(ClientMessage::Message {
            room: None,
            text: Cow::Borrowed(input),
            echo: true,
            id: None,
        });
    }
    let raw: RawClientMessage<'_> = serde_json::from_str(input).map_err(|e| {
        // serde quotes a wrongly typed string value in full (`invalid type: string "…"`): cap the
        // reason so an error frame never echoes a whole 64 KiB message back (found by fuzzing).
        let detail = e.to_string();
        let detail = clip(&detail, MAX_DETAIL_CHARS);
        if e.is_data() {
            ProtocolError::new("bad_message", format!("unexpected field value: {detail}"))
        } else {
            ProtocolError::new("malformed_json", format!("malformed JSON: {detail}"))
        }
    })?;
    match raw.kind.as_deref() {
        Some("message") | None => {
            let Some(text) = raw.text else {
                return Err(ProtocolError::new(
                    "bad_message",
                    "expected a `type` (message, join, leave, ping) or a `text`",
                ));
            };
            if text.is_empty() {
                return Err(ProtocolError::new("bad_message", "message text is empty"));
            }
            if let Some(id) = &raw.id {
                crate::core::dedupe::validate_id(id)
                    .map_err(|e| ProtocolError::new("bad_id", e))?;
            }
            Ok(ClientMessage::Message {
                room: raw.room,
                text,
                echo: raw.echo.unwrap_or(true),
                id: raw.id,
            })
        }
        Some("join") => Ok(ClientMessage::Join {
            room: need_room(raw.room)?,
            password: raw.password,
            replay: ReplayRequest::from_parts(raw.history, raw.since)
                .map_err(|e| ProtocolError::new("bad_message", e))?,
        }),
        Some("leave") => Ok(ClientMessage::Leave {
            room: need_room(raw.room)?,
        }),
        Some("ping") => Ok(ClientMessage::Ping),
        Some(other) => Err(ProtocolError::new(
            "unknown_type",
            format!("unknown message type `{}`", truncate(other, 32)),
        )),
    }
}

fn need_room(room: Option<Cow<'_, str>>) -> Result<Cow<'_, str>, ProtocolError> {
    room.ok_or_else(|| ProtocolError::new("bad_message", "`room` is required"))
}

/// Longest parser detail quoted in an error reason, in characters.
const MAX_DETAIL_CHARS: usize = 160;

/// `s` cut to `max_chars` characters, with `…` when it was cut.
fn clip(s: &str, max_chars: usize) -> Cow<'_, str> {
    let cut = truncate(s, max_chars);
    if cut.len() == s.len() {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{cut}…"))
    }
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
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
}

impl Outbound {
    /// Whether the connection `conn` should receive this frame.
    pub fn is_for(&self, conn: u64) -> bool {
        !(self.skip_origin && self.origin == conn)
    }
}

/// Largest WebSocket header of an unmasked server frame.
const MAX_HEAD: usize = 10;

/// Serialises `value` as JSON straight into a buffer that already has room for the frame header,
/// then writes the header in front: one allocation, no copy of the payload.
pub fn encode_frame<T: Serialize>(value: &T) -> Bytes {
    let mut buf = BytesMut::with_capacity(128);
    buf.put_bytes(0, MAX_HEAD);
    let mut writer = buf.writer();
    // Serialising our own plain structs into memory cannot fail: every map key is a string and
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

/// Encodes a control or close frame that fastwebsockets asked us to send.
pub fn encode_control(mut frame: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.payload.len() + 16);
    // `write` pads the vector to payload + 16 bytes and returns the part that is the frame.
    let len = frame.write(&mut out).len();
    out.truncate(len);
    out
}

/// A close frame with `code` and a short UTF-8 `reason`.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    encode_control(Frame::close(code, reason.as_bytes()))
}

/// A server ping carrying no payload.
pub fn ping_frame() -> Vec<u8> {
    encode_control(Frame::new(
        true,
        fastwebsockets::OpCode::Ping,
        None,
        Payload::Borrowed(&[]),
    ))
}

#[derive(Serialize)]
pub struct MessageOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: &'a str,
    pub user: &'a str,
    pub text: &'a str,
    pub seq: u64,
    pub ts: u64,
    /// The publisher's idempotency key, when it gave one (lets it match its own copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
}

#[derive(Serialize)]
pub struct WelcomeOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: &'a str,
    pub user: &'a str,
    pub members: usize,
    pub seq: u64,
}

#[derive(Serialize)]
pub struct PresenceOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: &'a str,
    pub joined: &'a [std::sync::Arc<str>],
    pub left: &'a [std::sync::Arc<str>],
    pub members: usize,
}

#[derive(Serialize)]
pub struct ErrorOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: &'a str,
    pub reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct LeftOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
}

/// `room_created` / `room_closed` in `$lobby`: one room's change.
#[derive(Serialize)]
pub struct RoomEventOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: &'a str,
}

/// `rooms_changed` in `$lobby`: a burst of creations and closures within one lobby tick.
#[derive(Serialize)]
pub struct RoomsChangedOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub created: &'a [&'a str],
    pub closed: &'a [&'a str],
    /// More changed than one frame lists: re-read `GET /api/rooms`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// `room_counts` in `$lobby`: the busiest rooms and how many rooms there are.
#[derive(Serialize)]
pub struct RoomCountsOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub rooms: &'a [RoomCount<'a>],
    pub total: usize,
}

#[derive(Serialize)]
pub struct RoomCount<'a> {
    pub room: &'a str,
    pub members: usize,
}

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
    encode_frame(&MessageOut {
        kind: "message",
        room,
        user,
        text,
        seq,
        ts,
        id,
    })
}

/// The JSON payload of a complete unmasked frame made by `encode_frame` (its header skipped).
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

/// Announces the replay that follows a join with `history`: the next `count` message frames
/// of `room` are past messages.
pub fn history_frame(room: &str, count: usize) -> Bytes {
    #[derive(Serialize)]
    struct HistoryOut<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        count: usize,
    }
    encode_frame(&HistoryOut {
        kind: "history",
        room,
        count,
    })
}

/// Announces the replay that follows a join with `since`: the next `count` message frames of
/// `room` are past messages starting at seq `from`. `complete` is false when messages between
/// `since` and `from` are no longer kept.
pub fn recovery_frame(room: &str, since: u64, complete: bool, from: u64, count: usize) -> Bytes {
    #[derive(Serialize)]
    struct RecoveryOut<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        since: u64,
        complete: bool,
        from: u64,
        count: usize,
    }
    encode_frame(&RecoveryOut {
        kind: "recovery",
        room,
        since,
        complete,
        from,
        count,
    })
}

/// Tells a member (`--lag-policy resync`) that it missed messages `missed_from..=missed_to`.
pub fn lagged_frame(room: &str, missed_from: u64, missed_to: u64) -> Bytes {
    #[derive(Serialize)]
    struct LaggedOut<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        missed_from: u64,
        missed_to: u64,
    }
    encode_frame(&LaggedOut {
        kind: "lagged",
        room,
        missed_from,
        missed_to,
    })
}

/// Acknowledges a message whose `id` was already published within the dedupe window: it was
/// not broadcast again; `seq` is the seq the first copy got.
pub fn duplicate_ack_frame(room: &str, id: &str, seq: u64) -> Bytes {
    #[derive(Serialize)]
    struct AckOut<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        id: &'a str,
        seq: u64,
        duplicate: bool,
    }
    encode_frame(&AckOut {
        kind: "ack",
        room,
        id,
        seq,
        duplicate: true,
    })
}

pub fn welcome_frame(room: &str, user: &str, members: usize, seq: u64) -> Bytes {
    encode_frame(&WelcomeOut {
        kind: "welcome",
        room,
        user,
        members,
        seq,
    })
}

pub fn error_frame(err: &ProtocolError, room: Option<&str>) -> Bytes {
    encode_frame(&ErrorOut {
        kind: "error",
        code: err.code,
        reason: &err.reason,
        room,
        retry_after_ms: err.retry_after_ms,
    })
}

pub fn pong_frame() -> Bytes {
    encode_frame(&TypeOnly { kind: "pong" })
}

pub fn left_frame(room: &str) -> Bytes {
    encode_frame(&LeftOut { kind: "left", room })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> serde_json::Value {
        assert_eq!(frame[0], 0x81, "FIN + text opcode");
        let (len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), start + len, "header length matches payload");
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    #[test]
    fn plain_text_is_a_message() {
        assert_eq!(
            parse_client_message("hello there").unwrap(),
            ClientMessage::Message {
                room: None,
                text: "hello there".into(),
                echo: true,
                id: None,
            }
        );
        assert_eq!(parse_client_message("   ").unwrap_err().code, "bad_message");
        assert_eq!(
            parse_client_message("[1,2]").unwrap(),
            ClientMessage::Message {
                room: None,
                text: "[1,2]".into(),
                echo: true,
                id: None,
            }
        );
    }

    #[test]
    fn json_shapes() {
        assert_eq!(
            parse_client_message(r#"{"text":"hi"}"#).unwrap(),
            ClientMessage::Message {
                room: None,
                text: "hi".into(),
                echo: true,
                id: None,
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"message","room":"r","text":"h\"i","echo":false}"#)
                .unwrap(),
            ClientMessage::Message {
                room: Some("r".into()),
                text: "h\"i".into(),
                echo: false,
                id: None,
            }
        );
        assert_eq!(
            parse_client_message(r#" {"type":"join","room":"a"}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: None,
                replay: None
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"join","room":"a","password":"p\u0041"}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: Some("pA".into()),
                replay: None
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"leave","room":"a"}"#).unwrap(),
            ClientMessage::Leave { room: "a".into() }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#).unwrap(),
            ClientMessage::Ping
        );
    }

    #[test]
    fn join_replay_and_message_ids() {
        assert_eq!(
            parse_client_message(r#"{"type":"join","room":"a","history":20}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: None,
                replay: Some(ReplayRequest::Last(20))
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"join","room":"a","since":7}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: None,
                replay: Some(ReplayRequest::Since(7))
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"join","room":"a","password":"p","since":3}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: Some("p".into()),
                replay: Some(ReplayRequest::Since(3))
            }
        );
        assert_eq!(
            parse_client_message(r#"{"text":"hi","id":"k-1"}"#).unwrap(),
            ClientMessage::Message {
                room: None,
                text: "hi".into(),
                echo: true,
                id: Some("k-1".into()),
            }
        );
        let code = |s: &str| parse_client_message(s).unwrap_err().code;
        assert_eq!(
            code(r#"{"type":"join","room":"a","history":-1}"#),
            "bad_message"
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a","history":"5"}"#),
            "bad_message"
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a","since":1,"history":1}"#),
            "bad_message"
        );
        assert_eq!(code(r#"{"text":"hi","id":""}"#), "bad_id");
        assert_eq!(code(r#"{"text":"hi","id":7}"#), "bad_message");
        let long = format!(r#"{{"text":"hi","id":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(&long), "bad_id");
    }

    #[test]
    fn payloads_round_trip_through_frames() {
        for n in [10, 200, 70_000] {
            let f = message_frame("r", "u", &"x".repeat(n), 1, 1);
            let p = frame_payload(&f);
            assert_eq!(frame_from_payload(p), f);
        }
        let v = payload(&message_frame_with_id("r", "u", "t", 3, 4, Some("abc")));
        assert_eq!(v["id"], "abc");
        assert!(payload(&message_frame("r", "u", "t", 3, 4))
            .get("id")
            .is_none());
    }

    #[test]
    fn bad_json_is_classified() {
        let code = |s: &str| parse_client_message(s).unwrap_err().code;
        assert_eq!(code("{not json"), "malformed_json");
        assert_eq!(code(r#"{"type":"message""#), "malformed_json");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"join"}"#), "bad_message");
        assert_eq!(code(r#"{"text":5}"#), "bad_message");
        assert_eq!(code(r#"{"text":""}"#), "bad_message");
        assert_eq!(code(r#"{"hello":"x"}"#), "bad_message");
        assert_eq!(code(r#"{"type":7}"#), "bad_message");
        assert_eq!(
            code(r#"{"type":"join","room":"a","password":1}"#),
            "bad_message"
        );
        let long_value = format!(r#"{{"echo":"{}"}}"#, "x".repeat(70_000));
        let reason = parse_client_message(&long_value).unwrap_err().reason;
        assert!(
            reason.chars().count() < 200,
            "reason echoes the input: {reason}"
        );
    }

    #[test]
    fn frames_are_complete_websocket_text_frames() {
        let f = message_frame("general", "al\"ice", "<b>hi</b>", 7, 1234);
        let v = payload(&f);
        assert_eq!(v["type"], "message");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["text"], "<b>hi</b>");
        assert_eq!(v["seq"], 7);
        // Medium and large payloads get the 16- and 64-bit length forms.
        for n in [200, 70_000] {
            let text = "x".repeat(n);
            let v = payload(&message_frame("r", "u", &text, 1, 1));
            assert_eq!(v["text"].as_str().unwrap().len(), n);
        }
        assert_eq!(payload(&pong_frame())["type"], "pong");
        let e = error_frame(&ProtocolError::new("not_joined", "nope"), Some("r"));
        assert_eq!(payload(&e)["room"], "r");
    }

    #[test]
    fn control_frames() {
        let c = close_frame(1008, "slow consumer");
        assert_eq!(c[0], 0x88);
        assert_eq!(c[1] as usize, 2 + "slow consumer".len());
        assert_eq!(u16::from_be_bytes([c[2], c[3]]), 1008);
        assert_eq!(ping_frame(), vec![0x89, 0]);
    }
}
