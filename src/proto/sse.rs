//! Server-Sent Events: how a room frame is written as an event, and the event ids that carry a
//! stream's recovery position (what `EventSource` sends back as `Last-Event-ID`).
//!
//! An event's `data:` is the same JSON as the WebSocket frame's payload. The id of a stream in
//! one room is that room's position (`event_id`); a stream in several rooms has one composite
//! id naming every room's position (`composite_id`). A position is the room's epoch and seq,
//! `<epoch>.<seq>` (a bare `<seq>` is still read, as a position with no epoch). Both forms are
//! written and read here only.

use bytes::{BufMut, Bytes, BytesMut};

use super::epoch::Epoch;

/// A recovery position read back from an id: the epoch (none in a bare seq) and the seq.
pub type Position = (Option<Epoch>, u64);

/// A comment line: proxies see bytes and keep the stream open; `EventSource` ignores it.
pub const HEARTBEAT: &[u8] = b": ping\n\n";

/// Most rooms a composite id may name; anything longer is refused before it is looked at.
pub const MAX_ID_ROOMS: usize = 256;

/// The id of a position in one room.
pub fn event_id(epoch: Epoch, seq: u64) -> String {
    format!("{epoch}.{seq}")
}

/// A position read back from an id written by `event_id` (or a bare seq). `None`: not one.
pub fn parse_event_id(id: &str) -> Option<Position> {
    let (epoch, seq) = match id.split_once('.') {
        Some((epoch, seq)) => (Some(epoch.parse().ok()?), seq),
        None => (None, id),
    };
    // `u64::from_str` takes a leading `+`; an id we wrote never has one.
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((epoch, seq.parse().ok()?))
}

/// The id of a stream in several rooms: `room:position` for each, joined by `,`
/// (`a:12,b:40`). Room names never hold `,`, and a position never holds `:`, so the last `:`
/// of an entry ends its name.
pub fn composite_id<'a>(positions: impl IntoIterator<Item = (&'a str, Epoch, u64)>) -> String {
    let mut id = String::new();
    for (room, epoch, seq) in positions {
        if !id.is_empty() {
            id.push(',');
        }
        id.push_str(room);
        id.push(':');
        id.push_str(&event_id(epoch, seq));
    }
    id
}

/// Why a `Last-Event-ID` was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`Last-Event-ID` is not a position this server wrote")]
    Malformed,
    #[error("`Last-Event-ID` names a room twice")]
    Repeated,
    #[error("`Last-Event-ID` names more rooms than a stream may be in")]
    TooLong,
}

/// The positions of a composite id, in its order. Rooms are not validated here: the caller
/// keeps only the ones its stream is in.
pub fn parse_composite_id(id: &str) -> Result<Vec<(&str, Position)>, IdError> {
    if id.split(',').nth(MAX_ID_ROOMS).is_some() {
        return Err(IdError::TooLong);
    }
    let mut out: Vec<(&str, Position)> = Vec::new();
    for entry in id.split(',') {
        let (room, pos) = entry.rsplit_once(':').ok_or(IdError::Malformed)?;
        let position = parse_event_id(pos).ok_or(IdError::Malformed)?;
        if room.is_empty() {
            return Err(IdError::Malformed);
        }
        if out.iter().any(|(r, _)| *r == room) {
            return Err(IdError::Repeated);
        }
        out.push((room, position));
    }
    Ok(out)
}

/// The event of a room frame: a chat message (`seq > 0`) is `event: message` with its position
/// as `id:`; any other frame is named by its JSON `type` (`presence`, `lagged`, `room_created`…)
/// and has no id. `payload` is the WebSocket frame's JSON.
pub fn frame_event(epoch: Epoch, seq: u64, payload: &[u8]) -> Bytes {
    if seq > 0 {
        let id = event_id(epoch, seq);
        event(Some(&id), "message", payload)
    } else {
        event(None, frame_type(payload), payload)
    }
}

/// One event: optional `id:`, `event:`, the payload as `data:` lines, and the blank line that
/// ends it. Our JSON never holds a line break; a payload that does (nothing we encode) is split
/// into one `data:` line per line, which the client joins back with `\n`.
pub fn event(id: Option<&str>, name: &str, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + name.len() + 32);
    if let Some(id) = id {
        put_id(&mut buf, id);
    }
    buf.put_slice(b"event: ");
    buf.put_slice(name.as_bytes());
    buf.put_u8(b'\n');
    for line in payload.split(|&b| b == b'\n' || b == b'\r') {
        buf.put_slice(b"data: ");
        buf.put_slice(line);
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
    buf.freeze()
}

/// An `id:` line alone, written before a shared event that has none of its own (`without_id`).
pub fn id_line(id: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(id.len() + 5);
    put_id(&mut buf, id);
    buf.freeze()
}

fn put_id(buf: &mut BytesMut, id: &str) {
    buf.put_slice(b"id: ");
    buf.put_slice(id.as_bytes());
    buf.put_u8(b'\n');
}

/// An event made by `frame_event`, less its `id:` line (a slice: nothing is copied).
pub fn without_id(event: &Bytes) -> Bytes {
    match event.strip_prefix(b"id: ") {
        Some(rest) => match rest.iter().position(|&b| b == b'\n') {
            Some(i) => event.slice(4 + i + 1..),
            None => event.clone(),
        },
        None => event.clone(),
    }
}

/// The last event of a stream the server ends: `retry:` makes `EventSource` wait that long
/// before it reconnects; `data` says why (`{"code":"restart","retry_after_ms":…}`).
pub fn close_event(retry_ms: Option<u64>, data: &serde_json::Value) -> Bytes {
    let payload = serde_json::to_vec(data).unwrap_or_default();
    let head = event(None, "close", &payload);
    match retry_ms {
        Some(ms) => {
            let mut buf = BytesMut::with_capacity(head.len() + 24);
            buf.put_slice(format!("retry: {ms}\n").as_bytes());
            buf.put_slice(&head);
            buf.freeze()
        }
        None => head,
    }
}

/// The `type` of a server frame's JSON (`{"type":"presence",…}`: serde writes the tag first).
fn frame_type(payload: &[u8]) -> &str {
    payload
        .strip_prefix(br#"{"type":""#)
        .and_then(|rest| {
            let end = rest.iter().position(|&b| b == b'"')?;
            std::str::from_utf8(&rest[..end]).ok()
        })
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
        })
        .unwrap_or("notice")
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: Epoch = match Epoch::from_bits(1) {
        Some(e) => e,
        None => panic!(),
    };

    #[test]
    fn ids_round_trip() {
        assert_eq!(event_id(E, 42), "000000000001.42");
        assert_eq!(parse_event_id(&event_id(E, 42)), Some((Some(E), 42)));
        assert_eq!(parse_event_id("0"), Some((None, 0)));
        for bad in [
            "",
            "+1",
            "-1",
            "1.5",
            "a",
            " 1",
            "99999999999999999999999",
            "000000000001.",
            "00000000000i.3",
        ] {
            assert_eq!(parse_event_id(bad), None, "{bad:?}");
        }
        let id = composite_id([("a", E, 12), ("b:c", E, 40)]);
        assert_eq!(id, "a:000000000001.12,b:c:000000000001.40");
        assert_eq!(
            parse_composite_id(&id),
            Ok(vec![("a", (Some(E), 12)), ("b:c", (Some(E), 40))])
        );
        assert_eq!(parse_composite_id("a:1,a:2"), Err(IdError::Repeated));
        for bad in ["", "a", "a:", ":3", "a:1,", "a:x", "a:1,,b:2"] {
            assert_eq!(parse_composite_id(bad), Err(IdError::Malformed), "{bad:?}");
        }
        let long = vec!["r:1"; MAX_ID_ROOMS + 1].join(",");
        assert_eq!(parse_composite_id(&long), Err(IdError::TooLong));
    }

    #[test]
    fn events_carry_the_frame_json() {
        let e = frame_event(E, 7, br#"{"type":"message","text":"hi"}"#);
        assert_eq!(
            &e[..],
            b"id: 000000000001.7\nevent: message\ndata: {\"type\":\"message\",\"text\":\"hi\"}\n\n"
        );
        assert_eq!(
            &without_id(&e)[..],
            b"event: message\ndata: {\"type\":\"message\",\"text\":\"hi\"}\n\n"
        );
        let p = frame_event(E, 0, br#"{"type":"presence","members":2}"#);
        assert!(p.starts_with(b"event: presence\ndata: {"), "{p:?}");
        assert_eq!(without_id(&p), p);
        let odd = frame_event(E, 0, b"{\"type\":\"x\\\"y\"}\nline\r");
        assert_eq!(
            &odd[..],
            b"event: notice\ndata: {\"type\":\"x\\\"y\"}\ndata: line\ndata: \n\n"
        );
        let c = close_event(Some(250), &serde_json::json!({"code": "restart"}));
        assert_eq!(
            &c[..],
            b"retry: 250\nevent: close\ndata: {\"code\":\"restart\"}\n\n"
        );
        assert_eq!(&id_line("a:1,b:2")[..], b"id: a:1,b:2\n");
    }
}
