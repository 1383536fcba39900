//! The room registry: a sharded map from room name to `Room`. It owns the life of rooms: created
//! on first join, removed with the last leave. Both happen under the shard lock, so a joiner can
//! never land in a room that was just removed from the map.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::protocol::Outbound;
use crate::room::Room;
use crate::stats::Stats;

type Shard = Mutex<HashMap<Box<str>, Arc<Room>>>;

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Broadcast ring size of every new room (`--room-buffer`).
    room_buffer: usize,
    stats: Arc<Stats>,
    /// Rooms with joins or leaves not yet announced; drained by the presence task.
    presence_queue: Mutex<Vec<Arc<Room>>>,
}

/// What a successful join hands to the connection.
pub struct Joined {
    pub room: Arc<Room>,
    pub rx: broadcast::Receiver<Arc<Outbound>>,
    /// The `welcome` frame, to be written before anything from `rx`.
    pub welcome: Bytes,
}

impl Hub {
    pub fn new(shards: usize, room_buffer: usize, stats: Arc<Stats>) -> Self {
        let shards = shards.max(1).next_power_of_two();
        Hub {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            room_buffer: room_buffer.max(1),
            stats,
            presence_queue: Mutex::new(Vec::new()),
        }
    }

    fn shard(&self, name: &str) -> &Shard {
        let h = self.hasher.hash_one(name) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Adds member `id` named `user` to room `name`, creating the room if needed.
    /// The name must already be valid.
    pub fn join(&self, name: &str, id: u64, user: &Arc<str>) -> Joined {
        self.join_seeded(name, id, user, 0, 0)
    }

    /// `join` for cluster mode: a room created by this join starts after `seq` (the cluster's
    /// last seq of the room) instead of 0, knowing of `remote_members` on other processes.
    pub fn join_seeded(
        &self,
        name: &str,
        id: u64,
        user: &Arc<str>,
        seq: u64,
        remote_members: usize,
    ) -> Joined {
        let mut shard = self.shard(name).lock();
        let room = match shard.get(name) {
            Some(room) => room.clone(),
            None => {
                let room = Arc::new(Room::new(name, self.room_buffer, self.stats.clone(), seq));
                room.set_remote_members(remote_members);
                shard.insert(name.into(), room.clone());
                self.stats.rooms.inc();
                room
            }
        };
        let mut state = room.lock();
        let (rx, welcome) = room.add_member(&mut state, id, user);
        self.queue_presence(&room, &mut state);
        drop(state);
        drop(shard);
        Joined { room, rx, welcome }
    }

    /// Removes member `id` from `room`; the room leaves the map with its last member.
    /// Returns whether the member was there.
    pub fn leave(&self, room: &Arc<Room>, id: u64) -> bool {
        let mut shard = self.shard(room.name()).lock();
        let mut state = room.lock();
        if !room.remove_member(&mut state, id) {
            return false;
        }
        if state.members.is_empty() {
            // Only remove the map's entry if it is this very room (it always is while members
            // exist, since rooms are only replaced after removal; the check keeps that true).
            if shard.get(room.name()).is_some_and(|r| Arc::ptr_eq(r, room)) {
                shard.remove(room.name());
                self.stats.rooms.dec();
            }
        }
        // Queued even when the room just emptied: in cluster mode the other processes still
        // have to hear about the leave (standalone, the flush finds no member and sends nothing).
        self.queue_presence(room, &mut state);
        true
    }

    fn queue_presence(&self, room: &Arc<Room>, state: &mut crate::room::RoomState) {
        if !state.presence_queued && state.has_presence_pending() {
            state.presence_queued = true;
            self.presence_queue.lock().push(room.clone());
        }
    }

    /// Sends one coalesced presence frame for every room that changed since the last call.
    pub fn flush_presence(&self) {
        for room in self.take_presence_queue() {
            room.flush_presence();
        }
    }

    /// The rooms with joins or leaves not yet announced (cluster mode announces them through
    /// Redis instead of `flush_presence`).
    pub fn take_presence_queue(&self) -> Vec<Arc<Room>> {
        std::mem::take(&mut *self.presence_queue.lock())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.shard(name).lock().get(name).cloned()
    }

    /// Every room with its member count, largest first (ties by name), at most `limit`.
    pub fn list(&self, limit: usize) -> (Vec<(Arc<Room>, usize)>, usize) {
        let mut rooms: Vec<Arc<Room>> = Vec::new();
        for shard in self.shards.iter() {
            rooms.extend(shard.lock().values().cloned());
        }
        let total = rooms.len();
        let mut counted: Vec<(Arc<Room>, usize)> = rooms
            .into_iter()
            .map(|r| {
                let n = r.member_count();
                (r, n)
            })
            .collect();
        counted.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.name().cmp(b.0.name())));
        counted.truncate(limit);
        (counted, total)
    }

    pub fn room_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON payload of a server frame (skips the 2- or 4-byte header).
    fn payload(frame: &[u8]) -> serde_json::Value {
        let start = if frame[1] == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    fn hub() -> Hub {
        Hub::new(4, 16, Arc::new(Stats::new()))
    }

    #[test]
    fn rooms_live_exactly_as_long_as_their_members() {
        let hub = hub();
        let alice: Arc<str> = "alice".into();
        let a = hub.join("r", 1, &alice);
        let b = hub.join("r", 2, &alice);
        assert!(Arc::ptr_eq(&a.room, &b.room));
        assert_eq!(hub.room_count(), 1);
        assert!(hub.leave(&a.room, 1));
        assert!(!hub.leave(&a.room, 1), "second leave is a no-op");
        assert_eq!(hub.get("r").map(|r| r.member_count()), Some(1));
        assert!(hub.leave(&b.room, 2));
        assert!(hub.get("r").is_none());
        assert_eq!(hub.room_count(), 0);
        // A fresh join creates a fresh room.
        let c = hub.join("r", 3, &alice);
        assert!(!Arc::ptr_eq(&c.room, &a.room));
    }

    #[test]
    fn welcome_seq_is_the_last_seq_before_the_joiner() {
        let hub = hub();
        let u: Arc<str> = "u".into();
        let a = hub.join("r", 1, &u);
        assert_eq!(a.room.publish("u", "one", 1, false), 1);
        assert_eq!(a.room.publish("u", "two", 1, false), 2);
        let mut b = hub.join("r", 2, &u);
        let v: serde_json::Value = payload(&b.welcome);
        assert_eq!(v["seq"], 2);
        assert_eq!(v["members"], 2);
        a.room.publish("u", "three", 1, false);
        let first = b.rx.try_recv().unwrap();
        let v: serde_json::Value = payload(&first.frame);
        assert_eq!(v["seq"], 3, "the joiner's first frame follows its welcome");
    }

    #[test]
    fn a_seeded_room_starts_at_its_cluster_seq_and_drops_what_is_not_past_it() {
        let hub = hub();
        let u: Arc<str> = "u".into();
        let mut a = hub.join_seeded("r", 1, &u, 10, 4);
        let v = payload(&a.welcome);
        assert_eq!(v["seq"], 10);
        assert_eq!(v["members"], 5, "one here, four elsewhere");
        assert!(
            !a.room.deliver(10, "x", "old", 1, 0, false),
            "not past the welcome"
        );
        assert!(a.room.deliver(12, "x", "new", 1, 0, false));
        assert!(
            !a.room.deliver(11, "x", "late", 1, 0, false),
            "never backwards"
        );
        let v = payload(&a.rx.try_recv().unwrap().frame);
        assert_eq!(
            (v["seq"].as_u64(), v["text"].as_str()),
            (Some(12), Some("new"))
        );
        assert!(a.rx.try_recv().is_err());
        // Seeding only applies to a room the join creates.
        let b = hub.join_seeded("r", 2, &u, 99, 0);
        assert_eq!(payload(&b.welcome)["seq"], 12);
    }

    #[test]
    fn join_and_leave_race_never_strands_a_member() {
        // Many threads join and leave the same few rooms; afterwards every room in the map has
        // exactly the members that are still in, and empty rooms are gone.
        let hub = Arc::new(hub());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    let u: Arc<str> = "u".into();
                    for i in 0..2000u64 {
                        let id = t * 1_000_000 + i;
                        let name = format!("r{}", i % 3);
                        let j = hub.join(&name, id, &u);
                        assert!(hub.get(&name).is_some_and(|r| Arc::ptr_eq(&r, &j.room)));
                        assert!(hub.leave(&j.room, id));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.stats.rooms.get(), 0);
    }

    #[test]
    fn presence_is_coalesced_per_room() {
        let hub = hub();
        let mut joined = Vec::new();
        for id in 0..50u64 {
            let u: Arc<str> = format!("u{id}").into();
            joined.push(hub.join("r", id, &u));
        }
        hub.flush_presence();
        hub.flush_presence();
        let rx = &mut joined[0].rx;
        let f = rx.try_recv().unwrap();
        let v: serde_json::Value = payload(&f.frame);
        assert_eq!(v["type"], "presence");
        assert_eq!(v["members"], 50);
        assert_eq!(v["joined"].as_array().unwrap().len(), 50);
        assert!(rx.try_recv().is_err(), "one frame for fifty joins");
    }
}
