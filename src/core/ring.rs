//! One room's ring of recent messages (the frames already encoded for the broadcast), and what
//! a join with `history` or `since` gets from it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use crate::proto::{Epoch, Outbound, ReplayRequest, ServerFrame};

/// Frames to write to a joiner right after its welcome: an announcement (`history` or
/// `recovery`) and the past message frames themselves, oldest first.
pub struct Replay {
    pub header: Bytes,
    pub frames: Vec<Arc<Outbound>>,
}

/// The bytes every room's ring keeps, together, against `--history-memory`. A ring that keeps
/// a message past the budget gives up its own oldest messages until the whole is within it
/// (or it keeps none): memory stays bounded whatever the traffic, and a busy room pays for its
/// own keeping.
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
    /// Messages dropped from rings by a byte budget (`history_trimmed`).
    trimmed: Counter,
}

impl MemoryBudget {
    pub fn new(limit: usize, trimmed: Counter) -> Self {
        MemoryBudget {
            used: AtomicUsize::new(0),
            limit,
            trimmed,
        }
    }

    /// Bytes kept now, every ring together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }
}

/// What one kept message costs: its frame and its `Outbound` (the ring's pointer is in the
/// ring's own allocation, bounded by the capacity).
fn cost(out: &Outbound) -> usize {
    out.frame.len() + std::mem::size_of::<Outbound>()
}

/// One room's last messages, oldest first. Seqs ascend; they are contiguous unless the ring was
/// loaded from an archive that lost some (writer queue overflow), which replay accounts for.
/// Bounded twice: in messages (`capacity`) and in bytes (`max_bytes` for the room, and the
/// shared `MemoryBudget`); the oldest go first.
pub struct History {
    capacity: usize,
    frames: VecDeque<Arc<Outbound>>,
    /// What `frames` costs, in bytes (see `cost`).
    bytes: usize,
    /// `--room-history-bytes` (or the room's `history_bytes`).
    max_bytes: usize,
    budget: Option<Arc<MemoryBudget>>,
}

impl History {
    /// An empty ring keeping at most `capacity` messages (0: keeps nothing), with no byte
    /// bound until `bounded`. Allocates nothing until the first message.
    pub fn new(capacity: usize) -> Self {
        History {
            capacity,
            frames: VecDeque::new(),
            bytes: 0,
            max_bytes: usize::MAX,
            budget: None,
        }
    }

    /// Bounds this ring in bytes too: `max_bytes` for itself, and its share of `budget`. What
    /// it holds already is counted, and trimmed if it is over.
    pub fn bounded(mut self, max_bytes: usize, budget: Option<Arc<MemoryBudget>>) -> Self {
        if let Some(old) = self.budget.take() {
            old.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
        if let Some(b) = &budget {
            b.used.fetch_add(self.bytes, Ordering::Relaxed);
        }
        self.max_bytes = max_bytes;
        self.budget = budget;
        self.trim();
        self
    }

    /// Bytes this ring keeps.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn pop_oldest(&mut self) -> bool {
        let Some(out) = self.frames.pop_front() else {
            return false;
        };
        let size = cost(&out);
        self.bytes -= size;
        if let Some(b) = &self.budget {
            b.used.fetch_sub(size, Ordering::Relaxed);
        }
        true
    }

    /// Drops the oldest messages while a byte bound is exceeded, counted.
    fn trim(&mut self) {
        while self.bytes > self.max_bytes || self.budget.as_ref().is_some_and(|b| b.over()) {
            if !self.pop_oldest() {
                return;
            }
            if let Some(b) = &self.budget {
                b.trimmed.inc();
            }
        }
    }

    /// A ring holding `frames` (oldest first), trimmed to `capacity`.
    pub fn with_frames(capacity: usize, frames: impl IntoIterator<Item = Arc<Outbound>>) -> Self {
        let mut h = History::new(capacity);
        for f in frames {
            h.push(&f);
        }
        h
    }

    /// This ring followed by `newer` (oldest first, seqs ascending): own frames not older than
    /// `newer`'s first are dropped, then the whole is trimmed to the capacity. Cluster mode
    /// starts a room this way from what Redis kept of it.
    pub fn followed_by(mut self, newer: &[Arc<Outbound>]) -> Self {
        if let Some(first) = newer.first() {
            let keep = self.index_after(first.seq.saturating_sub(1));
            self.frames.truncate(keep);
            for f in newer {
                self.push(f);
            }
        }
        self
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Keeps a just-published message (one pointer copy; the frame bytes are shared).
    pub(crate) fn push(&mut self, out: &Arc<Outbound>) {
        if self.capacity == 0 {
            return;
        }
        if self.frames.len() >= self.capacity {
            self.pop_oldest();
        }
        let size = cost(out);
        self.frames.push_back(out.clone());
        self.bytes += size;
        if let Some(b) = &self.budget {
            b.used.fetch_add(size, Ordering::Relaxed);
        }
        self.trim();
    }

    /// The oldest kept seq.
    pub fn first_seq(&self) -> Option<u64> {
        self.frames.front().map(|o| o.seq)
    }

    /// Index of the first kept frame with a seq greater than `seq`.
    fn index_after(&self, seq: u64) -> usize {
        self.frames.partition_point(|o| o.seq <= seq)
    }

    /// What a joiner gets for `req`, given the room's last seq. Called under the room's lock
    /// together with the subscription, so the replay ends exactly where live frames begin.
    pub fn replay(&self, room: &str, req: ReplayRequest, last_seq: u64, epoch: Epoch) -> Replay {
        match req {
            ReplayRequest::Last(n) => {
                let n = (n as usize).min(self.frames.len());
                let frames: Vec<_> = self
                    .frames
                    .range(self.frames.len() - n..)
                    .cloned()
                    .collect();
                Replay {
                    header: ServerFrame::History {
                        room,
                        count: frames.len(),
                        epoch,
                    }
                    .encode(),
                    frames,
                }
            }
            ReplayRequest::Since(since, Some(theirs)) if theirs != epoch => Replay {
                // The room's numbering started again since the client's position: replaying
                // from it would send unrelated messages.
                header: ServerFrame::Recovery {
                    room,
                    since,
                    complete: false,
                    from: last_seq + 1,
                    count: 0,
                    epoch,
                }
                .encode(),
                frames: Vec::new(),
            },
            ReplayRequest::Since(since, _) => {
                // A `since` beyond the last seq means the room's numbering restarted (a server
                // restart without an archive): the client's position means nothing here, so it
                // gets everything kept and `complete: false`.
                let start = if since > last_seq {
                    0
                } else {
                    self.index_after(since)
                };
                let frames: Vec<_> = self.frames.range(start..).cloned().collect();
                let complete = since <= last_seq && frames.len() as u64 == last_seq - since;
                let from = frames.first().map_or(last_seq + 1, |o| o.seq);
                Replay {
                    header: ServerFrame::Recovery {
                        room,
                        since,
                        complete,
                        from,
                        count: frames.len(),
                        epoch,
                    }
                    .encode(),
                    frames,
                }
            }
        }
    }

    /// Up to `limit` kept messages with a seq below `before`, newest first.
    pub fn page(&self, before: u64, limit: usize) -> Vec<Arc<Outbound>> {
        let end = self.frames.partition_point(|o| o.seq < before);
        self.frames
            .range(..end)
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// The frames, leaving the byte budget (the archive holds them only until its writer has
    /// them on disk).
    pub(crate) fn into_frames(mut self) -> VecDeque<Arc<Outbound>> {
        if let Some(b) = self.budget.take() {
            b.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }
}

impl Drop for History {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// A new room's starting point: its last seq and its ring (from the archive, if any).
pub struct Seed {
    pub last_seq: u64,
    /// The incarnation `last_seq` belongs to (a fresh one when nothing of the past is known).
    pub epoch: Epoch,
    pub history: History,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: Epoch = match Epoch::from_bits(7) {
        Some(e) => e,
        None => panic!(),
    };
    use crate::proto::{self, client::MAX_HISTORY_REQUEST};

    fn out(seq: u64) -> Arc<Outbound> {
        Arc::new(Outbound::numbered(
            proto::message_frame("r", "u", &format!("m{seq}"), seq, 0),
            seq,
        ))
    }

    fn header(r: &Replay) -> serde_json::Value {
        serde_json::from_slice(proto::frame_payload(&r.header)).unwrap()
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        r.frames.iter().map(|o| o.seq).collect()
    }

    fn ring(capacity: usize, seqs: impl IntoIterator<Item = u64>) -> History {
        History::with_frames(capacity, seqs.into_iter().map(out))
    }

    #[test]
    fn keeps_the_last_capacity_messages() {
        let h = ring(3, 1..=5);
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_seq(), Some(3));
        let off = ring(0, 1..=5);
        assert!(off.is_empty());
    }

    #[test]
    fn last_n_is_capped_by_what_is_kept() {
        let h = ring(10, 1..=5);
        let r = h.replay("r", ReplayRequest::Last(3), 5, EPOCH);
        assert_eq!(seqs(&r), [3, 4, 5]);
        assert_eq!(header(&r)["type"], "history");
        assert_eq!(header(&r)["count"], 3);
        let r = h.replay("r", ReplayRequest::Last(100), 5, EPOCH);
        assert_eq!(seqs(&r), [1, 2, 3, 4, 5]);
        let r = h.replay("r", ReplayRequest::Last(0), 5, EPOCH);
        assert!(r.frames.is_empty());
    }

    #[test]
    fn since_is_complete_when_everything_after_is_kept() {
        let h = ring(10, 1..=8);
        let r = h.replay("r", ReplayRequest::Since(5, None), 8, EPOCH);
        assert_eq!(seqs(&r), [6, 7, 8]);
        let v = header(&r);
        assert_eq!(
            (
                v["complete"].as_bool(),
                v["from"].as_u64(),
                v["count"].as_u64()
            ),
            (Some(true), Some(6), Some(3))
        );
        let r = h.replay("r", ReplayRequest::Since(8, None), 8, EPOCH);
        assert!(r.frames.is_empty());
        assert_eq!(header(&r)["complete"], true);
        assert_eq!(header(&r)["from"], 9);
    }

    #[test]
    fn since_too_old_is_incomplete_and_sends_what_is_kept() {
        let h = ring(3, 1..=8);
        let r = h.replay("r", ReplayRequest::Since(2, None), 8, EPOCH);
        assert_eq!(seqs(&r), [6, 7, 8]);
        let v = header(&r);
        assert_eq!(
            (v["complete"].as_bool(), v["from"].as_u64()),
            (Some(false), Some(6))
        );
        // Nothing kept at all.
        let r = ring(0, 1..=8).replay("r", ReplayRequest::Since(2, None), 8, EPOCH);
        assert!(r.frames.is_empty());
        assert_eq!(header(&r)["complete"], false);
        assert_eq!(header(&r)["from"], 9);
    }

    #[test]
    fn since_beyond_the_last_seq_means_the_numbering_restarted() {
        let h = ring(10, 1..=3);
        let r = h.replay("r", ReplayRequest::Since(50, None), 3, EPOCH);
        assert_eq!(seqs(&r), [1, 2, 3]);
        assert_eq!(header(&r)["complete"], false);
    }

    #[test]
    fn since_in_another_epoch_replays_nothing_and_names_the_epoch() {
        let h = ring(10, 1..=8);
        let other = Epoch::from_bits(8).unwrap();
        let r = h.replay("r", ReplayRequest::Since(5, Some(other)), 8, EPOCH);
        assert!(
            r.frames.is_empty(),
            "seqs of another epoch are other messages"
        );
        let v = header(&r);
        assert_eq!(
            (
                v["complete"].as_bool(),
                v["count"].as_u64(),
                v["from"].as_u64()
            ),
            (Some(false), Some(0), Some(9))
        );
        assert_eq!(v["epoch"], EPOCH.to_string());
        // The same epoch recovers as usual.
        let r = h.replay("r", ReplayRequest::Since(5, Some(EPOCH)), 8, EPOCH);
        assert_eq!(seqs(&r), [6, 7, 8]);
        assert_eq!(header(&r)["complete"], true);
        assert_eq!(header(&r)["epoch"], EPOCH.to_string());
    }

    #[test]
    fn holes_from_a_lossy_archive_make_recovery_incomplete() {
        let h = ring(10, [1, 2, 4, 5]);
        let r = h.replay("r", ReplayRequest::Since(1, None), 5, EPOCH);
        assert_eq!(seqs(&r), [2, 4, 5]);
        assert_eq!(header(&r)["complete"], false);
        let r = h.replay("r", ReplayRequest::Since(3, None), 5, EPOCH);
        assert_eq!(header(&r)["complete"], true);
    }

    #[test]
    fn a_ring_followed_by_newer_frames_keeps_one_copy_of_each_seq_in_order() {
        let newer: Vec<_> = (4..=7).map(out).collect();
        let h = ring(5, 1..=5).followed_by(&newer);
        let kept: Vec<u64> = h.frames.iter().map(|o| o.seq).collect();
        assert_eq!(kept, [3, 4, 5, 6, 7]);
        let h = ring(0, 1..=5).followed_by(&newer);
        assert!(h.is_empty(), "history off keeps nothing");
        let h = ring(10, 1..=3).followed_by(&[]);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn byte_bounds_drop_the_oldest_and_the_budget_is_shared() {
        // Two-digit seqs: every frame has the same size.
        let size = cost(&out(11));
        let trimmed = Counter::default();
        let budget = Arc::new(MemoryBudget::new(5 * size, trimmed.clone()));
        // Per room: three messages' worth.
        let mut a = History::new(100).bounded(3 * size, Some(budget.clone()));
        for seq in 11..=20 {
            a.push(&out(seq));
        }
        assert_eq!((a.len(), a.first_seq()), (3, Some(18)));
        assert_eq!(budget.used(), 3 * size);
        // Another room fills the rest of the budget; past it, the pushing room gives up its own.
        let mut b = History::new(100).bounded(usize::MAX, Some(budget.clone()));
        for seq in 11..=14 {
            b.push(&out(seq));
        }
        assert_eq!(b.len(), 2, "5 in all: 3 in a, 2 in b");
        assert_eq!(budget.used(), 5 * size);
        assert_eq!(trimmed.get(), 7 + 2);
        drop(a);
        assert_eq!(budget.used(), 2 * size, "a ring gives back what it kept");
        let frames = b.into_frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(budget.used(), 0);
        // A ring loaded over its bound is trimmed at once.
        let c = ring(10, 11..=16).bounded(2 * size, Some(budget.clone()));
        assert_eq!((c.len(), c.bytes(), budget.used()), (2, 2 * size, 2 * size));
    }

    #[test]
    fn pages_go_newest_first() {
        let h = ring(10, 1..=8);
        let p: Vec<u64> = h.page(u64::MAX, 3).iter().map(|o| o.seq).collect();
        assert_eq!(p, [8, 7, 6]);
        let p: Vec<u64> = h.page(6, 3).iter().map(|o| o.seq).collect();
        assert_eq!(p, [5, 4, 3]);
        assert!(h.page(1, 3).is_empty());
    }

    #[test]
    fn replay_request_parts() {
        assert_eq!(ReplayRequest::from_parts(None, None, None), Ok(None));
        assert_eq!(
            ReplayRequest::from_parts(Some(5), None, None),
            Ok(Some(ReplayRequest::Last(5)))
        );
        assert_eq!(
            ReplayRequest::from_parts(None, Some(0), None),
            Ok(Some(ReplayRequest::Since(0, None)))
        );
        assert!(ReplayRequest::from_parts(Some(1), Some(1), None).is_err());
        assert!(ReplayRequest::from_parts(Some(MAX_HISTORY_REQUEST + 1), None, None).is_err());
        let e = EPOCH.to_string();
        assert_eq!(
            ReplayRequest::from_parts(None, Some(4), Some(&e)),
            Ok(Some(ReplayRequest::Since(4, Some(EPOCH))))
        );
        assert!(ReplayRequest::from_parts(None, None, Some(&e)).is_err());
        assert!(ReplayRequest::from_parts(None, Some(4), Some("nope")).is_err());
    }
}
