//! The wire protocol: parsing what clients send, and encoding what the server sends exactly once
//! into complete WebSocket frames (header + JSON payload in one shared `Bytes`).
//!
//! docs/PROTOCOL.md is the contract; this module is its only implementation.

use std::borrow::Cow;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use fastwebsockets::{Frame, Payload};
use serde::{Deserialize, Serialize};

/// What a client asked for in one text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// A chat message. `room` is `None` when the client did not name one.
    Message {
        room: Option<Cow<'a, str>>,
        text: Cow<'a, str>,
        /// `false` when the sender asked not to receive its own copy.
        echo: bool,
    },
    Join {
        room: Cow<'a, str>,
        /// For a password-protected room (`--rooms-config`). Never logged.
        password: Option<Cow<'a, str>>,
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
        });
    }
    let raw: RawClientMessage<'_> = serde_json::from_str(input).map_err(|e| {
        if e.is_data() {
            ProtocolError::new("bad_message", format!("unexpected field value: {e}"))
        } else {
            ProtocolError::new("malformed_json", format!("malformed JSON: {e}"))
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
            Ok(ClientMessage::Message {
                room: raw.room,
                text,
                echo: raw.echo.unwrap_or(true),
            })
        }
        Some("join") => Ok(ClientMessage::Join {
            room: need_room(raw.room)?,
            password: raw.password,
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
    encode_frame(&MessageOut {
        kind: "message",
        room,
        user,
        text,
        seq,
        ts,
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
                echo: true
            }
        );
        assert_eq!(parse_client_message("   ").unwrap_err().code, "bad_message");
        assert_eq!(
            parse_client_message("[1,2]").unwrap(),
            ClientMessage::Message {
                room: None,
                text: "[1,2]".into(),
                echo: true
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
                echo: true
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"message","room":"r","text":"h\"i","echo":false}"#)
                .unwrap(),
            ClientMessage::Message {
                room: Some("r".into()),
                text: "h\"i".into(),
                echo: false
            }
        );
        assert_eq!(
            parse_client_message(r#" {"type":"join","room":"a"}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: None
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"join","room":"a","password":"p\u0041"}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: Some("pA".into())
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
