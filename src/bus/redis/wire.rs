//! What roomcast processes say to each other on a room's Redis channel.
//!
//! Two kinds of payload, told apart by their first byte:
//! - a chat message, `"<seq> <json>"`: the publish script (`scripts::PUBLISH`) puts the seq it
//!   took from Redis in front of the JSON body the publisher built, so that every process
//!   receives the same seq with the same message;
//! - a presence update, `"p <json>"`: the joins and leaves one process saw during one presence
//!   interval, with its member count of the room now.
//!
//! The body carries everything a process needs to encode the client frame itself (user, text,
//! `ts`), so every process builds byte-identical frames.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A chat message as published to Redis (the seq is added by the script).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageBody<'a> {
    /// Node id of the publishing process.
    #[serde(rename = "n", borrow)]
    pub node: Cow<'a, str>,
    /// Connection id of the publisher on that process (0: REST).
    #[serde(rename = "o")]
    pub origin: u64,
    /// The publisher asked not to receive its own copy.
    #[serde(rename = "k")]
    pub skip_origin: bool,
    /// Publication time, Unix milliseconds, from the publisher's clock.
    #[serde(rename = "t")]
    pub ts: u64,
    #[serde(rename = "u", borrow)]
    pub user: Cow<'a, str>,
    #[serde(rename = "x", borrow)]
    pub text: Cow<'a, str>,
    /// The message's idempotency key (`id`), if it has one. Absent from messages of processes
    /// that predate it.
    #[serde(rename = "i", borrow, default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    /// Whose `id` it is (`dedupe::Author::key`, a connection's qualified with its node id), so
    /// that every process deduplicates per author alike. Sent with an `id` only. Absent from
    /// messages of processes that predate it: those are keyed by node and connection
    /// (`legacy_author`).
    #[serde(rename = "a", borrow, default, skip_serializing_if = "Option::is_none")]
    pub author: Option<Cow<'a, str>>,
}

/// The longest author key accepted from the channel: `u:` and a user name of at most 32
/// characters (4 bytes each), or `c:`, a node id and a connection id.
pub const MAX_AUTHOR_BYTES: usize = 256;

impl MessageBody<'_> {
    /// The dedupe author of a message whose process did not send one: its publishing
    /// connection, qualified like `Cluster::publish_message` qualifies one.
    pub fn legacy_author(&self) -> String {
        format!("c:{}:{}", self.node, self.origin)
    }
}

/// One process's joins and leaves of a room during one presence interval.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceBody<'a> {
    #[serde(rename = "n", borrow)]
    pub node: Cow<'a, str>,
    /// That process's member count of the room after these changes.
    #[serde(rename = "c")]
    pub count: usize,
    #[serde(rename = "j", borrow)]
    pub joined: Vec<Cow<'a, str>>,
    #[serde(rename = "l", borrow)]
    pub left: Vec<Cow<'a, str>>,
    /// That process left names out of `joined` or `left`. Absent (false) from older processes.
    #[serde(rename = "t", default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// A payload received on a room channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    Message { seq: u64, body: MessageBody<'a> },
    Presence(PresenceBody<'a>),
}

/// Why a payload could not be read (another program on the channel, or a version mismatch).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("payload has no recognisable header")]
    BadHeader,
    #[error("payload body: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message author is empty, too long or has control characters")]
    BadAuthor,
}

/// The JSON body of a chat message (the publish script prefixes the seq).
pub fn encode_message(body: &MessageBody<'_>) -> String {
    // Plain structs of strings and integers always serialise.
    serde_json::to_string(body).unwrap_or_default()
}

/// A complete presence payload.
pub fn encode_presence(body: &PresenceBody<'_>) -> String {
    let mut out = String::from("p ");
    out.push_str(&serde_json::to_string(body).unwrap_or_default());
    out
}

pub fn decode(payload: &[u8]) -> Result<Payload<'_>, WireError> {
    let text = std::str::from_utf8(payload).map_err(|_| WireError::NotUtf8)?;
    let (head, body) = text.split_once(' ').ok_or(WireError::BadHeader)?;
    if head == "p" {
        return Ok(Payload::Presence(serde_json::from_str(body)?));
    }
    let seq: u64 = head.parse().map_err(|_| WireError::BadHeader)?;
    let body: MessageBody<'_> = serde_json::from_str(body)?;
    // Anything may write to the channel; an author is a map key in every room's dedupe.
    if body.author.as_deref().is_some_and(|a| {
        a.is_empty() || a.len() > MAX_AUTHOR_BYTES || a.chars().any(char::is_control)
    }) {
        return Err(WireError::BadAuthor);
    }
    Ok(Payload::Message { seq, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_round_trip_with_the_seq_the_script_adds() {
        let body = MessageBody {
            node: "n1".into(),
            origin: 7,
            skip_origin: true,
            ts: 1234,
            user: "al ice".into(),
            text: "say \"hi\" \u{1F600}\n".into(),
            id: Some("k-1".into()),
            author: Some("u:al ice".into()),
        };
        let payload = format!("42 {}", encode_message(&body));
        assert_eq!(
            decode(payload.as_bytes()).unwrap(),
            Payload::Message { seq: 42, body }
        );
    }

    #[test]
    fn a_message_without_an_author_is_keyed_by_its_node_and_connection() {
        let payload = br#"9 {"n":"n1","o":7,"k":false,"t":1,"u":"u","x":"x","i":"k"}"#;
        let Ok(Payload::Message { body, .. }) = decode(payload) else {
            panic!("an older process's message must still decode");
        };
        assert_eq!(body.author, None);
        assert_eq!(body.legacy_author(), "c:n1:7");
        let long = "a".repeat(MAX_AUTHOR_BYTES + 1);
        let payload =
            format!(r#"9 {{"n":"n1","o":7,"k":false,"t":1,"u":"u","x":"x","a":"{long}"}}"#);
        assert!(matches!(
            decode(payload.as_bytes()),
            Err(WireError::BadAuthor)
        ));
    }

    #[test]
    fn presence_round_trip() {
        let body = PresenceBody {
            node: "n2".into(),
            count: 3,
            joined: vec!["a".into(), "b c".into()],
            left: vec![],
            truncated: true,
        };
        let payload = encode_presence(&body);
        assert_eq!(decode(payload.as_bytes()).unwrap(), Payload::Presence(body));
    }

    #[test]
    fn foreign_payloads_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"hello",
            b"x {}",
            b"12 not json",
            b"p []",
            b"\xff\xfe 1",
            b"-1 {}",
            br#"1 {"n":"n","o":1,"k":false,"t":1,"u":"u","x":"x","i":"k","a":""}"#,
            br#"1 {"n":"n","o":1,"k":false,"t":1,"u":"u","x":"x","i":"k","a":"u:\u0000"}"#,
            br#"1 {"n":"n","o":1,"k":false,"t":1,"u":"u","x":"x","i":"k","a":5}"#,
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
