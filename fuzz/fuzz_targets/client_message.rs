//! Fuzzes the client-message parser with whatever a client can put in a text frame.
//!
//! Beyond "never panics", it checks:
//! - an accepted JSON frame says what serde_json's own `Value` reading of it says (type, room,
//!   text, echo, id, password, history/since): the parser never invents or drops a field;
//! - plain text is passed through untouched;
//! - errors carry a documented code and a bounded reason, and encode to a valid error frame;
//! - a room named by a join, leave or message either passes `validate_room` (then it is plain
//!   ASCII of at most 64 bytes) or gets the `bad_room` error frame the connection would send;
//! - the frame a message is broadcast in (encoded once for every member) is a complete text
//!   frame whose JSON gives back the exact text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::proto::ReplayRequest;
use roomcast::proto::names::{validate_room, MAX_ROOM_BYTES};
use roomcast::proto::{
    error_frame, message_frame, parse_client_message, ClientMessage, ProtocolError,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The connection closes a non-UTF-8 text frame with 1007 before the parser sees it.
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_message(input) {
        Ok(msg) => check_accepted(input, msg),
        Err(e) => check_refused(&e),
    }
});

fn check_accepted(input: &str, msg: ClientMessage<'_>) {
    let is_json = input.trim_start().starts_with('{');
    if !is_json {
        assert!(!input.trim().is_empty(), "blank text accepted");
        assert_eq!(
            msg,
            ClientMessage::Message {
                room: None,
                text: input.into(),
                echo: true,
                id: None,
            },
            "plain text must be a message to the socket's room, untouched"
        );
        check_broadcast_frame(input);
        return;
    }
    let value = match serde_json::from_str::<Value>(input) {
        Ok(v) => v,
        // Where serde_json is stricter when it builds a `Value` than when it skips a field we
        // do not read (skipping checks the syntax, not the values): nesting deeper than 128
        // levels, a lone surrogate escape (`\ud800` not followed by `\u`, which JSON's grammar
        // allows), a number out of range (`1e999999`). These can only sit in an ignored field:
        // in `type`, `room`, `text`, `echo`, `id`, `password`, `history`, `since` or `token` the parser
        // itself refuses them.
        Err(e) if is_lenient_skip(&e) => return,
        Err(e) => panic!("parser accepted what serde_json rejects ({e}): {input:?}"),
    };
    let obj = value.as_object().expect("accepted JSON is an object");
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let kind = field("type").map(|v| v.as_str().expect("`type` is a string"));
    match msg {
        ClientMessage::Message {
            room,
            text,
            echo,
            id,
        } => {
            assert!(
                matches!(kind, None | Some("message")),
                "{kind:?} as message"
            );
            assert!(!text.is_empty(), "empty text accepted");
            assert_eq!(field("text").and_then(Value::as_str), Some(&*text));
            assert_eq!(field("room").and_then(Value::as_str), room.as_deref());
            match field("echo") {
                Some(v) => assert_eq!(v.as_bool(), Some(echo)),
                None => assert!(echo, "echo defaults to true"),
            }
            assert_eq!(field("id").and_then(Value::as_str), id.as_deref());
            if let Some(id) = id.as_deref() {
                assert!(
                    roomcast::proto::validate_id(id).is_ok(),
                    "accepted id {id:?}"
                );
            }
            if let Some(room) = room.as_deref() {
                check_room(room);
            }
            check_broadcast_frame(&text);
        }
        ClientMessage::Join {
            room,
            password,
            replay,
        } => {
            assert_eq!(kind, Some("join"));
            assert_eq!(field("room").and_then(Value::as_str), Some(&*room));
            assert_eq!(
                field("password").and_then(Value::as_str),
                password.as_deref()
            );
            let expected = match (field("history"), field("since")) {
                (None, None) => None,
                (Some(n), None) => Some(ReplayRequest::Last(
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .expect("`history` is a u32"),
                )),
                (None, Some(s)) => Some(ReplayRequest::Since(
                    s.as_u64().expect("`since` is a u64"),
                    field("epoch").map(|e| {
                        e.as_str()
                            .and_then(|e| e.parse().ok())
                            .expect("`epoch` is an epoch")
                    }),
                )),
                (Some(_), Some(_)) => panic!("`history` and `since` together accepted"),
            };
            assert_eq!(replay, expected);
            check_room(&room);
        }
        ClientMessage::Leave { room } => {
            assert_eq!(kind, Some("leave"));
            assert_eq!(field("room").and_then(Value::as_str), Some(&*room));
            check_room(&room);
        }
        ClientMessage::Refresh { token } => {
            assert_eq!(kind, Some("refresh"));
            assert_eq!(field("token").and_then(Value::as_str), Some(&*token));
        }
        ClientMessage::Ping => assert_eq!(kind, Some("ping")),
    }
}

fn is_lenient_skip(e: &serde_json::Error) -> bool {
    let msg = e.to_string();
    [
        "recursion limit",
        "hex escape",
        "surrogate",
        "number out of range",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

/// What the connection does with a room a client named: use it only if it is valid, else
/// answer `bad_room` without echoing the name (the error frame's `room` label is dropped).
fn check_room(room: &str) {
    match validate_room(room) {
        Ok(()) => {
            assert!(!room.is_empty() && room.len() <= MAX_ROOM_BYTES);
            assert!(room.is_ascii(), "valid room is ASCII: {room:?}");
        }
        Err(e) => {
            let err = ProtocolError::new("bad_room", e.room_reason());
            let v = decode_text_frame(&error_frame(&err, None));
            assert_eq!(v["type"], "error");
            assert_eq!(v["code"], "bad_room");
            assert!(v.get("room").is_none());
        }
    }
}

fn check_refused(e: &ProtocolError) {
    assert!(
        matches!(
            e.code,
            "malformed_json" | "bad_message" | "unknown_type" | "bad_id"
        ),
        "undocumented code {}",
        e.code
    );
    assert!(!e.reason.is_empty());
    assert!(
        e.reason.chars().count() <= 200,
        "reason echoes too much of the input ({} chars)",
        e.reason.chars().count()
    );
    let v = decode_text_frame(&error_frame(e, None));
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], e.code);
    assert_eq!(v["reason"].as_str(), Some(&*e.reason));
}

fn check_broadcast_frame(text: &str) {
    let v = decode_text_frame(&message_frame("room", "user", text, 7, 1));
    assert_eq!(v["type"], "message");
    assert_eq!(
        v["text"].as_str(),
        Some(text),
        "broadcast frame changes the text"
    );
    assert_eq!(v["seq"], 7);
}

/// Reads one unmasked server frame: FIN + text opcode, a length that covers the rest exactly,
/// and a JSON payload.
fn decode_text_frame(frame: &[u8]) -> Value {
    assert_eq!(frame[0], 0x81, "FIN + text");
    let (len, start) = match frame[1] {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&frame[2..10]);
            (usize::try_from(u64::from_be_bytes(n)).unwrap(), 10)
        }
        n => (usize::from(n), 2),
    };
    assert!(frame[1] & 0x80 == 0, "server frames are unmasked");
    assert_eq!(
        frame.len(),
        start + len,
        "header length matches the payload"
    );
    serde_json::from_slice(&frame[start..]).expect("frame payload is JSON")
}
