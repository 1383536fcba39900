//! What roomcast processes say to each other on a room's Redis channel.
//!
//! Two kinds of payload, told apart by their first byte:
//! - a chat message, `"<epoch>:<seq> <json>"`: the publish script (`scripts::PUBLISH`) puts
//!   the room's epoch and the seq it took from Redis in front of the JSON body the publisher
//!   built, so that every process receives the same position with the same message (`"<seq>
//!   <json>"`, from processes that predate epochs, is read with no epoch);
//! - a presence update, `"p <json>"`: the joins and leaves one process saw during one presence
//!   interval, with its member count of the room now.
//!
//! The body carries everything a process needs to encode the client frame itself (user, text,
//! `ts`), so every process builds byte-identical frames.
//!
//! Each process also keeps its members in Redis (its roster, one sorted set): one entry per
//! membership, `"<room> <id, 16 hex digits> <user>"`, all at score 0, so that the entries of one
//! room sort together and by member id (`roster_entry`, `parse_roster_entry`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::proto::names::validate_user;
use crate::proto::validate_id;
use crate::proto::Epoch;

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
    /// The member ids of `joined`, in its order. Absent (empty) from older processes.
    #[serde(rename = "ji", default, skip_serializing_if = "Vec::is_empty")]
    pub joined_ids: Vec<u64>,
    /// The member ids of `left`, in its order.
    #[serde(rename = "li", default, skip_serializing_if = "Vec::is_empty")]
    pub left_ids: Vec<u64>,
}

/// A payload received on a room channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload<'a> {
    Message {
        seq: u64,
        /// The room's epoch (none from processes that predate epochs).
        epoch: Option<Epoch>,
        body: MessageBody<'a>,
    },
    Presence(PresenceBody<'a>),
}

/// Largest seq and timestamp accepted from the channel: 2^53 − 1. Clients read both as JSON
/// numbers (a browser loses precision past it) and the publish script raises a room's seq with
/// Lua numbers (doubles), so a real seq never gets there; a larger one could only poison the
/// room (every later message would look stale) or wrap an addition.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Most members one process may claim in one room: more sockets than any process can hold.
pub const MAX_MEMBER_COUNT: usize = u32::MAX as usize;

/// Longest node id accepted (ours are 16 hex digits).
pub const MAX_NODE_BYTES: usize = 64;

/// Why a payload could not be read or was refused. Anything can PUBLISH on a channel (another
/// program, a version mismatch, someone with access to Redis): every field is checked against
/// the rules a local publication obeys before the payload may reach a member.
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
    #[error("seq is 0 or past 2^53 - 1")]
    BadSeq,
    #[error("epoch is not 12 base32 characters")]
    BadEpoch,
    #[error("timestamp is past 2^53 - 1")]
    BadTs,
    #[error("node id is empty, too long or not alphanumeric")]
    BadNode,
    #[error("user name breaks the name rules")]
    BadUser,
    #[error("text is empty or longer than --max-message-bytes")]
    BadText,
    #[error("message id is empty, too long or has control characters")]
    BadId,
    #[error("presence count is larger than any process holds")]
    BadCount,
    #[error("presence names a user that breaks the name rules")]
    BadPresenceName,
    #[error("presence ids do not go with its names, or one is 0 or past 2^53 - 1")]
    BadPresenceIds,
    #[error("roster entry is not `<room> <16 hex digits> <user>` for this room")]
    BadRosterEntry,
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

/// Reads a payload and checks every field: `max_text_bytes` is `--max-message-bytes`, the
/// most a local publication may carry. Never panics, whatever the bytes.
pub fn decode(payload: &[u8], max_text_bytes: usize) -> Result<Payload<'_>, WireError> {
    let text = std::str::from_utf8(payload).map_err(|_| WireError::NotUtf8)?;
    let (head, body) = text.split_once(' ').ok_or(WireError::BadHeader)?;
    if head == "p" {
        let body: PresenceBody<'_> = serde_json::from_str(body)?;
        check_presence(&body)?;
        return Ok(Payload::Presence(body));
    }
    let (epoch, seq) = match head.split_once(':') {
        Some((epoch, seq)) => (Some(epoch.parse().map_err(|_| WireError::BadEpoch)?), seq),
        None => (None, head),
    };
    let seq: u64 = seq.parse().map_err(|_| WireError::BadHeader)?;
    let body: MessageBody<'_> = serde_json::from_str(body)?;
    check_message(seq, &body, max_text_bytes)?;
    Ok(Payload::Message { seq, epoch, body })
}

fn check_node(node: &str) -> Result<(), WireError> {
    if node.is_empty()
        || node.len() > MAX_NODE_BYTES
        || !node.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(WireError::BadNode);
    }
    Ok(())
}

fn check_message(seq: u64, body: &MessageBody<'_>, max_text_bytes: usize) -> Result<(), WireError> {
    if seq == 0 || seq > MAX_SAFE_INTEGER {
        return Err(WireError::BadSeq);
    }
    if body.ts > MAX_SAFE_INTEGER {
        return Err(WireError::BadTs);
    }
    check_node(&body.node)?;
    validate_user(&body.user).map_err(|_| WireError::BadUser)?;
    if body.text.is_empty() || body.text.len() > max_text_bytes {
        return Err(WireError::BadText);
    }
    if body
        .id
        .as_deref()
        .is_some_and(|id| validate_id(id).is_err())
    {
        return Err(WireError::BadId);
    }
    // An author is a map key in every room's dedupe.
    if body.author.as_deref().is_some_and(|a| {
        a.is_empty() || a.len() > MAX_AUTHOR_BYTES || a.chars().any(char::is_control)
    }) {
        return Err(WireError::BadAuthor);
    }
    Ok(())
}

fn check_presence(body: &PresenceBody<'_>) -> Result<(), WireError> {
    check_node(&body.node)?;
    if body.count > MAX_MEMBER_COUNT {
        return Err(WireError::BadCount);
    }
    // Ids come with every name or not at all (an older process sends none).
    let ids = body.joined_ids.len() + body.left_ids.len();
    let paired =
        body.joined_ids.len() == body.joined.len() && body.left_ids.len() == body.left.len();
    if (ids > 0 && !paired)
        || body
            .joined_ids
            .iter()
            .chain(&body.left_ids)
            .any(|id| *id == 0 || *id > MAX_SAFE_INTEGER)
    {
        return Err(WireError::BadPresenceIds);
    }
    if body
        .joined
        .iter()
        .chain(&body.left)
        .any(|name| validate_user(name).is_err())
    {
        return Err(WireError::BadPresenceName);
    }
    Ok(())
}

/// Longest roster entry accepted: a room name, a space, 16 hex digits, a space and a user name
/// of 32 characters of at most 4 bytes each.
pub const MAX_ROSTER_ENTRY_BYTES: usize = crate::proto::names::MAX_ROOM_BYTES + 1 + 16 + 1 + 32 * 4;

/// The roster entry of member `id`, `user`, in `room`.
pub fn roster_entry(room: &str, id: u64, user: &str) -> String {
    format!("{room} {id:016x} {user}")
}

/// The lexicographic range (ZRANGEBYLEX min, max) of `room`'s entries with ids above `after`.
/// A space sorts below every byte a room name may hold, so no other room's entries fall in it.
pub fn roster_range(room: &str, after: Option<u64>) -> (String, String) {
    let min = match after {
        Some(id) => format!("[{room} {:016x}", id.saturating_add(1)),
        None => format!("[{room} "),
    };
    (min, format!("({room}!"))
}

/// Reads one roster entry of `room` from Redis: its member id and user name, checked like
/// anything else that comes from there.
pub fn parse_roster_entry<'a>(room: &str, entry: &'a [u8]) -> Result<(u64, &'a str), WireError> {
    if entry.len() > MAX_ROSTER_ENTRY_BYTES {
        return Err(WireError::BadRosterEntry);
    }
    let text = std::str::from_utf8(entry).map_err(|_| WireError::NotUtf8)?;
    let rest = text
        .strip_prefix(room)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(WireError::BadRosterEntry)?;
    let (hex, user) = rest.split_once(' ').ok_or(WireError::BadRosterEntry)?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(WireError::BadRosterEntry);
    }
    let id = u64::from_str_radix(hex, 16).map_err(|_| WireError::BadRosterEntry)?;
    if id == 0 || id > MAX_SAFE_INTEGER {
        return Err(WireError::BadRosterEntry);
    }
    validate_user(user).map_err(|_| WireError::BadUser)?;
    Ok((id, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 100;

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
        let epoch = Epoch::random();
        let payload = format!("{epoch}:42 {}", encode_message(&body));
        let older = format!("42 {}", encode_message(&body));
        let bad = format!("zz:42 {}", encode_message(&body));
        assert_eq!(
            decode(payload.as_bytes(), MAX).unwrap(),
            Payload::Message {
                seq: 42,
                epoch: Some(epoch),
                body
            }
        );
        assert!(matches!(
            decode(older.as_bytes(), MAX),
            Ok(Payload::Message { epoch: None, .. })
        ));
        assert!(matches!(
            decode(bad.as_bytes(), MAX),
            Err(WireError::BadEpoch)
        ));
    }

    #[test]
    fn a_message_without_an_author_is_keyed_by_its_node_and_connection() {
        let payload = br#"9 {"n":"n1","o":7,"k":false,"t":1,"u":"u","x":"x","i":"k"}"#;
        let Ok(Payload::Message { body, .. }) = decode(payload, MAX) else {
            panic!("an older process's message must still decode");
        };
        assert_eq!(body.author, None);
        assert_eq!(body.legacy_author(), "c:n1:7");
        let long = "a".repeat(MAX_AUTHOR_BYTES + 1);
        let payload =
            format!(r#"9 {{"n":"n1","o":7,"k":false,"t":1,"u":"u","x":"x","a":"{long}"}}"#);
        assert!(matches!(
            decode(payload.as_bytes(), MAX),
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
            joined_ids: vec![4, 9],
            left_ids: vec![],
        };
        let payload = encode_presence(&body);
        assert_eq!(
            decode(payload.as_bytes(), MAX).unwrap(),
            Payload::Presence(body)
        );
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
            assert!(
                decode(bad, MAX).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A message payload with one field replaced.
    fn message_with(seq: &str, field: &str, value: &str) -> String {
        let mut v = serde_json::json!({"n":"n1","o":1,"k":false,"t":1,"u":"u","x":"hi","i":"k"});
        v[field] = serde_json::from_str(value).unwrap();
        format!("{seq} {v}")
    }

    #[test]
    fn every_field_is_checked_against_the_local_rules() {
        let ok = message_with("1", "t", "1");
        assert!(decode(ok.as_bytes(), MAX).is_ok());
        let max_seq = MAX_SAFE_INTEGER.to_string();
        assert!(decode(message_with(&max_seq, "t", "1").as_bytes(), MAX).is_ok());
        let cases: Vec<(String, &str)> = vec![
            (message_with("0", "t", "1"), "seq"),
            (
                message_with(&(MAX_SAFE_INTEGER + 1).to_string(), "t", "1"),
                "seq",
            ),
            (message_with(&u64::MAX.to_string(), "t", "1"), "seq"),
            (message_with("18446744073709551616", "t", "1"), "header"),
            (message_with("1", "t", &u64::MAX.to_string()), "ts"),
            (message_with("1", "t", "-1"), "json"),
            (message_with("1", "n", r#""""#), "node"),
            (message_with("1", "n", r#""a:b""#), "node"),
            (
                message_with("1", "n", &format!("\"{}\"", "a".repeat(65))),
                "node",
            ),
            (message_with("1", "u", r#""""#), "user"),
            (message_with("1", "u", r#""a\u0007b""#), "user"),
            (
                message_with("1", "u", &format!("\"{}\"", "a".repeat(33))),
                "user",
            ),
            (message_with("1", "x", r#""""#), "text"),
            (
                message_with("1", "x", &format!("\"{}\"", "a".repeat(MAX + 1))),
                "text",
            ),
            (message_with("1", "i", r#""""#), "id"),
            (
                message_with("1", "i", &format!("\"{}\"", "a".repeat(65))),
                "id",
            ),
            (message_with("1", "o", "-1"), "json"),
        ];
        for (payload, what) in cases {
            assert!(
                decode(payload.as_bytes(), MAX).is_err(),
                "{what}: {payload}"
            );
        }
        // Exactly at the limit passes: the bound is the local one.
        let at = message_with("1", "x", &format!("\"{}\"", "a".repeat(MAX)));
        assert!(decode(at.as_bytes(), MAX).is_ok());
    }

    #[test]
    fn presence_is_checked_too() {
        let p = |v: serde_json::Value| format!("p {v}");
        let ok = p(serde_json::json!({"n":"n1","c":2,"j":["al"],"l":[]}));
        assert!(decode(ok.as_bytes(), MAX).is_ok());
        let ok = p(serde_json::json!({"n":"n1","c":2,"j":["al"],"l":["bo"],"ji":[3],"li":[1]}));
        assert!(decode(ok.as_bytes(), MAX).is_ok());
        for bad in [
            serde_json::json!({"n":"n1","c":u64::MAX,"j":[],"l":[]}),
            serde_json::json!({"n":"n1","c":(MAX_MEMBER_COUNT as u64) + 1,"j":[],"l":[]}),
            serde_json::json!({"n":"n1","c":-1,"j":[],"l":[]}),
            serde_json::json!({"n":"","c":1,"j":[],"l":[]}),
            serde_json::json!({"n":"n1","c":1,"j":[""],"l":[]}),
            serde_json::json!({"n":"n1","c":1,"j":[],"l":["a\u{0}"]}),
            serde_json::json!({"n":"n1","c":1,"j":["a"],"l":[],"ji":[1,2]}),
            serde_json::json!({"n":"n1","c":1,"j":["a"],"l":["b"],"ji":[1]}),
            serde_json::json!({"n":"n1","c":1,"j":["a"],"l":[],"ji":[0]}),
            serde_json::json!({"n":"n1","c":1,"j":["a"],"l":[],"ji":[MAX_SAFE_INTEGER + 1]}),
        ] {
            assert!(decode(p(bad.clone()).as_bytes(), MAX).is_err(), "{bad}");
        }
    }

    #[test]
    fn roster_entries_round_trip_and_strangers_are_refused() {
        let e = roster_entry("post:1", 0x2a, "al ice");
        assert_eq!(e, "post:1 000000000000002a al ice");
        assert_eq!(
            parse_roster_entry("post:1", e.as_bytes()).unwrap(),
            (42, "al ice")
        );
        // Another room's entry, even one whose name starts the same.
        assert!(parse_roster_entry("post:1", b"post:12 000000000000002a al").is_err());
        assert!(parse_roster_entry("post", e.as_bytes()).is_err());
        for bad in [
            &b"post:1 2a al"[..],
            b"post:1 000000000000002A al",
            b"post:1 0000000000000000 al",
            b"post:1 0020000000000000 al",
            b"post:1 000000000000002a ",
            b"post:1 000000000000002a a\x07",
            b"post:1 000000000000002a \xff",
            b"post:1 000000000000002a",
        ] {
            assert!(
                parse_roster_entry("post:1", bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = roster_entry("post:1", 1, &"\u{10FFFF}".repeat(33));
        assert!(parse_roster_entry("post:1", long.as_bytes()).is_err());
        // The range holds exactly the room's entries past the id.
        let (min, max) = roster_range("r", Some(0x2a));
        let inside = |e: &str| e >= &min[1..] && e < &max[1..];
        assert!(inside(&roster_entry("r", 0x2b, "x")));
        assert!(!inside(&roster_entry("r", 0x2a, "\u{10FFFF}\u{10FFFF}")));
        assert!(!inside(&roster_entry("r", 0x29, "x")));
        assert!(!inside(&roster_entry("r.x", 0x2b, "x")));
        assert!(!inside(&roster_entry("r#", 0x2b, "x")));
        let (min, _) = roster_range("r", None);
        assert_eq!(min, "[r ");
    }
}
