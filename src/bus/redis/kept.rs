//! Cluster-wide history: what Redis keeps of a room (a capped list of the payloads the publish
//! script published, `scripts::PUBLISH`) turned into the history frames of a room this process
//! is about to create.
//!
//! The SEED script answers a room's seq together with its list, atomically, right after this
//! process subscribed to the room's channel: the list ends at that seq and every later message
//! arrives on the channel. Until the first local joiner creates the room, such later messages
//! are appended here too (`push`), so the ring the room starts with runs up to the room's start
//! seq with no gap and no duplicate. Each message is encoded once, into the frame every member
//! and every replay shares.

use std::sync::Arc;

use super::wire::{self, MessageBody};
use super::ClusterError;
use crate::proto::{self, Epoch, Outbound};

/// The frame of a message received (or kept) from Redis, encoded like a local publication.
/// `body` has passed `wire::decode`'s checks.
pub(super) fn frame_of(room: &str, seq: u64, body: &MessageBody<'_>) -> Arc<Outbound> {
    Arc::new(Outbound::numbered(
        proto::message_frame_with_id(
            room,
            &body.user,
            &body.text,
            seq,
            body.ts,
            body.id.as_deref(),
        ),
        seq,
    ))
}

/// The frames of a kept list (oldest first) up to `max_seq`, in ascending seq order, and how
/// many were dropped: `out_of_order` for not being past the one before them (the publish script
/// only ever appends in order: someone else wrote to the list), `invalid` for not being a valid
/// chat message (`wire::decode`, with `max_text_bytes`).
pub(super) fn from_list(
    room: &str,
    payloads: &[Vec<u8>],
    max_seq: u64,
    max_text_bytes: usize,
) -> FromList {
    let mut list = FromList {
        frames: Vec::with_capacity(payloads.len()),
        out_of_order: 0,
        invalid: 0,
    };
    for payload in payloads {
        match wire::decode(payload, max_text_bytes) {
            Ok(wire::Payload::Message { seq, body, .. }) => {
                if list.frames.last().is_some_and(|o| seq <= o.seq) {
                    list.out_of_order += 1;
                } else if seq <= max_seq {
                    list.frames.push(frame_of(room, seq, &body));
                }
            }
            // The list only ever holds what the publish script pushed: chat messages.
            Ok(wire::Payload::Presence(_)) | Err(_) => list.invalid += 1,
        }
    }
    list
}

/// What `from_list` read from a room's kept list.
pub(super) struct FromList {
    /// Oldest first.
    pub(super) frames: Vec<Arc<Outbound>>,
    pub(super) out_of_order: u64,
    pub(super) invalid: u64,
}

/// Appends `out` unless it is not past the last kept frame; keeps at most `depth`.
pub(super) fn push(kept: &mut Vec<Arc<Outbound>>, out: Arc<Outbound>, depth: usize) {
    if depth == 0 || kept.last().is_some_and(|o| o.seq >= out.seq) {
        return;
    }
    kept.push(out);
    if kept.len() > depth {
        kept.drain(..kept.len() - depth);
    }
}

/// `fresh` (the list just read) followed by what `arrived` on the channel after it.
pub(super) fn merge(
    fresh: Vec<Arc<Outbound>>,
    arrived: Vec<Arc<Outbound>>,
    depth: usize,
) -> Vec<Arc<Outbound>> {
    let mut kept = fresh;
    for out in arrived {
        push(&mut kept, out, depth);
    }
    if kept.len() > depth {
        kept.drain(..kept.len() - depth);
    }
    kept
}

/// One room's seq and the payloads its list kept (oldest first), as SEED answers them.
pub(super) type Seeded = (u64, Vec<Vec<u8>>, Epoch);

/// Reads the SEED script's answer: per room, `[seq, [payload, …]]`.
pub(super) fn parse_seed(value: redis::Value, rooms: usize) -> Result<Vec<Seeded>, ClusterError> {
    use redis::Value;
    let Value::Array(items) = value else {
        return Err(ClusterError::Protocol("SEED did not answer an array"));
    };
    if items.len() != rooms {
        return Err(ClusterError::Protocol(
            "SEED answered the wrong number of rooms",
        ));
    }
    items
        .into_iter()
        .map(|item| {
            let Value::Array(pair) = item else {
                return Err(ClusterError::Protocol("SEED room is not an array"));
            };
            let mut pair = pair.into_iter();
            let (Some(Value::Int(seq)), Some(list), Some(Value::BulkString(epoch))) =
                (pair.next(), pair.next(), pair.next())
            else {
                return Err(ClusterError::Protocol(
                    "SEED room is not [seq, list, epoch]",
                ));
            };
            let epoch = std::str::from_utf8(&epoch)
                .ok()
                .and_then(|e| e.parse::<Epoch>().ok())
                .ok_or(ClusterError::Protocol("SEED epoch"))?;
            let seq = u64::try_from(seq).map_err(|_| ClusterError::Protocol("SEED seq"))?;
            let payloads = match list {
                Value::Array(list) => list
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::BulkString(b) => Some(b),
                        _ => None,
                    })
                    .collect(),
                Value::Nil => Vec::new(),
                _ => return Err(ClusterError::Protocol("SEED list is not an array")),
            };
            Ok((seq, payloads, epoch))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64, text: &str) -> Vec<u8> {
        let body = MessageBody {
            node: "n1".into(),
            origin: 3,
            skip_origin: true,
            ts: 1000 + seq,
            user: "al".into(),
            text: text.into(),
            id: Some(format!("k{seq}").into()),
            author: None,
        };
        format!("{seq} {}", wire::encode_message(&body)).into_bytes()
    }

    fn seqs(frames: &[Arc<Outbound>]) -> Vec<u64> {
        frames.iter().map(|o| o.seq).collect()
    }

    #[test]
    fn a_kept_list_becomes_the_frames_a_local_publication_would_have_made() {
        let list = vec![
            payload(3, "c"),
            b"p {}".to_vec(),
            b"garbage".to_vec(),
            payload(2, "out of order"),
            payload(4, "d"),
            payload(6, "past the seed seq"),
        ];
        let FromList {
            frames,
            out_of_order,
            invalid,
        } = from_list("r", &list, 5, 100);
        assert_eq!(seqs(&frames), [3, 4]);
        assert_eq!(out_of_order, 1, "seq 2 after seq 3");
        assert_eq!(invalid, 2, "the presence payload and the garbage");
        let v: serde_json::Value =
            serde_json::from_slice(proto::frame_payload(&frames[1].frame)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "message", "room": "r", "user": "al", "text": "d",
                "seq": 4, "ts": 1004, "id": "k4"})
        );
        assert_eq!(
            frames[1].frame,
            proto::message_frame_with_id("r", "al", "d", 4, 1004, Some("k4")),
            "byte-identical to a live frame"
        );
        assert_eq!((frames[0].origin, frames[0].skip_origin), (0, false));
    }

    #[test]
    fn arrivals_after_the_list_are_appended_once_and_capped() {
        let fresh = from_list("r", &[payload(1, "a"), payload(2, "b")], 2, 100).frames;
        let arrived = from_list("r", &[payload(2, "b"), payload(3, "c")], 9, 100).frames;
        assert_eq!(seqs(&merge(fresh.clone(), arrived.clone(), 10)), [1, 2, 3]);
        assert_eq!(seqs(&merge(fresh, arrived, 2)), [2, 3]);
        let mut kept = Vec::new();
        for f in from_list("r", &[payload(1, "a"), payload(2, "b")], 9, 100).frames {
            push(&mut kept, f, 0);
        }
        assert!(kept.is_empty(), "depth 0 keeps nothing");
    }

    #[test]
    fn seed_answer_is_parsed_and_checked() {
        use redis::Value::{Array, BulkString, Int, Nil};
        let e = Epoch::random();
        let epoch = || BulkString(e.to_string().into_bytes());
        let answer = Array(vec![
            Array(vec![
                Int(7),
                Array(vec![BulkString(payload(7, "g"))]),
                epoch(),
            ]),
            Array(vec![Int(0), Array(vec![]), epoch()]),
            Array(vec![Int(2), Nil, epoch()]),
        ]);
        let rooms = parse_seed(answer, 3).unwrap();
        assert_eq!(rooms[0], (7, vec![payload(7, "g")], e));
        assert_eq!(rooms[1], (0, vec![], e));
        assert_eq!(rooms[2], (2, vec![], e));
        assert!(parse_seed(Array(vec![]), 1).is_err());
        assert!(parse_seed(Array(vec![Int(1)]), 1).is_err());
        assert!(parse_seed(Array(vec![Array(vec![Int(-1), Nil, epoch()])]), 1).is_err());
        assert!(parse_seed(Array(vec![Array(vec![Int(1), Nil])]), 1).is_err());
        let bad = BulkString(b"not an epoch".to_vec());
        assert!(parse_seed(Array(vec![Array(vec![Int(1), Nil, bad])]), 1).is_err());
        assert!(parse_seed(Int(3), 1).is_err());
    }
}
