//! Writing whole frames to a socket: as much as it takes now in one `writev` (the common,
//! allocation-free path), or the rest with waiting, for a caller that bounds the wait.

use std::io::{self, IoSlice};

use smallvec::SmallVec;
use tokio::net::TcpStream;

/// Total length of `frames` in bytes.
pub fn total_len(frames: &[&[u8]]) -> usize {
    frames.iter().map(|f| f.len()).sum()
}

/// Writes as much of `frames` as the socket takes now, without waiting: one `writev`, more
/// only if the kernel took part of it and has room for more. Returns the bytes written; fewer
/// than all means the socket is full (`WouldBlock` is not an error here).
pub fn write_now(stream: &TcpStream, frames: &[&[u8]]) -> io::Result<usize> {
    let mut slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, 0);
    let mut written = 0;
    while !rest.is_empty() {
        match stream.try_write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Writes what is left of `frames` after the first `*done` bytes, waiting for the socket
/// whenever it is full, and keeps `*done` at the bytes written so far. Cancel-safe only in
/// that it writes nothing twice: dropped part way, it may leave a partial frame on the wire,
/// which `at_frame_boundary(frames, *done)` tells; the caller must then end the connection
/// without writing another frame (a close frame after half a frame is garbage to the peer).
pub async fn write_rest(stream: &TcpStream, frames: &[&[u8]], done: &mut usize) -> io::Result<()> {
    let mut slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, *done);
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *done += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether the first `written` bytes of `frames` end exactly where a frame ends (or nothing
/// was written), so that another frame may follow them on the wire.
pub fn at_frame_boundary(frames: &[&[u8]], written: usize) -> bool {
    let mut end = 0;
    for f in frames {
        if end == written {
            return true;
        }
        end += f.len();
    }
    end == written
}

#[cfg(test)]
mod tests {
    use super::at_frame_boundary;

    #[test]
    fn a_boundary_is_where_a_frame_ends() {
        let frames: [&[u8]; 2] = [b"abc", b"de"];
        assert!(at_frame_boundary(&frames, 0));
        assert!(at_frame_boundary(&frames, 3));
        assert!(at_frame_boundary(&frames, 5));
        assert!(!at_frame_boundary(&frames, 1));
        assert!(!at_frame_boundary(&frames, 4));
    }
}
