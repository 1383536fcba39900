//! Fuzzes the client WebSocket frame decoder (`src/ws/frame.rs`) with any bytes, the way a
//! socket delivers them: whole, or in pieces of any size.
//!
//! Checked beyond "never panics": the same bytes give the same frames and the same error
//! whether they arrive at once or split at arbitrary points (a partial frame is never an error
//! and never lost); every frame respects the payload bound it was decoded under; control frames
//! are final and at most 125 bytes; the bytes consumed are exactly the frames' own; a close
//! payload is answered with an allowed code.
#![no_main]

use bytes::BytesMut;
use fastwebsockets::{CloseCode, OpCode};
use libfuzzer_sys::fuzz_target;
use roomcast::fuzzing::frame::{close_request, decode, CloseRequest, FrameError, InFrame};

/// What one run of the decoder over a whole input produced.
#[derive(Debug, PartialEq)]
struct Run {
    frames: Vec<(bool, OpCode, Vec<u8>)>,
    error: Option<FrameError>,
    left: Vec<u8>,
}

fn record(f: &InFrame) -> (bool, OpCode, Vec<u8>) {
    (f.fin, f.opcode, f.payload.to_vec())
}

/// Decodes `chunks` fed one after the other, taking every complete frame after each.
fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>, max: usize, deflate: bool) -> Run {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match decode(&mut buf, max, deflate) {
                Ok(Some(f)) => {
                    check(&f, max, before - buf.len());
                    // RSV1 only on the first frame of a data message, only when negotiated.
                    assert!(
                        !f.compressed
                            || (deflate && matches!(f.opcode, OpCode::Text | OpCode::Binary)),
                        "RSV1 on {:?}",
                        f.opcode
                    );
                    frames.push(record(&f));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "a partial frame is left in place");
                    break;
                }
                Err(e) => {
                    let (code, reason) = e.close();
                    assert!(code == 1002 || code == 1009, "{e:?} → {code}");
                    assert!(!reason.is_empty());
                    return Run {
                        frames,
                        error: Some(e),
                        left: Vec::new(),
                    };
                }
            }
        }
    }
    Run {
        frames,
        error: None,
        left: buf.to_vec(),
    }
}

fn check(f: &InFrame, max: usize, consumed: usize) {
    assert!(f.payload.len() <= max, "payload over the bound");
    let len = f.payload.len();
    let header = match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    // A non-minimal length encoding is legal for a decoder to take; the header is never
    // shorter than the minimal one, and at most 10 bytes plus the mask.
    assert!(
        consumed >= header + 4 + len && consumed <= 14 + len,
        "{consumed} for {len}"
    );
    if matches!(f.opcode, OpCode::Close | OpCode::Ping | OpCode::Pong) {
        assert!(f.fin && len <= 125, "control frame {:?} {len}", f.opcode);
    }
    if f.opcode == OpCode::Close {
        match close_request(&f.payload) {
            CloseRequest::Answer(code) => assert!(CloseCode::from(code).is_allowed(), "{code}"),
            CloseRequest::Refuse(code, _) => assert!(code == 1002 || code == 1007, "{code}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Two bytes choose the payload bound (so that TooLarge is reachable with short inputs),
    // the third where the bytes are split, and its top bit whether permessage-deflate was
    // negotiated.
    let [a, b, cut, rest @ ..] = data else {
        return;
    };
    let max = usize::from(u16::from_le_bytes([*a, *b]));
    let deflate = cut & 0x80 != 0;
    let whole = run(std::iter::once(rest), max, deflate);
    let step = usize::from(cut & 0x7F).max(1);
    let pieces = run(rest.chunks(step), max, deflate);
    assert_eq!(whole, pieces, "split every {step} bytes");
    if whole.error.is_none() {
        let bytewise = run(rest.chunks(1), max, deflate);
        assert_eq!(whole, bytewise, "fed byte by byte");
    }
});
