//! The client side of the socket below fastwebsockets: counts every byte the server sends (the
//! wire cost of a delivery, compressed or not) and, with `--compression`, turns compressed
//! server frames (RSV1, permessage-deflate) into plain ones before fastwebsockets reads them
//! (it refuses RSV bits). Writes pass through untouched: the clients never compress.
//!
//! The clients of one worker thread share what they inflated (`--inflate shared`, the default):
//! every member of a room receives the same compressed bytes for a message (the server compresses
//! it once for all of them), so the first member to read it inflates it and the others find the
//! plain frame under those exact bytes. A load generator beside the server must not spend more
//! per delivery than the server; `--inflate each` has every client inflate every message, as
//! independent clients on other machines would.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes every client of this process has read off its socket after the upgrade.
static BYTES_IN: AtomicU64 = AtomicU64::new(0);

/// Bytes read from the server by every client of this process so far.
pub fn bytes_in() -> u64 {
    BYTES_IN.load(Relaxed)
}

/// The 4 bytes a sender strips from each compressed message (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

thread_local! {
    /// One inflater per thread, reset per message: the server agreed to no context takeover.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// What a client does with a compressed frame (`--inflate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflate {
    /// Nothing was negotiated: frames pass as they come (and are only counted).
    Off,
    /// Every message, by this client alone.
    Each,
    /// Through the worker thread's cache of messages inflated by its clients.
    Shared,
}

/// Bytes (compressed and plain) the cache of one thread holds before it starts over.
const CACHE_BYTES: usize = 16 << 20;

/// One worker thread's inflated messages, keyed by their compressed bytes.
#[derive(Default)]
struct Cache {
    plain: HashMap<Box<[u8]>, Rc<[u8]>>,
    bytes: usize,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// The plain payload of the compressed `data`, from the thread's cache or inflated into it.
fn inflate_shared(data: &[u8]) -> io::Result<Rc<[u8]>> {
    if let Some(plain) = CACHE.with(|c| c.borrow().plain.get(data).cloned()) {
        return Ok(plain);
    }
    let plain: Rc<[u8]> = inflate(data)?.into();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.bytes > CACHE_BYTES {
            // Messages come to the members of a room within moments of each other: what was
            // inflated long ago is not asked for again.
            c.plain.clear();
            c.bytes = 0;
        }
        c.bytes += data.len() + plain.len();
        c.plain.insert(data.into(), plain.clone());
    });
    Ok(plain)
}

/// A client socket that counts what it reads and, unless `Off`, rewrites compressed frames.
pub struct Wire<S> {
    inner: S,
    inflate: Inflate,
    /// Bytes read but not yet a whole frame.
    raw: Vec<u8>,
    /// Plain frames ready for fastwebsockets, from `ready_at` on.
    ready: Vec<u8>,
    ready_at: usize,
}

impl<S> Wire<S> {
    pub fn new(inner: S, inflate: Inflate) -> Self {
        Wire {
            inner,
            inflate,
            raw: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
        }
    }

    /// Moves every whole frame of `raw` to `ready`, inflated.
    fn rewrite(&mut self) -> io::Result<()> {
        let mut at = 0;
        while let Some((head, len)) = frame_len(&self.raw[at..]) {
            let frame = &self.raw[at..at + head + len];
            if frame[0] & 0x40 == 0 {
                self.ready.extend_from_slice(frame);
            } else {
                if frame[0] & 0x80 == 0 {
                    return Err(io::Error::other("fragmented compressed message"));
                }
                let data = &frame[head..];
                let plain = match self.inflate {
                    Inflate::Shared => inflate_shared(data)?,
                    _ => inflate(data)?.into(),
                };
                push_head(&mut self.ready, frame[0] & !0x40, plain.len());
                self.ready.extend_from_slice(&plain);
            }
            at += head + len;
        }
        self.raw.drain(..at);
        Ok(())
    }
}

/// The header and payload lengths of the frame at the start of `b`, if it is whole.
fn frame_len(b: &[u8]) -> Option<(usize, usize)> {
    let (head, len) = match *b.get(1)? & 0x7F {
        126 => (4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
        127 => (
            10,
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
        ),
        n => (2, n as usize),
    };
    (b.len() >= head + len).then_some((head, len))
}

fn push_head(out: &mut Vec<u8>, b0: u8, len: usize) {
    out.push(b0);
    match len {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

fn inflate(data: &[u8]) -> io::Result<Vec<u8>> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut out = Vec::with_capacity(data.len() * 4 + 256);
        for input in [data, &TAIL[..]] {
            let start = d.total_in();
            loop {
                let at = (d.total_in() - start) as usize;
                let status = d
                    .decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
                    .map_err(io::Error::other)?;
                let done = (d.total_in() - start) as usize == input.len();
                if status == Status::StreamEnd || (done && out.len() < out.capacity()) {
                    break;
                }
                out.reserve(out.capacity().max(1024));
            }
        }
        Ok(out)
    })
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.inflate == Inflate::Off {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            BYTES_IN.fetch_add((buf.filled().len() - before) as u64, Relaxed);
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.ready_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_at);
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // End of stream: fastwebsockets sees it as such.
                return Poll::Ready(Ok(()));
            }
            BYTES_IN.fetch_add(n as u64, Relaxed);
            this.raw.extend_from_slice(rb.filled());
            this.rewrite()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn compressed_frames_become_plain_ones() {
        let text = b"hello hello hello hello hello hello hello".repeat(20);
        let mut c = Compress::new(Compression::default(), false);
        let mut z = Vec::with_capacity(4096);
        c.compress_vec(&text, &mut z, FlushCompress::Sync).unwrap();
        z.truncate(z.len() - 4);
        let mut wire = Wire::new((), Inflate::Each);
        push_head(&mut wire.raw, 0xC1, z.len());
        wire.raw.extend_from_slice(&z);
        push_head(&mut wire.raw, 0x81, 2);
        wire.raw.extend_from_slice(b"hi");
        wire.raw.push(0x81); // the start of the next frame stays
        wire.rewrite().unwrap();
        let mut want = Vec::new();
        push_head(&mut want, 0x81, text.len());
        want.extend_from_slice(&text);
        push_head(&mut want, 0x81, 2);
        want.extend_from_slice(b"hi");
        assert_eq!(wire.ready, want);
        assert_eq!(wire.raw, [0x81]);
    }

    fn compressed(text: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut z = Vec::with_capacity(text.len() + 64);
        c.compress_vec(text, &mut z, FlushCompress::Sync).unwrap();
        z.truncate(z.len() - 4);
        z
    }

    #[test]
    fn members_of_one_thread_inflate_a_message_once_and_read_the_same_frame() {
        let texts = [
            br#"{"type":"message","seq":1,"text":"one one one one one one one one"}"#.to_vec(),
            br#"{"type":"message","seq":2,"text":"two two two two two two two two"}"#.to_vec(),
        ];
        let mut wires: Vec<_> = (0..3).map(|_| Wire::new((), Inflate::Shared)).collect();
        for text in &texts {
            let z = compressed(text);
            for wire in &mut wires {
                push_head(&mut wire.raw, 0xC1, z.len());
                wire.raw.extend_from_slice(&z);
                wire.rewrite().unwrap();
            }
            let cached = CACHE.with(|c| c.borrow().plain.get(&z[..]).map(Rc::strong_count));
            // The cache's copy, and none kept by the wires: inflated once, shared by all three.
            assert_eq!(cached, Some(1));
        }
        let mut want = Vec::new();
        for text in &texts {
            push_head(&mut want, 0x81, text.len());
            want.extend_from_slice(text);
        }
        for wire in &wires {
            assert_eq!(wire.ready, want);
        }
        // Corrupt data is an error for every reader, not a cached result.
        let mut wire = Wire::new((), Inflate::Shared);
        push_head(&mut wire.raw, 0xC1, 3);
        wire.raw.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
        assert!(wire.rewrite().is_err());
    }
}
