//! What clients send: one text frame is one message, plain text or a JSON object of a known
//! shape. Parsing borrows from the frame; every refusal is a `ProtocolError` with a stable code.

use std::borrow::Cow;

use serde::Deserialize;

use super::epoch::Epoch;

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
    /// A fresh access token for the open socket, sent before the current one expires.
    Refresh {
        token: Cow<'a, str>,
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
    epoch: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    password: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
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
                    "expected a `type` (message, join, leave, refresh, ping) or a `text`",
                ));
            };
            if text.is_empty() {
                return Err(ProtocolError::new("bad_message", "message text is empty"));
            }
            if let Some(id) = &raw.id {
                validate_id(id).map_err(|e| ProtocolError::new("bad_id", e))?;
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
            replay: ReplayRequest::from_parts(raw.history, raw.since, raw.epoch.as_deref())
                .map_err(|e| ProtocolError::new("bad_message", e))?,
        }),
        Some("leave") => Ok(ClientMessage::Leave {
            room: need_room(raw.room)?,
        }),
        Some("refresh") => Ok(ClientMessage::Refresh {
            token: raw
                .token
                .ok_or_else(|| ProtocolError::new("bad_message", "`token` is required"))?,
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

/// Most past messages a join may ask for with `history`; more than a room keeps gives what it
/// keeps.
pub const MAX_HISTORY_REQUEST: u32 = 1_000_000;

/// What a joiner asks to receive before live messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayRequest {
    /// The last N messages the room keeps.
    Last(u32),
    /// Every message with a seq greater than this one (recovery after a reconnect), of the
    /// room's epoch when one is given: a position in another epoch is never replayed from.
    Since(u64, Option<Epoch>),
}

impl ReplayRequest {
    /// Builds the request from the optional `history`, `since` and `epoch` of a join or an
    /// upgrade URL.
    pub fn from_parts(
        history: Option<u32>,
        since: Option<u64>,
        epoch: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let epoch = match epoch {
            None => None,
            Some(_) if since.is_none() => return Err("`epoch` goes with `since`".into()),
            Some(e) => Some(e.parse::<Epoch>().map_err(|e| format!("`epoch`: {e}"))?),
        };
        match (history, since) {
            (Some(_), Some(_)) => Err("`history` and `since` cannot be combined".into()),
            (Some(n), None) if n > MAX_HISTORY_REQUEST => Err(format!(
                "`history` must be an integer from 0 to {MAX_HISTORY_REQUEST}"
            )),
            (Some(n), None) => Ok(Some(ReplayRequest::Last(n))),
            (None, Some(seq)) => Ok(Some(ReplayRequest::Since(seq, epoch))),
            (None, None) => Ok(None),
        }
    }
}

/// Longest accepted `id`, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Checks a client-supplied id: 1–64 bytes, no control characters.
pub fn validate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err("`id` must be 1 to 64 bytes");
    }
    if id.chars().any(char::is_control) {
        return Err("`id` must not contain control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("abc-123").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id(&"x".repeat(65)).is_err());
        assert!(validate_id("a\nb").is_err());
    }
}
