//! Fuzzes the decoder of what other processes (or anything else) publish on a room's Redis
//! channel (`src/bus/redis/wire.rs`).
//!
//! Checked beyond "never panics": whatever it accepts obeys the rules a local publication
//! obeys (seq and ts within 2^53 − 1, seq not 0, a valid user name, text within the bound, a
//! valid id, presence counts bounded and names valid); re-encoding an accepted payload and
//! decoding that gives the same payload back; the member frame it becomes is JSON carrying the
//! same fields. The same bytes are also read as a roster entry of room `r`: whatever that
//! accepts has an id within 1..=2^53 − 1 and a valid user name, and writes back the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::fuzzing::wire::{
    decode, encode_message, encode_presence, parse_roster_entry, roster_entry, Payload,
    MAX_MEMBER_COUNT, MAX_SAFE_INTEGER,
};
use roomcast::proto::names::validate_user;
use roomcast::proto::{frame_payload, message_frame_with_id, validate_id};

fuzz_target!(|data: &[u8]| {
    if let Ok((id, user)) = parse_roster_entry("r", data) {
        assert!(id >= 1 && id <= MAX_SAFE_INTEGER, "roster id {id}");
        assert_eq!(validate_user(user), Ok(()));
        assert_eq!(roster_entry("r", id, user).as_bytes(), data);
    }
    let [a, b, rest @ ..] = data else {
        return;
    };
    let max = usize::from(u16::from_le_bytes([*a, *b]));
    let Ok(payload) = decode(rest, max) else {
        return;
    };
    match &payload {
        Payload::Message { seq, epoch, body } => {
            assert!(*seq >= 1 && *seq <= MAX_SAFE_INTEGER, "seq {seq}");
            assert!(body.ts <= MAX_SAFE_INTEGER);
            assert!(!body.node.is_empty() && body.node.len() <= 64);
            assert_eq!(validate_user(&body.user), Ok(()));
            assert!(!body.text.is_empty() && body.text.len() <= max);
            if let Some(id) = &body.id {
                assert_eq!(validate_id(id), Ok(()));
            }
            let again = match epoch {
                Some(epoch) => format!("{epoch}:{seq} {}", encode_message(body)),
                None => format!("{seq} {}", encode_message(body)),
            };
            assert_eq!(decode(again.as_bytes(), max).ok().as_ref(), Some(&payload));
            let frame = message_frame_with_id(
                "r",
                &body.user,
                &body.text,
                *seq,
                body.ts,
                body.id.as_deref(),
            );
            let v: serde_json::Value =
                serde_json::from_slice(frame_payload(&frame)).expect("member frame is JSON");
            assert_eq!(v["text"].as_str(), Some(&*body.text));
            assert_eq!(v["user"].as_str(), Some(&*body.user));
            assert_eq!(v["seq"].as_u64(), Some(*seq));
        }
        Payload::Presence(body) => {
            assert!(body.count <= MAX_MEMBER_COUNT);
            for name in body.joined.iter().chain(&body.left) {
                assert_eq!(validate_user(name), Ok(()));
            }
            let again = encode_presence(body);
            assert_eq!(decode(again.as_bytes(), max).ok().as_ref(), Some(&payload));
        }
    }
});
