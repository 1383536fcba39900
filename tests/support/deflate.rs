//! A raw WebSocket client that speaks permessage-deflate (RFC 7692) itself, frame by frame, so
//! that tests can send what no well-behaved library sends (RSV bits in the wrong place, a
//! deflate bomb) and see exactly which frames come back compressed. Its codec is flate2's raw
//! deflate, independent of the server's framing code.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::STEP;

/// What the server sent: one whole message (fragments joined), or its close.
#[derive(Debug)]
pub enum Incoming {
    /// `compressed`: RSV1 was set (the payload here is already inflated).
    Message {
        opcode: u8,
        compressed: bool,
        payload: Vec<u8>,
        /// Bytes of the frame on the wire, header included.
        wire: usize,
    },
    Close(u16, String),
}

pub struct DeflateClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The 101's `Sec-WebSocket-Extensions`, if any.
    pub extensions: Option<String>,
}

impl DeflateClient {
    /// Upgrades `path` offering `offer` as `Sec-WebSocket-Extensions` (none when `None`).
    pub async fn connect(addr: SocketAddr, path: &str, offer: Option<&str>) -> Result<Self> {
        let mut stream = TcpStream::connect(addr).await?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        if let Some(offer) = offer {
            req.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(STEP, stream.read(&mut chunk)).await??;
            if n == 0 {
                bail!("closed before the 101");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            bail!("not upgraded: {head}");
        }
        let extensions = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| v.trim().to_string())
        });
        buf.drain(..head_end);
        Ok(DeflateClient {
            stream,
            buf,
            extensions,
        })
    }

    /// Sends one frame as given: `b0` is the whole first byte (FIN, RSV bits, opcode).
    pub async fn send_frame(&mut self, b0: u8, payload: &[u8]) -> Result<()> {
        let out = super::masked_frame(b0, payload, [0x12, 0x34, 0x56, 0x78]);
        // The server may close as soon as it has read a bad header: a failed write is fine.
        let _ = self.stream.write_all(&out).await;
        Ok(())
    }

    /// Sends `text` as one compressed text message (FIN, RSV1).
    pub async fn send_compressed(&mut self, text: &str) -> Result<()> {
        let deflated = deflate(text.as_bytes());
        self.send_frame(0xC1, &deflated).await
    }

    /// The next whole message or close, within `STEP`.
    pub async fn recv(&mut self) -> Result<Incoming> {
        let mut message: Option<(u8, bool, Vec<u8>, usize)> = None;
        loop {
            let (b0, payload, wire) = self.next_frame().await?;
            let opcode = b0 & 0x0F;
            let fin = b0 & 0x80 != 0;
            match opcode {
                0x8 => {
                    let code = payload
                        .get(..2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .unwrap_or(1005);
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]));
                    return Ok(Incoming::Close(code, reason.into()));
                }
                0x9 | 0xA => continue,
                0x0 => {
                    let m = message.as_mut().context("continuation without a message")?;
                    m.2.extend_from_slice(&payload);
                    m.3 += wire;
                }
                _ => message = Some((opcode, b0 & 0x40 != 0, payload, wire)),
            }
            if fin {
                let (opcode, compressed, payload, wire) = message.take().context("no message")?;
                let payload = if compressed {
                    inflate(&payload)?
                } else {
                    payload
                };
                return Ok(Incoming::Message {
                    opcode,
                    compressed,
                    payload,
                    wire,
                });
            }
        }
    }

    /// The next text message as JSON, with whether it came compressed.
    pub async fn recv_json(&mut self) -> Result<(Value, bool)> {
        match self.recv().await? {
            Incoming::Message {
                payload,
                compressed,
                ..
            } => Ok((serde_json::from_slice(&payload)?, compressed)),
            Incoming::Close(code, reason) => bail!("closed {code} {reason}"),
        }
    }

    /// The next message whose `type` is `kind`, skipping others (presence).
    pub async fn recv_type(&mut self, kind: &str) -> Result<(Value, bool)> {
        loop {
            let (v, compressed) = self.recv_json().await?;
            if v["type"] == kind {
                return Ok((v, compressed));
            }
        }
    }

    /// Reads until the server's close frame; its code and reason.
    pub async fn expect_close(&mut self) -> Result<(u16, String)> {
        loop {
            if let Incoming::Close(code, reason) = self.recv().await? {
                return Ok((code, reason));
            }
        }
    }

    async fn next_frame(&mut self) -> Result<(u8, Vec<u8>, usize)> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk))
                .await
                .context("no frame within STEP")??;
            if n == 0 {
                bail!("connection closed without a close frame");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn take_frame(&mut self) -> Result<Option<(u8, Vec<u8>, usize)>> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        if b[1] & 0x80 != 0 {
            bail!("server frames must not be masked");
        }
        let (len, head) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if b.len() < head + len {
            return Ok(None);
        }
        let b0 = b[0];
        let payload = b[head..head + len].to_vec();
        self.buf.drain(..head + len);
        Ok(Some((b0, payload, head + len)))
    }

    /// Whether the server has closed the TCP connection within `within` (reading and
    /// discarding what it still sends).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut sink = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

/// Raw deflate of one message with the sync flush's `00 00 FF FF` removed (RFC 7692 §7.2.1).
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        let before = c.total_in() as usize;
        c.compress_vec(&data[before..], &mut out, FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(1024));
    }
    assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates one message (the tail put back), with a fresh window: the server promised
/// `server_no_context_takeover`, so nothing from an earlier message may be needed.
pub fn inflate(data: &[u8]) -> Result<Vec<u8>> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
    let mut out = Vec::with_capacity(data.len() * 4 + 1024);
    loop {
        let before = d.total_in() as usize;
        d.decompress_vec(&input[before..], &mut out, FlushDecompress::Sync)?;
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity().max(1024));
    }
}
