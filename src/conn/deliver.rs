//! Delivery: frames from the rooms' broadcast rings to the socket, several per vectored write,
//! with the lag policy applied and each write counted.

use std::sync::Arc;

use fastwebsockets::OpCode;
use smallvec::SmallVec;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::end::End;
use super::membership::Batch;
use super::{Connection, MAX_BATCH};
use crate::config::LagPolicy;
use crate::proto::close;
use crate::proto::{frame_payload, Outbound};
use crate::ws::deflate;
use crate::ws::write::{at_frame_boundary, total_len, write_now, write_rest};

/// A room batch the socket did not take in full at once: the rest is written by a boxed future
/// (`finish_delivery`), so that the rare full socket, not every idle one, pays for the space.
struct Blocked {
    batch: Batch,
    /// Bytes of the batch already written.
    written: usize,
}

/// Batches a drain's turn delivers before its close, at most: a room publishing faster than
/// the socket takes them is left to the client's recovery (`since`).
const PENDING_BATCHES: usize = 16;

impl Connection {
    /// Before a drain's close: what the rooms have already numbered for this member goes out
    /// first (held batches released, then the queued frames), so that a publisher gets the
    /// acknowledgement of a message the server kept. Without it, a publisher closed between
    /// the numbering and its copy sends the message again to the restarted server, where it
    /// gets a second seq. `Some(end)`: the socket ended another way meanwhile.
    pub(super) async fn deliver_pending(&mut self) -> Option<End> {
        for m in &self.rooms {
            m.room.release();
        }
        for _ in 0..PENDING_BATCHES {
            let next = self
                .rooms
                .iter_mut()
                .enumerate()
                .find_map(|(i, m)| match m.rx.try_recv() {
                    Ok(out) => Some((i, Ok(out))),
                    Err(TryRecvError::Lagged(n)) => Some((i, Err(RecvError::Lagged(n)))),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => None,
                });
            let (index, first) = next?;
            if let Some(end) = self.on_room_frame(index, first).await {
                return Some(end);
            }
        }
        None
    }

    /// Handles the first frame `recv_any` produced, then drains whatever else is already queued
    /// in any room (up to `MAX_BATCH`) and writes it all in one vectored write. The gathering
    /// and the write the socket takes at once are synchronous (`deliver`): only a batch the
    /// socket could not take in full waits, boxed, in `finish_delivery`.
    pub(super) async fn on_room_frame(
        &mut self,
        index: usize,
        first: Result<Arc<Outbound>, RecvError>,
    ) -> Option<End> {
        match self.deliver(index, first) {
            Ok(None) => None,
            Ok(Some(blocked)) => Box::pin(self.finish_delivery(blocked)).await,
            Err(end) => Some(end),
        }
    }

    /// Gathers a batch and writes as much of it as the socket takes now. `Ok(Some(_))`: the
    /// socket is full and the rest must be waited for.
    fn deliver(
        &mut self,
        index: usize,
        first: Result<Arc<Outbound>, RecvError>,
    ) -> Result<Option<Box<Blocked>>, End> {
        let mut batch = Batch::new();
        let resync = self.cx.limits.lag_policy == LagPolicy::Resync;
        let stats = &self.cx.stats;
        match first {
            Ok(out) => {
                if let Some(m) = self.rooms.get_mut(index) {
                    m.accept(index, out, self.id, &mut batch, stats);
                }
            }
            Err(RecvError::Lagged(_)) if resync => {
                if let Some(m) = self.rooms.get_mut(index) {
                    m.lagged();
                }
            }
            Err(RecvError::Lagged(_)) => return Err(self.evict(index)),
            // The room's sender lives in the Room we hold: it cannot close while we are in it.
            Err(RecvError::Closed) => return Err(End::Close(close::INTERNAL, "room closed")),
        }
        let mut evict = None;
        'rooms: for (i, m) in self.rooms.iter_mut().enumerate() {
            while batch.len() < MAX_BATCH {
                match m.rx.try_recv() {
                    Ok(out) => m.accept(i, out, self.id, &mut batch, stats),
                    Err(TryRecvError::Lagged(_)) if resync => m.lagged(),
                    Err(TryRecvError::Lagged(_)) => {
                        evict = Some(i);
                        break 'rooms;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => continue 'rooms,
                }
            }
            break;
        }
        if let Some(i) = evict {
            return Err(self.evict(i));
        }
        if batch.is_empty() {
            return Ok(None);
        }
        let frames = self.wire(&batch);
        match write_now(&self.stream, &frames) {
            Ok(written) if written == total_len(&frames) => {}
            Ok(written) => {
                drop(frames);
                return Ok(Some(Box::new(Blocked { batch, written })));
            }
            Err(_) => return Err(End::Gone),
        }
        self.count_delivery(&batch);
        Ok(None)
    }

    /// Writes the rest of a batch the socket did not take at once, within `--write-timeout`
    /// (past it the member is evicted as a slow consumer: closed with 1008 when the write
    /// stopped between two frames, dropped without a close frame when it stopped inside one).
    async fn finish_delivery(&mut self, blocked: Box<Blocked>) -> Option<End> {
        // The same bytes as the first attempt: a compressed frame, once made, stays.
        let frames = self.wire(&blocked.batch);
        let timeout = self.cx.limits.write_timeout;
        let mut done = blocked.written;
        let rest = write_rest(&self.stream, &frames, &mut done);
        match tokio::time::timeout(timeout, rest).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(End::Gone),
            Err(_) => {
                let (index, _) = blocked.batch[0];
                let end = self.evict(index);
                // Cut in the middle of a frame, the stream has no room for a close frame.
                return Some(if at_frame_boundary(&frames, done) {
                    end
                } else {
                    End::Gone
                });
            }
        }
        self.count_delivery(&blocked.batch);
        None
    }

    /// The bytes of each frame of `batch` for this socket: a room message goes compressed when
    /// the socket negotiated permessage-deflate, its room allows it, and it is at least
    /// `--compression-min-bytes` long (and fits the window the client asked for). The first
    /// member that needs a message compressed compresses it; every other one shares the bytes.
    fn wire<'b>(&self, batch: &'b Batch) -> SmallVec<[&'b [u8]; 16]> {
        let (Some(agreed), Some(min)) = (self.deflate, self.cx.limits.compression) else {
            return batch.iter().map(|(_, o)| &o.frame[..]).collect();
        };
        let stats = &self.cx.stats.deflate;
        let pick = |out: &'b Outbound| -> &'b [u8] {
            let Some(cell) = &out.deflated else {
                return &out.frame;
            };
            let payload = frame_payload(&out.frame);
            if payload.len() < min || !agreed.fits(payload.len()) {
                return &out.frame;
            }
            cell.get_or_init(|| {
                stats.frames_compressed.inc();
                deflate::compress_frame(OpCode::Text, payload).unwrap_or_else(|| out.frame.clone())
            })
        };
        batch.iter().map(|(_, o)| pick(o)).collect()
    }

    /// Counts a written batch and records, per room, how long its oldest frame waited.
    fn count_delivery(&self, batch: &Batch) {
        let stats = &self.cx.stats;
        stats.frames_out.inc_by(batch.len() as u64);
        stats.writes.inc();
        // One wait sample per room per write: the oldest frame of that room in this batch.
        let now = std::time::Instant::now();
        let mut seen: SmallVec<[usize; 4]> = SmallVec::new();
        for (i, out) in batch {
            if !seen.contains(i) {
                seen.push(*i);
                self.rooms[*i].room.record_wait(out.published_at, now);
            }
        }
    }

    fn evict(&mut self, index: usize) -> End {
        if let Some(m) = self.rooms.get(index) {
            m.room.record_eviction();
        }
        End::Close(close::POLICY, "slow consumer")
    }
}
