//! permessage-deflate (RFC 7692): choosing among a client's offers, the answer the 101 carries,
//! and the codec.
//!
//! The server always answers `server_no_context_takeover` and `client_no_context_takeover`
//! (§7.1.1.1 and §7.1.1.2 let it, whatever the offer said). Every message is then a deflate
//! stream of its own: one compressed frame serves every member of a room, and no socket keeps a
//! compressor or a 32 KiB inflate window between messages. The codec's state lives in one
//! compressor and one inflater per worker thread, reset for each message.
//!
//! A `server_max_window_bits` below 15 (8 included) is honoured without a smaller-window
//! compressor: with no context takeover a message never refers further back than its own
//! length, so a message that fits the client's window is valid whatever window compressed it,
//! and longer ones go to that client uncompressed (RFC 7692 allows uncompressed messages). That
//! keeps the one shared compressed frame and flate2's pure-Rust default backend.

use std::cell::RefCell;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The empty stored block a sync flush ends with: senders strip it, receivers put it back
/// (§7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// zlib's default level: on chat JSON it compresses 10–15 % better than level 1 for about the
/// same time per message, and each message is compressed once however many members get it.
const LEVEL: u32 = 6;

/// What one socket agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// `server_max_window_bits` from the accepted offer (8–15); 15 when it named none.
    window_bits: u8,
    /// The offer named `server_max_window_bits`: the answer must repeat it (§7.1.2.1).
    echo_window: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub fn response(&self) -> String {
        let mut answer = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
        if self.echo_window {
            answer.push_str(&format!("; server_max_window_bits={}", self.window_bits));
        }
        answer
    }

    /// Whether a message payload of `len` bytes may go to this socket compressed: always with
    /// the full window; otherwise only when the whole message fits the window it asked for.
    pub fn fits(&self, len: usize) -> bool {
        self.window_bits >= 15 || len <= 1usize << self.window_bits
    }
}

/// The first acceptable `permessage-deflate` offer among the `Sec-WebSocket-Extensions` values
/// (each a comma-separated list), in the client's order of preference. An offer with an unknown
/// parameter, a parameter twice, a bad value, or bad syntax is declined (RFC 7692 §5, §7);
/// other extensions are ignored. `None`: no compression for this socket.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreed> {
    for value in values {
        let mut p = Parser { s: value, i: 0 };
        loop {
            let start = p.i;
            let offer = p.element();
            if let Ok(Some(agreed)) = offer {
                return Some(agreed);
            }
            if offer.is_err() || p.i == start {
                // Bad syntax: skip to the next element.
                if !p.skip_element() {
                    break;
                }
            }
            if !p.next_element() {
                break;
            }
        }
    }
    None
}

/// Syntax error in an extension list element.
struct BadSyntax;

/// A cursor over one header value (RFC 6455 §9.1 grammar, with optional whitespace).
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Parser<'_> {
    fn ows(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn token(&mut self) -> Result<&[u8], BadSyntax> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        if self.i == start {
            return Err(BadSyntax);
        }
        Ok(&self.s[start..self.i])
    }

    /// A token or a quoted string, unescaped into `out` (at most `out.len()` bytes are kept;
    /// the returned length says how many there were).
    fn value(&mut self, out: &mut [u8; 4]) -> Result<usize, BadSyntax> {
        let mut n = 0;
        let mut keep = |b: u8, n: &mut usize| {
            if let Some(slot) = out.get_mut(*n) {
                *slot = b;
            }
            *n += 1;
        };
        if self.peek() != Some(b'"') {
            for &b in self.token()? {
                keep(b, &mut n);
            }
            return Ok(n);
        }
        self.i += 1;
        loop {
            match self.peek() {
                None => return Err(BadSyntax),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(n);
                }
                Some(b'\\') => {
                    let b = *self.s.get(self.i + 1).ok_or(BadSyntax)?;
                    keep(b, &mut n);
                    self.i += 2;
                }
                Some(b) => {
                    keep(b, &mut n);
                    self.i += 1;
                }
            }
        }
    }

    /// One list element: an extension and its parameters. `Ok(Some)` for an acceptable
    /// permessage-deflate offer, `Ok(None)` for another extension or a declined offer.
    fn element(&mut self) -> Result<Option<Agreed>, BadSyntax> {
        self.ows();
        if matches!(self.peek(), None | Some(b',')) {
            // Empty elements are allowed in a list (RFC 9110 §5.6.1).
            return Ok(None);
        }
        let ours = self.token()? == NAME.as_bytes();
        let mut offer = Offer::default();
        loop {
            self.ows();
            match self.peek() {
                None | Some(b',') => break,
                Some(b';') => self.i += 1,
                Some(_) => return Err(BadSyntax),
            }
            self.ows();
            let name_len = self.token()?.len();
            let name_at = (self.i - name_len, self.i);
            self.ows();
            let mut buf = [0u8; 4];
            let value = if self.peek() == Some(b'=') {
                self.i += 1;
                self.ows();
                let n = self.value(&mut buf)?;
                // After unescaping, a value must itself be a token (RFC 6455 §9.1).
                let kept = &buf[..n.min(buf.len())];
                if n == 0 || n > buf.len() || !kept.iter().all(|&b| is_tchar(b)) {
                    offer.bad = true;
                }
                Some(kept)
            } else {
                None
            };
            offer.param(&self.s[name_at.0..name_at.1], value);
        }
        Ok(if ours { offer.accept() } else { None })
    }

    /// Moves past the rest of a malformed element, quoted strings included. `false`: the value
    /// ended.
    fn skip_element(&mut self) -> bool {
        let mut quoted = false;
        while let Some(b) = self.peek() {
            match b {
                b'"' => quoted = !quoted,
                b'\\' if quoted => self.i += 1,
                b',' if !quoted => return true,
                _ => {}
            }
            self.i += 1;
        }
        false
    }

    /// Steps over the comma before the next element. `false`: the value ended.
    fn next_element(&mut self) -> bool {
        self.ows();
        if self.peek() == Some(b',') {
            self.i += 1;
            true
        } else {
            false
        }
    }
}

/// One permessage-deflate offer's parameters, as they are read.
#[derive(Default)]
struct Offer {
    /// Unknown parameter, repeated parameter or bad value: decline.
    bad: bool,
    seen: [bool; 4],
    server_window: Option<u8>,
}

impl Offer {
    fn param(&mut self, name: &[u8], value: Option<&[u8]>) {
        let slot = match name {
            b"server_no_context_takeover" => 0,
            b"client_no_context_takeover" => 1,
            b"server_max_window_bits" => 2,
            b"client_max_window_bits" => 3,
            _ => {
                self.bad = true;
                return;
            }
        };
        if std::mem::replace(&mut self.seen[slot], true) {
            self.bad = true;
        }
        match (slot, value) {
            (0 | 1, None) => {}
            (0 | 1, Some(_)) => self.bad = true,
            (2, Some(v)) => match window_bits(v) {
                Some(bits) => self.server_window = Some(bits),
                None => self.bad = true,
            },
            // §7.1.2.1: server_max_window_bits always has a value.
            (2, None) => self.bad = true,
            // client_max_window_bits, with or without a value: it bounds the client's
            // compressor; our inflater has the full window, so any value suits.
            (_, Some(v)) if window_bits(v).is_none() => self.bad = true,
            _ => {}
        }
    }

    fn accept(self) -> Option<Agreed> {
        (!self.bad).then_some(Agreed {
            window_bits: self.server_window.unwrap_or(15),
            echo_window: self.server_window.is_some(),
        })
    }
}

/// A window size: a decimal 8–15 with no leading zero (§7.1.2.1).
fn window_bits(v: &[u8]) -> Option<u8> {
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

thread_local! {
    /// One compressor per worker thread, reset for every message: no context is ever taken
    /// over, and miniz's ~300 KiB of tables are not allocated and zeroed per message.
    static DEFLATER: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
    /// One inflater per worker thread, reset for every message: a socket holds no inflate state
    /// between messages, and a message is inflated in one go once it is whole.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Largest WebSocket header of an unmasked server frame.
const MAX_HEAD: usize = 10;

/// A complete server frame (FIN, RSV1, `opcode`) carrying `payload` compressed, or `None` when
/// compressing does not make the frame smaller (the plain frame is then the one to send).
pub fn compress_frame(opcode: OpCode, payload: &[u8]) -> Option<Bytes> {
    // Room for the header in front, so that the frame is one buffer with no copy.
    let mut out = Vec::with_capacity(MAX_HEAD + payload.len() / 2 + 64);
    out.resize(MAX_HEAD, 0);
    DEFLATER.with(|c| -> Option<()> {
        let mut c = c.try_borrow_mut().ok()?;
        c.reset();
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(64.max(payload.len() / 4));
            }
            c.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            consumed = usize::try_from(c.total_in()).ok()?;
            if consumed >= payload.len() && out.len() < out.capacity() {
                return Some(());
            }
        }
    })?;
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    let body = out.len() - MAX_HEAD;
    if body >= payload.len() {
        return None;
    }
    let mut head = [0u8; MAX_HEAD];
    let head_len =
        Frame::new(true, opcode, None, Payload::Borrowed(&out[MAX_HEAD..])).fmt_head(&mut head);
    head[0] |= RSV1;
    let start = MAX_HEAD - head_len;
    out[start..MAX_HEAD].copy_from_slice(&head[..head_len]);
    Some(Bytes::from(out).slice(start..))
}

/// The RSV1 bit of a frame's first byte: "this message is compressed" (§6).
pub const RSV1: u8 = 0b0100_0000;

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the message limit (a deflate bomb, or just too big): close 1009.
    #[error("message too big")]
    TooBig,
    /// Not a valid deflate stream: close 1007.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates one whole compressed message. At most `max` bytes come out: past that the message
/// is refused, having cost at most `max + 1` bytes of output buffer, never the bomb's size.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|d| {
        let mut d = d.try_borrow_mut().map_err(|_| InflateError::Corrupt)?;
        d.reset(false);
        let first = compressed.len().saturating_mul(2).max(64);
        let mut out = Vec::with_capacity(first.min(max.saturating_add(1)));
        for input in [compressed, &TAIL[..]] {
            let mut pos = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(InflateError::TooBig);
                    }
                    // Doubling, but never past `max + 1`: one byte over is enough to know.
                    let grow = out.len().max(1024).min(max.saturating_add(1) - out.len());
                    out.reserve_exact(grow);
                }
                let (in_before, out_before) = (d.total_in(), out.len());
                let status = d
                    .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                let took = usize::try_from(d.total_in() - in_before).unwrap_or(usize::MAX);
                pos = pos.saturating_add(took).min(input.len());
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block ends the message; anything after it is ignored.
                    return Ok(out);
                }
                let progressed = took > 0 || out.len() > out_before;
                if pos == input.len() && out.len() < out.capacity() {
                    break;
                }
                if !progressed && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(values: &[&str]) -> Option<Agreed> {
        negotiate(values.iter().map(|v| v.as_bytes()))
    }

    fn full() -> Option<Agreed> {
        Some(Agreed {
            window_bits: 15,
            echo_window: false,
        })
    }

    #[test]
    fn offers_are_accepted_or_declined_per_rfc_7692() {
        assert_eq!(offer(&["permessage-deflate"]), full());
        // What Chromium sends.
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits"]),
            full()
        );
        assert_eq!(
            offer(&["permessage-deflate; client_max_window_bits=10; server_no_context_takeover; client_no_context_takeover"]),
            full()
        );
        assert_eq!(
            offer(&["permessage-deflate;server_max_window_bits=10"]),
            Some(Agreed {
                window_bits: 10,
                echo_window: true
            })
        );
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=\"8\""]),
            Some(Agreed {
                window_bits: 8,
                echo_window: true
            })
        );
        for declined in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; client_max_window_bits=\"\"",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            "permessage-deflate; x_unknown",
            "permessage-deflate; server_max_window_bits=\"1,0\"",
            "permessage-deflate; =9",
            "permessage-deflate;; server_no_context_takeover",
            "permessage-deflate server_no_context_takeover",
            "x-webkit-deflate-frame",
            "",
            "permessage-deflate; server_max_window_bits=\"10",
        ] {
            assert_eq!(offer(&[declined]), None, "{declined:?}");
        }
    }

    #[test]
    fn the_first_acceptable_offer_wins_across_lists_and_header_lines() {
        let ten = Some(Agreed {
            window_bits: 10,
            echo_window: true,
        });
        assert_eq!(
            offer(&["permessage-deflate; foo, permessage-deflate; server_max_window_bits=10, permessage-deflate"]),
            ten
        );
        assert_eq!(
            offer(&["x-other; a=\"b,c\"; d", "permessage-deflate; bad=\"q,\\\"x\", permessage-deflate; server_max_window_bits=10"]),
            ten
        );
        assert_eq!(
            offer(&[
                "permessage-deflate; server_max_window_bits=99",
                "permessage-deflate"
            ]),
            full()
        );
        assert_eq!(offer(&[" , ,permessage-deflate ,"]), full());
    }

    #[test]
    fn the_answer_always_asks_for_no_context_takeover() {
        assert_eq!(
            offer(&["permessage-deflate"]).unwrap().response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=9"])
                .unwrap()
                .response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        );
        let nine = offer(&["permessage-deflate; server_max_window_bits=9"]).unwrap();
        assert!(nine.fits(512) && !nine.fits(513));
        assert!(full().unwrap().fits(1 << 30));
    }

    /// The payload of a server frame made by `compress_frame`, and its first byte.
    fn body(frame: &[u8]) -> (u8, &[u8]) {
        let start = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        (frame[0], &frame[start..])
    }

    #[test]
    fn compressed_frames_inflate_to_the_original_every_time() {
        let text = "{\"type\":\"message\",\"room\":\"general\",\"user\":\"alice\",\"text\":\"the quick brown fox jumps over the lazy dog, the quick brown fox\"}".repeat(8);
        for _ in 0..3 {
            // The same frame each time: no context survives from one message to the next.
            let frame = compress_frame(OpCode::Text, text.as_bytes()).unwrap();
            let (b0, deflated) = body(&frame);
            assert_eq!(b0, 0x80 | RSV1 | 0x1);
            assert!(deflated.len() * 3 < text.len(), "{}", deflated.len());
            assert!(!deflated.ends_with(&TAIL));
            assert_eq!(inflate(deflated, text.len()).unwrap(), text.as_bytes());
            assert_eq!(inflate(deflated, text.len() - 1), Err(InflateError::TooBig));
        }
        // Incompressible input is not worth a compressed frame.
        let noise: Vec<u8> = (0u32..300)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(compress_frame(OpCode::Binary, &noise), None);
        assert_eq!(inflate(&[], 10).unwrap(), b"");
    }

    #[test]
    fn a_bomb_costs_the_limit_not_its_size() {
        let zeros = vec![0u8; 10 << 20];
        let frame = compress_frame(OpCode::Binary, &zeros).unwrap();
        let (_, deflated) = body(&frame);
        assert!(deflated.len() < 64 << 10, "{}", deflated.len());
        assert_eq!(inflate(deflated, 64 << 10), Err(InflateError::TooBig));
        assert_eq!(inflate(deflated, 10 << 20).unwrap().len(), 10 << 20);
    }

    #[test]
    fn corrupt_streams_are_refused() {
        // Block type 3 is reserved.
        assert_eq!(
            inflate(&[0xFF, 0xFF, 0xFF], 100),
            Err(InflateError::Corrupt)
        );
        // A stream with a final block, then junk after it, ends at the final block.
        let mut c = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(64);
        c.compress_vec(b"hi", &mut out, FlushCompress::Finish)
            .unwrap();
        out.extend_from_slice(b"junk");
        assert_eq!(inflate(&out, 100).unwrap(), b"hi");
    }
}
