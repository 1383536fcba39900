//! What publishers put on the wire and what receivers read back: the stamped chat text and the
//! few fields of a server frame the checks need.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// Microseconds since the Unix epoch. Every process of a run reads the same clock, so a stamp
/// made by one worker can be compared with the clock of another.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The client frame a publisher sends: `{"type":"message","text":"<publisher>:<µs>:xxx…"}`,
/// padded with `x` so that `text` is `payload_bytes` long (never shorter than the stamp).
pub fn stamped_message(publisher: u32, sent_us: u64, payload_bytes: usize) -> Vec<u8> {
    let stamp = format!("{publisher}:{sent_us}:");
    let pad = payload_bytes.saturating_sub(stamp.len());
    let mut out = Vec::with_capacity(40 + stamp.len() + pad);
    out.extend_from_slice(br#"{"type":"message","text":""#);
    out.extend_from_slice(stamp.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(br#""}"#);
    out
}

/// Reads `(publisher, sent_us)` back from a chat text; `None` for text this tool did not write.
pub fn parse_stamp(text: &str) -> Option<(u32, u64)> {
    let mut parts = text.splitn(3, ':');
    let publisher = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((publisher, sent))
}

/// The fields of a server frame the load test looks at; the rest is skipped unparsed.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default)]
    pub members: Option<u64>,
}

/// What one text frame from the server means to a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Welcome {
        seq: u64,
    },
    /// A chat message; `stamp` is `None` when the text was not written by this tool.
    Message {
        seq: u64,
        stamp: Option<(u32, u64)>,
    },
    Presence,
    Pong,
    Left,
    Error {
        code: String,
    },
    /// Valid JSON of a type this tool does not know, or not what the protocol promises.
    Other,
}

/// Classifies one server text frame. Never fails: a malformed frame is `Other`, counted by the
/// caller as a protocol problem.
pub fn parse_incoming(bytes: &[u8]) -> Incoming {
    let Ok(frame) = serde_json::from_slice::<ServerFrame<'_>>(bytes) else {
        return Incoming::Other;
    };
    match (frame.kind.as_ref(), frame.seq) {
        ("message", Some(seq)) => Incoming::Message {
            seq,
            stamp: frame.text.as_deref().and_then(parse_stamp),
        },
        ("welcome", Some(seq)) => Incoming::Welcome { seq },
        ("presence", _) => Incoming::Presence,
        ("pong", _) => Incoming::Pong,
        ("left", _) => Incoming::Left,
        ("error", _) => Incoming::Error {
            code: frame.code.map(Cow::into_owned).unwrap_or_default(),
        },
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_through_the_server_frame() {
        let sent = stamped_message(42, 1_700_000_000_123_456, 64);
        let client: serde_json::Value = serde_json::from_slice(&sent).expect("valid JSON");
        let text = client["text"].as_str().expect("text");
        assert_eq!(text.len(), 64);
        assert_eq!(client["type"], "message");
        // what the server sends back to every member
        let echoed = format!(
            r#"{{"type":"message","room":"lt-3","user":"u42","text":"{text}","seq":17,"ts":1700000000123}}"#
        );
        assert_eq!(
            parse_incoming(echoed.as_bytes()),
            Incoming::Message {
                seq: 17,
                stamp: Some((42, 1_700_000_000_123_456))
            }
        );
    }

    #[test]
    fn short_payload_is_never_truncated() {
        let sent = stamped_message(7, 123, 1);
        let v: serde_json::Value = serde_json::from_slice(&sent).expect("valid JSON");
        assert_eq!(v["text"], "7:123:");
        assert_eq!(parse_stamp("7:123:"), Some((7, 123)));
    }

    #[test]
    fn foreign_text_has_no_stamp() {
        assert_eq!(parse_stamp("hello everyone"), None);
        assert_eq!(parse_stamp("1:2"), None);
        assert_eq!(parse_stamp("a:2:x"), None);
    }

    #[test]
    fn classifies_server_frames() {
        assert_eq!(
            parse_incoming(br#"{"type":"welcome","room":"lt-0","user":"u1","members":3,"seq":9}"#),
            Incoming::Welcome { seq: 9 }
        );
        assert_eq!(
            parse_incoming(
                br#"{"type":"presence","room":"lt-0","joined":["a"],"left":[],"members":2}"#
            ),
            Incoming::Presence
        );
        assert_eq!(
            parse_incoming(br#"{"type":"error","code":"not_joined","reason":"x"}"#),
            Incoming::Error {
                code: "not_joined".into()
            }
        );
        assert_eq!(parse_incoming(br#"{"type":"pong"}"#), Incoming::Pong);
        assert_eq!(parse_incoming(b"not json"), Incoming::Other);
        assert_eq!(
            parse_incoming(br#"{"type":"message","text":"no seq"}"#),
            Incoming::Other
        );
        // escaped text still parses (Cow falls back to an owned string)
        assert_eq!(
            parse_incoming(br#"{"type":"message","text":"a\"b","seq":1}"#),
            Incoming::Message {
                seq: 1,
                stamp: None
            }
        );
    }
}
