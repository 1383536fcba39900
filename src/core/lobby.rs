//! `$lobby`: the server's read-only room of room events. It owns its own `Room` (never in the
//! hub's map, so it is never listed, counted, created or closed), the changes noted since the
//! last tick, and whether the member counts moved. `Hub` feeds it; the lobby task flushes it
//! once per `TICK`.
//!
//! Coalescing: within one tick, a room created and closed again cancels out, and so does one
//! closed and created again. A tick with at most `SINGLE_EVENTS_MAX` changes sends them as
//! `room_created` / `room_closed` frames; a busier one sends one `rooms_changed` frame with both
//! lists. Then, if any count moved, one `room_counts` frame. So a ramp of any size costs at most
//! two frames per tick. With nobody in the lobby nothing is noted: each hook is one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::rooms::{Presence, RoomSettings};
use crate::core::history::HistoryService;
use crate::core::ring::{History, Seed};
use crate::core::room::{Joined, Room};
use crate::core::stats::Stats;
use crate::proto::names::LOBBY;
use crate::proto::ReplayRequest;
use crate::proto::{RoomCount, ServerFrame};

/// Rooms a `room_counts` frame lists by default (`--lobby-top`).
pub const DEFAULT_TOP: usize = 50;
/// How often the lobby sends what changed: `room_counts` at most this often.
pub const TICK: Duration = Duration::from_secs(1);
/// Changes in one tick sent as single events; more become one `rooms_changed` frame.
pub const SINGLE_EVENTS_MAX: usize = 4;
/// Most room names one tick remembers (and one `rooms_changed` frame lists); past it the frame
/// says `truncated` and clients re-read `GET /api/rooms`.
pub const CHANGES_MAX: usize = 10_000;
/// Frames the lobby's ring holds for a slow member: at most a few per tick.
const LOBBY_BUFFER: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Created,
    Closed,
}

#[derive(Default)]
struct Changes {
    /// Net change per room name since the last tick.
    rooms: HashMap<Box<str>, Change>,
    /// Some changes were not remembered (`CHANGES_MAX`).
    truncated: bool,
}

pub struct Lobby {
    room: Arc<Room>,
    /// Members of `$lobby`; zero turns every hook into a no-op.
    watchers: AtomicUsize,
    changes: Mutex<Changes>,
    /// Some room's member count changed (or a watcher arrived) since the last `room_counts`.
    counts_dirty: AtomicBool,
    /// Rooms listed by `room_counts` (`--lobby-top`).
    top: usize,
    stats: Arc<Stats>,
}

impl Lobby {
    pub fn new(top: usize, stats: Arc<Stats>) -> Lobby {
        let settings = RoomSettings {
            presence: Presence::Off,
            ..RoomSettings::from_flags(LOBBY_BUFFER)
        };
        Lobby {
            room: Arc::new(Room::new(
                LOBBY,
                settings,
                Seed {
                    last_seq: 0,
                    history: History::new(0),
                },
                Arc::new(HistoryService::disabled()),
                stats.clone(),
            )),
            watchers: AtomicUsize::new(0),
            changes: Mutex::new(Changes::default()),
            counts_dirty: AtomicBool::new(false),
            top: top.max(1),
            stats,
        }
    }

    /// Whether `room` is the lobby's own room.
    pub fn is(&self, room: &Arc<Room>) -> bool {
        Arc::ptr_eq(&self.room, room)
    }

    pub fn top(&self) -> usize {
        self.top
    }

    fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Adds a member. Its first `room_counts` comes with the next tick.
    /// The lobby keeps no history: a `replay` request gets an empty one.
    pub(crate) fn join(&self, id: u64, user: &Arc<str>, replay: Option<ReplayRequest>) -> Joined {
        let mut state = self.room.lock();
        let (rx, welcome, replay) = self.room.add_member(&mut state, id, user, replay);
        let last_seq = state.seq();
        self.watchers.fetch_add(1, Ordering::Relaxed);
        self.counts_dirty.store(true, Ordering::Relaxed);
        drop(state);
        Joined {
            room: self.room.clone(),
            rx,
            welcome,
            replay,
            last_seq,
        }
    }

    pub(crate) fn leave(&self, id: u64) -> bool {
        let mut state = self.room.lock();
        let removed = self.room.remove_member(&mut state, id);
        if removed {
            self.watchers.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// A room was created (called under its shard lock).
    pub(crate) fn room_created(&self, name: &str) {
        self.note(name, Change::Created);
    }

    /// A room was removed with its last member (called under its shard lock).
    pub(crate) fn room_closed(&self, name: &str) {
        self.note(name, Change::Closed);
    }

    /// Some room's member count changed.
    pub(crate) fn counts_changed(&self) {
        if self.watched() {
            self.counts_dirty.store(true, Ordering::Relaxed);
        }
    }

    fn note(&self, name: &str, change: Change) {
        if !self.watched() {
            return;
        }
        self.counts_dirty.store(true, Ordering::Relaxed);
        let mut changes = self.changes.lock();
        match changes.rooms.get(name) {
            // Created then closed, or closed then created, within one tick: nothing to tell.
            Some(&earlier) if earlier != change => {
                changes.rooms.remove(name);
            }
            Some(_) => {}
            None if changes.rooms.len() >= CHANGES_MAX => changes.truncated = true,
            None => {
                changes.rooms.insert(name.into(), change);
            }
        }
    }

    /// Sends this tick's frames. `snapshot` lists the busiest rooms (`(name, members)`, largest
    /// first, at most `top`) and the total; it is only called when a count moved.
    pub(crate) fn flush(&self, snapshot: impl FnOnce(usize) -> (Vec<(Arc<Room>, usize)>, usize)) {
        if !self.watched() {
            // Nobody to tell: forget what was noted while the last watcher was leaving.
            let mut changes = self.changes.lock();
            if !changes.rooms.is_empty() || changes.truncated {
                *changes = Changes::default();
            }
            self.counts_dirty.store(false, Ordering::Relaxed);
            return;
        }
        let changes = std::mem::take(&mut *self.changes.lock());
        if !changes.rooms.is_empty() || changes.truncated {
            self.send_changes(changes);
        }
        if self.counts_dirty.swap(false, Ordering::Relaxed) {
            let (rooms, total) = snapshot(self.top);
            let rooms: Vec<RoomCount<'_>> = rooms
                .iter()
                .map(|(room, members)| RoomCount {
                    room: room.name(),
                    members: *members,
                })
                .collect();
            self.send(ServerFrame::RoomCounts {
                rooms: &rooms,
                total,
            });
        }
    }

    fn send_changes(&self, changes: Changes) {
        let mut created: Vec<&str> = Vec::new();
        let mut closed: Vec<&str> = Vec::new();
        for (name, change) in &changes.rooms {
            match change {
                Change::Created => created.push(name),
                Change::Closed => closed.push(name),
            }
        }
        created.sort_unstable();
        closed.sort_unstable();
        if !changes.truncated && changes.rooms.len() <= SINGLE_EVENTS_MAX {
            for room in closed {
                self.send(ServerFrame::RoomClosed { room });
            }
            for room in created {
                self.send(ServerFrame::RoomCreated { room });
            }
            return;
        }
        self.send(ServerFrame::RoomsChanged {
            created: &created,
            closed: &closed,
            truncated: changes.truncated,
        });
    }

    fn send(&self, frame: ServerFrame<'_>) {
        self.stats.frames_encoded.inc();
        self.room.send_frame(frame.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &[u8]) -> serde_json::Value {
        let start = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    fn lobby() -> Lobby {
        Lobby::new(50, Arc::new(Stats::new()))
    }

    fn no_rooms(_: usize) -> (Vec<(Arc<Room>, usize)>, usize) {
        (Vec::new(), 0)
    }

    #[test]
    fn nothing_is_noted_without_watchers() {
        let l = lobby();
        for i in 0..100 {
            l.room_created(&format!("r{i}"));
        }
        l.counts_changed();
        assert!(l.changes.lock().rooms.is_empty());
        assert!(!l.counts_dirty.load(Ordering::Relaxed));
        l.flush(|_| panic!("no snapshot without watchers"));
    }

    #[test]
    fn a_tick_coalesces_and_cancels() {
        let l = lobby();
        let user: Arc<str> = "w".into();
        let mut j = l.join(1, &user, None);
        l.flush(no_rooms); // the joiner's first room_counts
        assert_eq!(
            payload(&j.rx.try_recv().unwrap().frame)["type"],
            "room_counts"
        );

        // A few changes: single events, the exact shapes.
        l.room_created("a");
        l.room_created("b");
        l.room_closed("b"); // created and closed in one tick: nothing
        l.room_closed("old");
        l.flush(no_rooms);
        let frames: Vec<_> = std::iter::from_fn(|| j.rx.try_recv().ok())
            .map(|o| payload(&o.frame))
            .collect();
        assert_eq!(
            frames,
            vec![
                serde_json::json!({"type": "room_closed", "room": "old"}),
                serde_json::json!({"type": "room_created", "room": "a"}),
                serde_json::json!({"type": "room_counts", "rooms": [], "total": 0}),
            ]
        );

        // A burst: one frame for all of it.
        for i in 0..500 {
            l.room_created(&format!("r{i:03}"));
        }
        l.room_closed("a");
        l.flush(no_rooms);
        let v = payload(&j.rx.try_recv().unwrap().frame);
        assert_eq!(v["type"], "rooms_changed");
        assert_eq!(v["created"].as_array().unwrap().len(), 500);
        assert_eq!(v["created"][0], "r000");
        assert_eq!(v["closed"], serde_json::json!(["a"]));
        assert!(v.get("truncated").is_none());
        assert_eq!(
            payload(&j.rx.try_recv().unwrap().frame)["type"],
            "room_counts"
        );
        assert!(j.rx.try_recv().is_err());

        // A quiet tick sends nothing.
        l.flush(no_rooms);
        assert!(j.rx.try_recv().is_err());
    }

    #[test]
    fn an_overflowing_tick_says_truncated() {
        let l = lobby();
        let user: Arc<str> = "w".into();
        let mut j = l.join(1, &user, None);
        l.flush(no_rooms);
        let _ = j.rx.try_recv();
        for i in 0..CHANGES_MAX + 5 {
            l.room_created(&format!("r{i}"));
        }
        l.flush(no_rooms);
        let v = payload(&j.rx.try_recv().unwrap().frame);
        assert_eq!(v["truncated"], true);
        assert_eq!(v["created"].as_array().unwrap().len(), CHANGES_MAX);
    }
}
