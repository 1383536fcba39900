//! `$lobby`: the server's read-only room of room events. It owns its own rooms (never in the
//! hub's map, so they are never listed, counted, created or closed), the changes noted since the
//! last tick, and whether the member counts moved. `Hub` feeds it; the lobby task flushes it
//! once per `TICK`.
//!
//! Coalescing: within one tick, a room created and closed again cancels out, and so does one
//! closed and created again. A tick with at most `SINGLE_EVENTS_MAX` changes sends them as
//! `room_created` / `room_closed` frames; a busier one sends one `rooms_changed` frame with both
//! lists. Then, if any count moved, one `room_counts` frame. So a ramp of any size costs at most
//! two frames per tick. With nobody in the lobby nothing is noted: each hook is one atomic load.
//!
//! Views: a member sees only the rooms its grant covers (`Scope`), and nobody sees a private
//! room. Members with the same scope share one view (one ring, frames encoded once per view per
//! tick); without tokens there is one view.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::rooms::{Presence, RoomSettings};
use crate::core::auth::Scope;
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

/// The lobby as the members of one scope see it.
struct View {
    room: Arc<Room>,
    members: usize,
}

/// A live room as the counts snapshot lists it: name and members.
pub type Counted = (Arc<Room>, usize);

/// A public room as `room_counts` lists it.
struct Listed {
    room: Arc<Room>,
    members: usize,
    password_protected: bool,
}

pub struct Lobby {
    views: Mutex<HashMap<Scope, View>>,
    /// Members of `$lobby`, every view together; zero turns every hook into a no-op.
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
        Lobby {
            views: Mutex::new(HashMap::new()),
            watchers: AtomicUsize::new(0),
            changes: Mutex::new(Changes::default()),
            counts_dirty: AtomicBool::new(false),
            top: top.max(1),
            stats,
        }
    }

    fn new_room(&self) -> Arc<Room> {
        let settings = RoomSettings {
            presence: Presence::Off,
            ..RoomSettings::from_flags(LOBBY_BUFFER)
        };
        Arc::new(Room::new(
            LOBBY,
            settings,
            Seed {
                last_seq: 0,
                epoch: crate::proto::Epoch::random(),
                history: History::new(0),
            },
            Arc::new(HistoryService::disabled()),
            self.stats.clone(),
        ))
    }

    /// Whether `room` is one of the lobby's own (no chat room can be called `$lobby`).
    pub fn is(&self, room: &Arc<Room>) -> bool {
        room.name() == LOBBY
    }

    pub fn top(&self) -> usize {
        self.top
    }

    fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Adds a member who sees the rooms `scope` covers. Its first `room_counts` comes with the
    /// next tick. The lobby keeps no history: a `replay` request gets an empty one.
    pub(crate) fn join(
        &self,
        id: u64,
        user: &Arc<str>,
        replay: Option<ReplayRequest>,
        scope: &Scope,
    ) -> Joined {
        let mut views = self.views.lock();
        let view = views.entry(scope.clone()).or_insert_with(|| View {
            room: self.new_room(),
            members: 0,
        });
        view.members += 1;
        let room = view.room.clone();
        let mut state = room.lock();
        // The lobby lists no members: its presence is off.
        let (rx, welcome, replay) = room.add_member(&mut state, id, user, replay, 0);
        let last_seq = state.seq();
        self.watchers.fetch_add(1, Ordering::Relaxed);
        self.counts_dirty.store(true, Ordering::Relaxed);
        drop(state);
        drop(views);
        Joined {
            room,
            rx,
            welcome,
            replay,
            last_seq,
        }
    }

    /// Removes member `id` from the lobby view `room`; the view goes with its last member.
    pub(crate) fn leave(&self, room: &Arc<Room>, id: u64) -> bool {
        let mut views = self.views.lock();
        let mut state = room.lock();
        let removed = room.remove_member(&mut state, id);
        drop(state);
        if removed {
            self.watchers.fetch_sub(1, Ordering::Relaxed);
            // Linear in the number of distinct scopes watching, and only on a lobby leave.
            let emptied = views.iter_mut().find_map(|(scope, view)| {
                if !Arc::ptr_eq(&view.room, room) {
                    return None;
                }
                view.members = view.members.saturating_sub(1);
                (view.members == 0).then(|| scope.clone())
            });
            if let Some(scope) = emptied {
                views.remove(&scope);
            }
        }
        removed
    }

    /// A room was created (called under its shard lock). Private rooms are never announced.
    pub(crate) fn room_created(&self, name: &str, private: bool) {
        if !private {
            self.note(name, Change::Created);
        }
    }

    /// A room was removed with its last member (called under its shard lock).
    pub(crate) fn room_closed(&self, name: &str, private: bool) {
        if !private {
            self.note(name, Change::Closed);
        }
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

    /// Sends this tick's frames to every view. `snapshot` lists the public rooms with their
    /// member counts, largest first; it is only called when a count moved. `password_protected`
    /// says which rooms need a password, as `GET /api/rooms` does: every frame that names such a
    /// room says so, so that a list built from the lobby marks it too.
    pub(crate) fn flush(
        &self,
        snapshot: impl FnOnce() -> Vec<Counted>,
        password_protected: impl Fn(&str) -> bool,
    ) {
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
        let locked: HashSet<&str> = changes
            .rooms
            .iter()
            .filter(|(name, change)| **change == Change::Created && password_protected(name))
            .map(|(name, _)| &**name)
            .collect();
        let counts: Option<Vec<Listed>> =
            self.counts_dirty.swap(false, Ordering::Relaxed).then(|| {
                snapshot()
                    .into_iter()
                    .map(|(room, members)| Listed {
                        password_protected: password_protected(room.name()),
                        room,
                        members,
                    })
                    .collect()
            });
        let views: Vec<(Scope, Arc<Room>)> = self
            .views
            .lock()
            .iter()
            .map(|(scope, view)| (scope.clone(), view.room.clone()))
            .collect();
        for (scope, room) in &views {
            if !changes.rooms.is_empty() || changes.truncated {
                self.send_changes(room, scope, &changes, &locked);
            }
            if let Some(counts) = &counts {
                self.send_counts(room, scope, counts);
            }
        }
    }

    fn send_counts(&self, room: &Room, scope: &Scope, counts: &[Listed]) {
        let mut visible = counts.iter().filter(|l| scope.allows(l.room.name()));
        let rooms: Vec<RoomCount<'_>> = visible
            .by_ref()
            .take(self.top)
            .map(|l| RoomCount {
                room: l.room.name(),
                members: l.members,
                password_protected: l.password_protected,
            })
            .collect();
        let total = rooms.len() + visible.count();
        self.send(
            room,
            ServerFrame::RoomCounts {
                rooms: &rooms,
                total,
            },
        );
    }

    /// `locked`: the created rooms that need a password.
    fn send_changes(&self, room: &Room, scope: &Scope, changes: &Changes, locked: &HashSet<&str>) {
        let mut created: Vec<&str> = Vec::new();
        let mut closed: Vec<&str> = Vec::new();
        for (name, change) in changes.rooms.iter().filter(|(n, _)| scope.allows(n)) {
            match change {
                Change::Created => created.push(name),
                Change::Closed => closed.push(name),
            }
        }
        if created.is_empty() && closed.is_empty() && !changes.truncated {
            return;
        }
        created.sort_unstable();
        closed.sort_unstable();
        if !changes.truncated && created.len() + closed.len() <= SINGLE_EVENTS_MAX {
            for name in closed {
                self.send(room, ServerFrame::RoomClosed { room: name });
            }
            for name in created {
                self.send(
                    room,
                    ServerFrame::RoomCreated {
                        room: name,
                        password_protected: locked.contains(name),
                    },
                );
            }
            return;
        }
        let password_protected: Vec<&str> = created
            .iter()
            .copied()
            .filter(|name| locked.contains(name))
            .collect();
        self.send(
            room,
            ServerFrame::RoomsChanged {
                created: &created,
                password_protected: &password_protected,
                closed: &closed,
                truncated: changes.truncated,
            },
        );
    }

    fn send(&self, room: &Room, frame: ServerFrame<'_>) {
        self.stats.frames_encoded.inc();
        room.send_frame(frame.encode());
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

    fn no_rooms() -> Vec<Counted> {
        Vec::new()
    }

    #[test]
    fn nothing_is_noted_without_watchers() {
        let l = lobby();
        for i in 0..100 {
            l.room_created(&format!("r{i}"), false);
        }
        l.counts_changed();
        assert!(l.changes.lock().rooms.is_empty());
        assert!(!l.counts_dirty.load(Ordering::Relaxed));
        l.flush(|| panic!("no snapshot without watchers"), |_| false);
    }

    #[test]
    fn a_tick_coalesces_and_cancels() {
        let l = lobby();
        let user: Arc<str> = "w".into();
        let mut j = l.join(1, &user, None, &Scope::all());
        l.flush(no_rooms, |_| false); // the joiner's first room_counts
        assert_eq!(
            payload(&j.rx.try_recv().unwrap().frame)["type"],
            "room_counts"
        );

        // A few changes: single events, the exact shapes.
        l.room_created("a", false);
        l.room_created("b", false);
        l.room_closed("b", false); // created and closed in one tick: nothing
        l.room_closed("old", false);
        l.flush(no_rooms, |_| false);
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
            l.room_created(&format!("r{i:03}"), false);
        }
        l.room_closed("a", false);
        l.flush(no_rooms, |_| false);
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
        l.flush(no_rooms, |_| false);
        assert!(j.rx.try_recv().is_err());
    }

    #[test]
    fn an_overflowing_tick_says_truncated() {
        let l = lobby();
        let user: Arc<str> = "w".into();
        let mut j = l.join(1, &user, None, &Scope::all());
        l.flush(no_rooms, |_| false);
        let _ = j.rx.try_recv();
        for i in 0..CHANGES_MAX + 5 {
            l.room_created(&format!("r{i}"), false);
        }
        l.flush(no_rooms, |_| false);
        let v = payload(&j.rx.try_recv().unwrap().frame);
        assert_eq!(v["truncated"], true);
        assert_eq!(v["created"].as_array().unwrap().len(), CHANGES_MAX);
    }
}

#[cfg(test)]
mod views {
    use super::*;

    fn frames(j: &mut Joined) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| j.rx.try_recv().ok())
            .map(|o| {
                let f = &o.frame;
                serde_json::from_slice(&f[2..]).unwrap()
            })
            .collect()
    }

    #[test]
    fn each_scope_sees_its_rooms_and_nobody_sees_private_ones() {
        let stats = Arc::new(Stats::new());
        let l = Lobby::new(50, stats.clone());
        let user: Arc<str> = "w".into();
        let posts = Scope::of(["post:*", "$lobby"].into_iter());
        let mut all = l.join(1, &user, None, &Scope::all());
        let mut p1 = l.join(2, &user, None, &posts);
        let mut p2 = l.join(3, &user, None, &Scope::of(["$lobby", "post:*"].into_iter()));
        l.flush(Vec::new, |_| false);
        frames(&mut all);
        frames(&mut p1);
        frames(&mut p2);

        let encoded = stats.frames_encoded.get();
        l.room_created("post:1", false);
        l.room_created("general", false);
        l.room_created("post:secret", true);
        l.flush(Vec::new, |_| false);
        let everyone = frames(&mut all);
        assert!(everyone.contains(&serde_json::json!({"type": "room_created", "room": "general"})));
        assert!(everyone.contains(&serde_json::json!({"type": "room_created", "room": "post:1"})));
        assert!(!format!("{everyone:?}").contains("secret"), "{everyone:?}");
        let posters = frames(&mut p1);
        assert_eq!(
            posters[0],
            serde_json::json!({"type": "room_created", "room": "post:1"})
        );
        assert!(!format!("{posters:?}").contains("general"), "{posters:?}");
        assert_eq!(frames(&mut p2), posters, "one view for one scope");
        // Two views: the `all` one (2 created + counts) and the posts one (1 created + counts).
        assert_eq!(stats.frames_encoded.get() - encoded, 5);

        // The last member of a view takes it with them.
        assert!(l.leave(&p1.room, 2));
        assert!(l.leave(&p2.room, 3));
        assert_eq!(l.views.lock().len(), 1);
        assert!(!l.leave(&p2.room, 3));
    }
}
