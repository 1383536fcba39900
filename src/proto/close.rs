//! Close codes (RFC 6455 § 7.4.1) as this server uses them, and the control frames it sends.
//! docs/PROTOCOL.md documents when each is sent.

use fastwebsockets::{Frame, OpCode, Payload};

/// A frame that breaks RFC 6455 (bad continuation, unmasked…).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A binary frame on the chat protocol.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A text message that is not UTF-8.
pub const INVALID_DATA: u16 = 1007;
/// `slow consumer`, `ping timeout`, `rate limit exceeded`, `message timeout`.
pub const POLICY: u16 = 1008;
/// A message over `--max-message-bytes`.
pub const TOO_BIG: u16 = 1009;
/// The server could not go on with this socket.
pub const INTERNAL: u16 = 1011;
/// Shutdown (Service Restart): the reason is [`restart_reason`]'s JSON, which tells the client
/// how long to wait before it reconnects.
pub const SERVICE_RESTART: u16 = 1012;
/// `token expired`: the access token's `exp` (plus leeway) passed without a `refresh`. An
/// application code, not 1008, so that a client can tell "get a new token" from abuse.
pub const TOKEN_EXPIRED: u16 = 4001;
/// `idle timeout`: the socket was in no room for `--idle-timeout`. An application code, not
/// 1008: nothing was abused, and a client that reconnects into a room is welcome.
pub const IDLE: u16 = 4002;

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

/// The reason of a 1012 close: `{"reason":"server restarting","retry_after_ms":N}`, at most
/// 63 bytes (a close reason may hold 123). docs/PROTOCOL.md documents it as a contract.
pub fn restart_reason(retry_after_ms: u64) -> String {
    format!(r#"{{"reason":"server restarting","retry_after_ms":{retry_after_ms}}}"#)
}

/// A server ping carrying no payload.
pub fn ping_frame() -> Vec<u8> {
    encode_control(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_reason_is_json_that_fits_a_close_frame() {
        let r = restart_reason(u64::MAX);
        assert!(r.len() <= 123, "{r}");
        let v: serde_json::Value = serde_json::from_str(&restart_reason(1234)).unwrap();
        assert_eq!(v["retry_after_ms"], 1234);
        assert_eq!(v["reason"], "server restarting");
    }
}
