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

/// Writes what is left of `frames` after the first `skip` bytes, waiting for the socket
/// whenever it is full. Cancel-safe only in that it writes nothing twice: dropped part way, it
/// leaves a partial frame on the wire, so the caller ends the connection.
pub async fn write_rest(stream: &TcpStream, frames: &[&[u8]], skip: usize) -> io::Result<()> {
    let mut slices: SmallVec<[IoSlice<'_>; 16]> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, skip);
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
