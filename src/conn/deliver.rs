//! Delivery: frames from the rooms' broadcast rings to the socket, several per vectored write,
//! with the lag policy applied and each write counted.

use std::sync::Arc;

use smallvec::SmallVec;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;

use super::{Connection, End, MAX_BATCH};
use crate::core::history::LagPolicy;
use crate::core::room::Room;
use crate::core::stats::Stats;
use crate::proto::{self, Outbound};
use crate::ws::write::{total_len, write_now, write_rest};

/// A room this socket is in.
pub(super) struct Membership {
    pub(super) room: Arc<Room>,
    rx: Receiver<Arc<Outbound>>,
    /// Seq of the last message seen from this room (delivered or skipped by `echo:false`).
    last_seq: u64,
    /// `--lag-policy resync`: the first seq this member missed; announced by a `lagged` frame
    /// just before the next message it does get.
    gap_from: Option<u64>,
}

impl Membership {
    pub(super) fn new(room: Arc<Room>, rx: Receiver<Arc<Outbound>>, last_seq: u64) -> Self {
        Membership {
            room,
            rx,
            last_seq,
            gap_from: None,
        }
    }

    /// Adds a frame from this room (room index `i`) to `batch` if it is for connection
    /// `conn`, preceded by a `lagged` notice when a gap is pending.
    pub(super) fn accept(
        &mut self,
        i: usize,
        out: Arc<Outbound>,
        conn: u64,
        batch: &mut Batch,
        stats: &Stats,
    ) {
        if out.seq > 0 {
            if let Some(from) = self.gap_from.take() {
                if out.seq > from {
                    stats.lag_resyncs.inc();
                    let notice = Outbound {
                        frame: proto::lagged_frame(self.room.name(), from, out.seq - 1),
                        origin: 0,
                        skip_origin: false,
                        published_at: out.published_at,
                        seq: 0,
                    };
                    batch.push((i, Arc::new(notice)));
                }
            }
            self.last_seq = out.seq;
        }
        if out.is_for(conn) {
            batch.push((i, out));
        }
    }

    /// The receiver skipped frames (`--lag-policy resync`): everything after the last seq seen
    /// is missing until the next message says where the gap ends.
    pub(super) fn lagged(&mut self) {
        if self.gap_from.is_none() {
            self.gap_from = Some(self.last_seq + 1);
        }
    }
}

/// A room batch the socket did not take in full at once: the rest is written by a boxed future
/// (`finish_delivery`), so that the rare full socket, not every idle one, pays for the space.
pub(super) struct Blocked {
    batch: Batch,
    /// Bytes of the batch already written.
    written: usize,
}

/// Room frames gathered for one write, with the index of the room each came from.
type Batch = SmallVec<[(usize, Arc<Outbound>); 16]>;

impl Connection {
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
    pub(super) fn deliver(
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
            Err(RecvError::Closed) => return Err(End::Close(1011, "room closed")),
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
        let frames: SmallVec<[&[u8]; 16]> = batch.iter().map(|(_, o)| &o.frame[..]).collect();
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
    /// (past it the member is evicted as a slow consumer).
    pub(super) async fn finish_delivery(&mut self, blocked: Box<Blocked>) -> Option<End> {
        let frames: SmallVec<[&[u8]; 16]> =
            blocked.batch.iter().map(|(_, o)| &o.frame[..]).collect();
        let timeout = self.cx.limits.write_timeout;
        let rest = write_rest(&self.stream, &frames, blocked.written);
        match tokio::time::timeout(timeout, rest).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(End::Gone),
            Err(_) => {
                let (index, _) = blocked.batch[0];
                return Some(self.evict(index));
            }
        }
        self.count_delivery(&blocked.batch);
        None
    }

    /// Counts a written batch and records, per room, how long its oldest frame waited.
    pub(super) fn count_delivery(&self, batch: &Batch) {
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

    pub(super) fn evict(&mut self, index: usize) -> End {
        if let Some(m) = self.rooms.get(index) {
            m.room.record_eviction();
        }
        End::Close(1008, "slow consumer")
    }
}

/// Waits for the next frame from any of the rooms. Cancel-safe: `broadcast::Receiver::recv`
/// loses nothing when dropped before completion.
pub(super) async fn recv_any(
    rooms: &mut [Membership],
) -> (usize, Result<Arc<Outbound>, RecvError>) {
    match rooms {
        [] => std::future::pending().await,
        [only] => (0, only.rx.recv().await),
        many => {
            let futures = many
                .iter_mut()
                .enumerate()
                .map(|(i, m)| Box::pin(async move { (i, m.rx.recv().await) }));
            futures_util::future::select_all(futures).await.0
        }
    }
}
