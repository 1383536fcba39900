//! Decoding client WebSocket frames out of a byte buffer the connection owns.
//!
//! Why not fastwebsockets' reader: its `ReadHalf` allocates an 8 KiB buffer per socket and keeps
//! it for the socket's whole life, which was most of the memory of an idle connection (see
//! README, "Measured"). Here the connection waits for readiness with no buffer at all, reads
//! into a buffer only while bytes are in flight, and drops it as soon as every complete frame
//! has been taken out. The frame rules are RFC 6455's, plus RSV1 for permessage-deflate
//! (RFC 7692 §6) where the socket negotiated it; the close-code rules and the unmasking are
//! fastwebsockets' own (`CloseCode`, `unmask`).

use bytes::{Buf, BytesMut};
use fastwebsockets::{CloseCode, OpCode};

/// One frame from the client, unmasked.
#[derive(Debug)]
pub struct InFrame {
    pub fin: bool,
    /// RSV1: the message this frame starts is compressed (only ever set on the first frame of
    /// a data message, on a socket that negotiated permessage-deflate).
    pub compressed: bool,
    pub opcode: OpCode,
    pub payload: BytesMut,
}

/// A frame that breaks the protocol; each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without an extension")]
    ReservedBits,
    #[error("RSV1 on a control or continuation frame")]
    MisplacedRsv1,
    #[error("unknown opcode")]
    BadOpcode,
    #[error("client frames must be masked")]
    Unmasked,
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControl,
    #[error("frame longer than the message limit")]
    TooLarge,
}

impl FrameError {
    /// The close code and reason the server answers with.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            FrameError::TooLarge => (1009, "message too big"),
            _ => (1002, "protocol error"),
        }
    }
}

/// Takes the next complete frame off the front of `buf`, or `None` if `buf` holds only part of
/// one. `max_payload` bounds one frame's payload (a message's total is the caller's business).
/// `deflate`: the socket negotiated permessage-deflate, so RSV1 may start a data message.
/// Errors are final: the connection must close.
pub fn decode(
    buf: &mut BytesMut,
    max_payload: usize,
    deflate: bool,
) -> Result<Option<InFrame>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let rsv1 = b0 & 0b0100_0000 != 0;
    if b0 & 0b0011_0000 != 0 || (rsv1 && !deflate) {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0b1000_0000 != 0;
    let opcode = OpCode::try_from(b0 & 0x0F).map_err(|_| FrameError::BadOpcode)?;
    if b1 & 0b1000_0000 == 0 {
        return Err(FrameError::Unmasked);
    }
    let is_control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
    // RFC 7692 §6: RSV1 marks a compressed message on its first frame only.
    if rsv1 && (is_control || opcode == OpCode::Continuation) {
        return Err(FrameError::MisplacedRsv1);
    }
    let (len, header) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    if is_control && (!fin || len > 125) {
        return Err(FrameError::BadControl);
    }
    // Checked before anything is buffered for it: a hostile length never causes a reservation.
    let len = match usize::try_from(len) {
        Ok(n) if n <= max_payload => n,
        _ => return Err(FrameError::TooLarge),
    };
    let total = header + 4 + len;
    if buf.len() < total {
        // Make room for the rest of this frame in one go; bounded by `max_payload`.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mask = [
        buf[header],
        buf[header + 1],
        buf[header + 2],
        buf[header + 3],
    ];
    buf.advance(header + 4);
    let mut payload = buf.split_to(len);
    fastwebsockets::unmask(&mut payload, mask);
    Ok(Some(InFrame {
        fin,
        compressed: rsv1,
        opcode,
        payload,
    }))
}

/// What a client's close frame asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum CloseRequest {
    /// A valid close: answer with this code (the client's, or 1000 when it gave none).
    Answer(u16),
    /// An invalid close payload: close with this code and reason instead.
    Refuse(u16, &'static str),
}

/// Checks a close frame's payload: empty, or a 2-byte allowed code plus a UTF-8 reason.
pub fn close_request(payload: &[u8]) -> CloseRequest {
    match payload {
        [] => CloseRequest::Answer(1000),
        [_] => CloseRequest::Refuse(1002, "protocol error"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::from(code).is_allowed() {
                CloseRequest::Refuse(1002, "protocol error")
            } else if std::str::from_utf8(reason).is_err() {
                CloseRequest::Refuse(1007, "invalid utf-8")
            } else {
                CloseRequest::Answer(code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn decodes_every_length_form_byte_by_byte() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = client_frame(0x82, &payload, [1, 2, 3, 4]);
            let mut buf = BytesMut::new();
            let mut got = None;
            // Feed in uneven pieces: a partial frame is never an error and never lost.
            for chunk in wire.chunks(977) {
                assert!(got.is_none());
                buf.extend_from_slice(chunk);
                got = decode(&mut buf, 1 << 20, false).unwrap();
            }
            let f = got.expect("complete frame");
            assert!(f.fin);
            assert_eq!(f.opcode, OpCode::Binary);
            assert_eq!(&f.payload[..], &payload[..], "len {len}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn two_frames_in_one_read_come_out_one_at_a_time() {
        let mut wire = client_frame(0x01, b"hel", [9, 9, 9, 9]);
        wire.extend(client_frame(0x80, b"lo", [7, 0, 7, 0]));
        wire.extend_from_slice(&[0x81]); // the start of a third
        let mut buf = BytesMut::from(&wire[..]);
        let a = decode(&mut buf, 100, false).unwrap().unwrap();
        assert_eq!(
            (a.fin, a.opcode, &a.payload[..]),
            (false, OpCode::Text, &b"hel"[..])
        );
        let b = decode(&mut buf, 100, false).unwrap().unwrap();
        assert_eq!(
            (b.fin, b.opcode, &b.payload[..]),
            (true, OpCode::Continuation, &b"lo"[..])
        );
        assert!(decode(&mut buf, 100, false).unwrap().is_none());
        assert_eq!(&buf[..], &[0x81]);
    }

    #[test]
    fn protocol_violations() {
        let m = [0u8; 4];
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (client_frame(0x91, b"x", m), FrameError::ReservedBits),
            (client_frame(0xC1, b"x", m), FrameError::ReservedBits),
            (client_frame(0x83, b"x", m), FrameError::BadOpcode),
            (client_frame(0x8B, b"x", m), FrameError::BadOpcode),
            (vec![0x81, 0x01, b'x'], FrameError::Unmasked),
            (client_frame(0x09, b"", m), FrameError::BadControl),
            (client_frame(0x89, &[0u8; 126], m), FrameError::BadControl),
            (client_frame(0x82, &[0u8; 101], m), FrameError::TooLarge),
        ];
        for (wire, want) in cases {
            let mut buf = BytesMut::from(&wire[..]);
            assert_eq!(
                decode(&mut buf, 100, false).unwrap_err(),
                want,
                "{wire:02x?}"
            );
        }
        // A hostile 64-bit length is refused from the header alone, before any payload.
        let mut buf =
            BytesMut::from(&[0x82u8, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert_eq!(
            decode(&mut buf, 1 << 24, false).unwrap_err(),
            FrameError::TooLarge
        );
        assert!(buf.capacity() < 4096, "nothing reserved for it");
        assert_eq!(FrameError::TooLarge.close().0, 1009);
        assert_eq!(FrameError::Unmasked.close().0, 1002);
    }

    #[test]
    fn rsv1_only_starts_a_data_message_on_a_deflate_socket() {
        let m = [0u8; 4];
        for b0 in [0xC1u8, 0x42, 0xC2] {
            let wire = client_frame(b0, b"x", m);
            let mut buf = BytesMut::from(&wire[..]);
            let f = decode(&mut buf, 100, true).unwrap().unwrap();
            assert!(f.compressed && f.fin == (b0 & 0x80 != 0));
            let mut buf = BytesMut::from(&wire[..]);
            assert_eq!(
                decode(&mut buf, 100, false).unwrap_err(),
                FrameError::ReservedBits
            );
        }
        for (b0, want) in [
            (0xC0u8, FrameError::MisplacedRsv1),
            (0xC9, FrameError::MisplacedRsv1),
            (0xCA, FrameError::MisplacedRsv1),
            (0xC8, FrameError::MisplacedRsv1),
            (0xA1, FrameError::ReservedBits),
            (0x91, FrameError::ReservedBits),
            (0xE1, FrameError::ReservedBits),
        ] {
            let mut buf = BytesMut::from(&client_frame(b0, b"", m)[..]);
            assert_eq!(decode(&mut buf, 100, true).unwrap_err(), want, "{b0:02x}");
            assert_eq!(want.close().0, 1002);
        }
        let mut buf = BytesMut::from(&client_frame(0x81, b"x", m)[..]);
        assert!(!decode(&mut buf, 100, true).unwrap().unwrap().compressed);
    }

    #[test]
    fn close_payloads() {
        assert_eq!(close_request(b""), CloseRequest::Answer(1000));
        assert_eq!(
            close_request(&[0x03]),
            CloseRequest::Refuse(1002, "protocol error")
        );
        assert_eq!(
            close_request(&1000u16.to_be_bytes()),
            CloseRequest::Answer(1000)
        );
        assert_eq!(
            close_request(&4000u16.to_be_bytes()),
            CloseRequest::Answer(4000)
        );
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1100, 2999, 5000] {
            assert_eq!(
                close_request(&bad.to_be_bytes()),
                CloseRequest::Refuse(1002, "protocol error"),
                "{bad}"
            );
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(&[0xFF, 0xFE]);
        assert_eq!(
            close_request(&p),
            CloseRequest::Refuse(1007, "invalid utf-8")
        );
    }
}
