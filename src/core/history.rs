//! Message history, between a room's publishing and its joiners: each room keeps its last
//! messages as the frames already encoded for the broadcast (so replay costs no encoding), and
//! a join may ask for the last N of them (`history`) or for everything after a seq (`since`,
//! gapless recovery after a reconnect).
//!
//! `History` is one room's ring; it lives inside the room's state mutex, the same lock that
//! numbers and broadcasts a message and subscribes a joiner, which is what makes "replay, then
//! live" atomic: no gap, no duplicate. `HistoryService` is what every room shares: the settings
//! and the optional SQLite archive (`archive.rs`). In cluster mode a room's ring is also kept in
//! Redis (a capped list per room, `cluster.rs`); a process creating the room starts its ring from
//! that list (`History::followed_by`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::core::archive::{Archive, DbError, Retention};
use crate::core::dedupe::Dedupe;
use crate::core::stats::Stats;
use crate::proto::ReplayRequest;
use crate::proto::{Outbound, ServerFrame};

/// Frames to write to a joiner right after its welcome: an announcement (`history` or
/// `recovery`) and the past message frames themselves, oldest first.
pub struct Replay {
    pub header: Bytes,
    pub frames: Vec<Arc<Outbound>>,
}

/// One room's last messages, oldest first. Seqs ascend; they are contiguous unless the ring was
/// loaded from an archive that lost some (writer queue overflow), which replay accounts for.
pub struct History {
    capacity: usize,
    frames: VecDeque<Arc<Outbound>>,
}

impl History {
    /// An empty ring keeping at most `capacity` messages (0: keeps nothing). Allocates nothing
    /// until the first message.
    pub fn new(capacity: usize) -> Self {
        History {
            capacity,
            frames: VecDeque::new(),
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
            self.frames.pop_front();
        }
        self.frames.push_back(out.clone());
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
    pub fn replay(&self, room: &str, req: ReplayRequest, last_seq: u64) -> Replay {
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
                    }
                    .encode(),
                    frames,
                }
            }
            ReplayRequest::Since(since) => {
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

    pub(crate) fn into_frames(self) -> VecDeque<Arc<Outbound>> {
        self.frames
    }
}

/// What a member does when it falls `--room-buffer` frames behind a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LagPolicy {
    /// Close it with 1008 "slow consumer".
    Evict,
    /// Tell it which seqs it missed (`lagged` frame) and keep it in the room.
    Resync,
}

/// History settings shared by every room, parsed from the configuration.
#[derive(Debug, Clone)]
pub struct HistorySettings {
    /// Messages kept per room by default (`--history`).
    pub capacity: usize,
    /// How long an `id` is remembered (`--dedupe-window`); zero turns deduplication off.
    pub dedupe_window: Duration,
    /// Most ids remembered per room (`--dedupe-max`).
    pub dedupe_max: usize,
    /// SQLite file for durable history (`--history-db`).
    pub db: Option<PathBuf>,
    pub retention: Retention,
    /// Messages waiting for the disk writer before new ones are dropped (`--history-db-queue`).
    pub db_queue: usize,
}

impl Default for HistorySettings {
    /// History off: what benches and unit tests of other modules use.
    fn default() -> Self {
        HistorySettings {
            capacity: 0,
            dedupe_window: Duration::ZERO,
            dedupe_max: 0,
            db: None,
            retention: Retention::default(),
            db_queue: 1,
        }
    }
}

/// A new room's starting point: its last seq and its ring (from the archive, if any).
pub struct Seed {
    pub last_seq: u64,
    pub history: History,
}

/// What every room shares about history: settings and the optional archive.
pub struct HistoryService {
    settings: HistorySettings,
    archive: Option<Archive>,
}

impl HistoryService {
    /// Opens the archive when one is configured (fails on a database that cannot be opened).
    pub fn new(settings: HistorySettings, stats: Arc<Stats>) -> Result<Self, DbError> {
        let archive = match &settings.db {
            Some(path) => Some(Archive::open(
                path,
                settings.retention,
                settings.db_queue,
                stats,
            )?),
            None => None,
        };
        Ok(HistoryService { settings, archive })
    }

    /// History off, no archive.
    pub fn disabled() -> Self {
        HistoryService {
            settings: HistorySettings::default(),
            archive: None,
        }
    }

    pub fn settings(&self) -> &HistorySettings {
        &self.settings
    }

    pub fn archive(&self) -> Option<&Archive> {
        self.archive.as_ref()
    }

    /// The starting point of room `name`, created now with a ring of `capacity`. With an
    /// archive, seq and ring continue from what the room had before (a restart, or the room
    /// emptied and came back). Called under the registry's shard lock, so it never races the
    /// same room's `retire`.
    pub fn new_room(&self, name: &str, capacity: usize) -> Seed {
        match &self.archive {
            Some(archive) => archive.seed(name, capacity),
            None => Seed {
                last_seq: 0,
                history: History::new(capacity),
            },
        }
    }

    /// A fresh dedupe window for a new room.
    pub fn new_dedupe(&self) -> Dedupe {
        Dedupe::new(self.settings.dedupe_window, self.settings.dedupe_max)
    }

    /// Hands a just-published message to the archive. Never blocks: a full writer queue drops
    /// it and counts the drop.
    pub(crate) fn record(&self, room: &Arc<str>, ts: u64, out: &Arc<Outbound>) {
        if let Some(archive) = &self.archive {
            archive.append(room, ts, out);
        }
    }

    /// A room leaves memory (its last member left) with `last_seq` and its ring.
    pub(crate) fn retire(&self, room: &Arc<str>, last_seq: u64, history: History) {
        if let Some(archive) = &self.archive {
            archive.retire(room, last_seq, history);
        }
    }

    /// Flushes and stops the archive writer, waiting at most `within`. Blocking.
    pub fn close(&self, within: Duration) {
        if let Some(archive) = &self.archive {
            archive.close(within);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{self, client::MAX_HISTORY_REQUEST};
    use std::time::Instant;

    fn out(seq: u64) -> Arc<Outbound> {
        Arc::new(Outbound {
            frame: proto::message_frame("r", "u", &format!("m{seq}"), seq, 0),
            origin: 0,
            skip_origin: false,
            published_at: Instant::now(),
            seq,
        })
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
        let r = h.replay("r", ReplayRequest::Last(3), 5);
        assert_eq!(seqs(&r), [3, 4, 5]);
        assert_eq!(header(&r)["type"], "history");
        assert_eq!(header(&r)["count"], 3);
        let r = h.replay("r", ReplayRequest::Last(100), 5);
        assert_eq!(seqs(&r), [1, 2, 3, 4, 5]);
        let r = h.replay("r", ReplayRequest::Last(0), 5);
        assert!(r.frames.is_empty());
    }

    #[test]
    fn since_is_complete_when_everything_after_is_kept() {
        let h = ring(10, 1..=8);
        let r = h.replay("r", ReplayRequest::Since(5), 8);
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
        let r = h.replay("r", ReplayRequest::Since(8), 8);
        assert!(r.frames.is_empty());
        assert_eq!(header(&r)["complete"], true);
        assert_eq!(header(&r)["from"], 9);
    }

    #[test]
    fn since_too_old_is_incomplete_and_sends_what_is_kept() {
        let h = ring(3, 1..=8);
        let r = h.replay("r", ReplayRequest::Since(2), 8);
        assert_eq!(seqs(&r), [6, 7, 8]);
        let v = header(&r);
        assert_eq!(
            (v["complete"].as_bool(), v["from"].as_u64()),
            (Some(false), Some(6))
        );
        // Nothing kept at all.
        let r = ring(0, 1..=8).replay("r", ReplayRequest::Since(2), 8);
        assert!(r.frames.is_empty());
        assert_eq!(header(&r)["complete"], false);
        assert_eq!(header(&r)["from"], 9);
    }

    #[test]
    fn since_beyond_the_last_seq_means_the_numbering_restarted() {
        let h = ring(10, 1..=3);
        let r = h.replay("r", ReplayRequest::Since(50), 3);
        assert_eq!(seqs(&r), [1, 2, 3]);
        assert_eq!(header(&r)["complete"], false);
    }

    #[test]
    fn holes_from_a_lossy_archive_make_recovery_incomplete() {
        let h = ring(10, [1, 2, 4, 5]);
        let r = h.replay("r", ReplayRequest::Since(1), 5);
        assert_eq!(seqs(&r), [2, 4, 5]);
        assert_eq!(header(&r)["complete"], false);
        let r = h.replay("r", ReplayRequest::Since(3), 5);
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
        assert_eq!(ReplayRequest::from_parts(None, None), Ok(None));
        assert_eq!(
            ReplayRequest::from_parts(Some(5), None),
            Ok(Some(ReplayRequest::Last(5)))
        );
        assert_eq!(
            ReplayRequest::from_parts(None, Some(0)),
            Ok(Some(ReplayRequest::Since(0)))
        );
        assert!(ReplayRequest::from_parts(Some(1), Some(1)).is_err());
        assert!(ReplayRequest::from_parts(Some(MAX_HISTORY_REQUEST + 1), None).is_err());
    }
}
