//! Reading: bytes off the socket, frames out of the bytes, whole messages out of fragments.
//! Control frames are answered here; complete text messages go to `handle`.

use std::io;

use bytes::BytesMut;
use fastwebsockets::{Frame, OpCode, Payload};

use tokio::time::Instant;

use super::end::End;
use super::{Connection, Partial, READ_CHUNK};
use crate::proto;
use crate::proto::close;
use crate::ws::deflate::{self, InflateError};
use crate::ws::frame::{self, close_request, CloseRequest, InFrame};

/// Pongs answered per read before only the last ping is answered.
const MAX_PONGS: usize = 16;

/// The pings of one read, to answer in one write.
#[derive(Default)]
struct Pings {
    /// The pongs of the first `MAX_PONGS` pings, encoded back to back.
    pongs: Vec<u8>,
    answered: usize,
    /// The last ping past `MAX_PONGS`.
    last: Option<BytesMut>,
}

impl Pings {
    fn push(&mut self, payload: BytesMut) {
        if self.answered < MAX_PONGS {
            self.answered += 1;
            let pong = proto::encode_control(Frame::pong(Payload::Borrowed(&payload)));
            self.pongs.extend_from_slice(&pong);
        } else {
            self.last = Some(payload);
        }
    }

    fn into_pongs(mut self) -> Option<Vec<u8>> {
        if let Some(last) = self.last.take() {
            let pong = proto::encode_control(Frame::pong(Payload::Borrowed(&last)));
            self.pongs.extend_from_slice(&pong);
        }
        (!self.pongs.is_empty()).then_some(self.pongs)
    }
}

impl Connection {
    /// One read after a readiness event (one per event, so a fast sender cannot monopolise the
    /// task). Returns whether any bytes came in; the caller then handles the frames.
    pub(super) fn read_available(&mut self) -> Result<bool, End> {
        let buf = self.inbuf.get_or_insert_with(Default::default);
        buf.reserve(READ_CHUNK);
        match self.stream.try_read_buf(&mut **buf) {
            Ok(0) => Err(End::Gone),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.release_inbuf();
                Ok(false)
            }
            Err(_) => Err(End::Gone),
        }
    }

    /// Whether bytes of a frame are waiting in `inbuf`.
    pub(super) fn has_input(&self) -> bool {
        self.inbuf.as_ref().is_some_and(|b| !b.is_empty())
    }

    /// Lets go of the read buffer unless it holds part of a frame.
    pub(super) fn release_inbuf(&mut self) {
        if !self.has_input() {
            self.inbuf = None;
        }
    }

    /// Handles every complete frame in `inbuf`, leaving a partial one in place. Returns how
    /// many frames were complete: with none, a partial frame left in `inbuf` is the same one
    /// as before this read (what `--message-timeout` times).
    ///
    /// Pings are answered once the frames of the read are handled, in one write: the first
    /// `MAX_PONGS` each get their pong, and past them only the last one does (RFC 6455 5.5.3
    /// lets a pong answer the most recent of several pings). A ping flood costs one write and
    /// a bounded buffer per read, not a write per ping.
    pub(super) async fn drain_frames(&mut self) -> Result<usize, End> {
        let max = self.cx.limits.max_message_bytes;
        let mut complete = 0;
        let mut pings = Pings::default();
        loop {
            let decoded = match self.inbuf.as_deref_mut() {
                Some(buf) => frame::decode(buf, max, self.deflate.is_some()),
                None => Ok(None),
            };
            match decoded {
                Ok(None) => {
                    if let Some(pongs) = pings.into_pongs() {
                        self.write_frames(&[&pongs]).await?;
                    }
                    return Ok(complete);
                }
                Ok(Some(frame)) => {
                    complete += 1;
                    // Pongs go out before whatever a later frame makes the server write (an
                    // echo, an error, a close): a pong never overtakes nor trails it.
                    if frame.opcode != OpCode::Ping {
                        if let Some(pongs) = std::mem::take(&mut pings).into_pongs() {
                            self.write_frames(&[&pongs]).await?;
                        }
                    }
                    if let Some(end) = self.on_frame(frame, &mut pings).await {
                        return Err(end);
                    }
                }
                Err(e) => {
                    let (code, reason) = e.close();
                    return Err(End::Close(code, reason));
                }
            }
        }
    }

    /// Handles one frame from the client; `Some` ends the connection. Pings, pongs and
    /// continuation fragments each take a token from the socket's `--rate-limit` bucket, as a
    /// whole message does (in `on_text`): a flood of any frame meets the same limit. An
    /// admitted ping goes in `pings`, for `drain_frames` to answer.
    async fn on_frame(&mut self, frame: InFrame, pings: &mut Pings) -> Option<End> {
        let max = self.cx.limits.max_message_bytes;
        let message = match frame.opcode {
            OpCode::Close => {
                return Some(match close_request(&frame.payload) {
                    CloseRequest::Answer(code) => End::Close(code, ""),
                    CloseRequest::Refuse(code, reason) => End::Close(code, reason),
                })
            }
            OpCode::Ping => {
                match self.admit(None).await {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(end) => return Some(end),
                }
                pings.push(frame.payload);
                return None;
            }
            OpCode::Pong => return self.admit(None).await.err(),
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                return Some(End::Close(
                    close::PROTOCOL_ERROR,
                    "expected a continuation frame",
                ));
            }
            OpCode::Text | OpCode::Binary if frame.fin => {
                (frame.opcode, frame.payload, frame.compressed)
            }
            OpCode::Text | OpCode::Binary => {
                self.partial = Some(Box::new(Partial {
                    opcode: frame.opcode,
                    buf: frame.payload,
                    started: Instant::now(),
                    refused: false,
                    compressed: frame.compressed,
                }));
                return None;
            }
            OpCode::Continuation => {
                if self.partial.is_none() {
                    return Some(End::Close(
                        close::PROTOCOL_ERROR,
                        "continuation frame without a message",
                    ));
                }
                let admitted = match self.admit(None).await {
                    Ok(admitted) => admitted,
                    Err(end) => return Some(end),
                };
                let p = self.partial.as_deref_mut()?;
                if !admitted && !p.refused {
                    // The message is dropped whole: its bytes so far go, and the fragments
                    // still to come are read and discarded (each still takes a token).
                    p.refused = true;
                    p.buf = BytesMut::new();
                }
                if !p.refused {
                    if p.buf.len() + frame.payload.len() > max {
                        return Some(End::Close(close::TOO_BIG, "message too big"));
                    }
                    p.buf.extend_from_slice(&frame.payload);
                }
                if !frame.fin {
                    return None;
                }
                let p = *self.partial.take()?;
                if p.refused {
                    return None;
                }
                (p.opcode, p.buf, p.compressed)
            }
        };
        let (opcode, payload, compressed) = message;
        // A compressed message is inflated only now that it is whole, so the inflater exists
        // for this call alone; its output is bounded by the same limit as a plain message.
        let inflated;
        let bytes: &[u8] = if compressed {
            let stats = &self.cx.stats.deflate;
            match deflate::inflate(&payload, max) {
                Ok(out) => {
                    stats.messages_inflated.inc();
                    inflated = out;
                    &inflated
                }
                Err(e) => {
                    stats.inflate_refused.inc();
                    return Some(match e {
                        InflateError::TooBig => End::Close(close::TOO_BIG, "message too big"),
                        InflateError::Corrupt => {
                            End::Close(close::INVALID_DATA, "invalid compressed data")
                        }
                    });
                }
            }
        } else {
            &payload
        };
        if self.echo {
            return self.echo_back(opcode, bytes).await;
        }
        match (opcode, bytes) {
            (OpCode::Binary, _) => Some(End::Close(
                close::UNSUPPORTED_DATA,
                "binary frames are not supported",
            )),
            (_, bytes) if bytes.len() > max => Some(End::Close(close::TOO_BIG, "message too big")),
            (_, bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => self.on_text(text).await,
                Err(_) => Some(End::Close(close::INVALID_DATA, "invalid utf-8")),
            },
        }
    }

    /// Echo mode: writes the message back with its opcode; text must be UTF-8. On a socket that
    /// negotiated permessage-deflate the reply is compressed (each reply on its own: echo
    /// replies go to one socket, there is nothing to share).
    async fn echo_back(&mut self, opcode: OpCode, payload: &[u8]) -> Option<End> {
        if opcode == OpCode::Text && std::str::from_utf8(payload).is_err() {
            return Some(End::Close(close::INVALID_DATA, "invalid utf-8"));
        }
        let min = self.cx.limits.compression.unwrap_or(usize::MAX);
        let worth = |a: &deflate::Agreed| payload.len() >= min && a.fits(payload.len());
        if self.deflate.as_ref().is_some_and(worth) {
            self.cx.stats.deflate.frames_compressed.inc();
            if let Some(frame) = deflate::compress_frame(opcode, payload) {
                return self.write_frames(&[&frame]).await.err();
            }
        }
        let mut head = [0u8; 10];
        let len = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
        self.write_frames(&[&head[..len], payload]).await.err()
    }
}
