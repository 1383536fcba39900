//! The wire protocol: what clients send (`client`), what the server sends (`server`, encoded
//! once per message), names of rooms and users (`names`), close codes and control frames
//! (`close`).
//!
//! docs/PROTOCOL.md is the contract; this module is its only implementation.

pub mod client;
pub mod close;
pub mod epoch;
pub mod names;
pub mod server;
pub mod sse;

pub use client::{parse_client_message, validate_id, ClientMessage, ProtocolError, ReplayRequest};
pub use close::{close_frame, encode_control, ping_frame};
pub use epoch::Epoch;
pub use server::{
    error_frame, frame_from_payload, frame_payload, message_error_frame, message_frame,
    message_frame_with_id, Ids, Names, Outbound, RoomCount, ServerFrame, UserEntry,
};

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

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
        assert_eq!(
            parse_client_message(r#"{"type":"refresh","token":"a.b.c"}"#).unwrap(),
            ClientMessage::Refresh {
                token: "a.b.c".into()
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"refresh"}"#)
                .unwrap_err()
                .code,
            "bad_message"
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
                replay: Some(ReplayRequest::Since(7, None))
            }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"join","room":"a","password":"p","since":3}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                password: Some("p".into()),
                replay: Some(ReplayRequest::Since(3, None))
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
        assert_eq!(payload(&ServerFrame::Pong.encode())["type"], "pong");
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
