//! The room registry: a sharded map from room name to `Room`. It owns the life of rooms: created
//! on first join, removed with the last leave. Both happen under the shard lock, so a joiner can
//! never land in a room that was just removed from the map. Admission (password, member cap)
//! is decided under the same locks, and the `$lobby` is told of every room created and closed.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::config::rate::RateSpec;
use crate::config::rooms::{RoomSettings, Settings};
use crate::core::archive::{Prepared, Seeding};
use crate::core::auth::Grant;
use crate::core::coalesce::Coalescer;
use crate::core::history::HistoryService;
use crate::core::lobby::Lobby;
use crate::core::ring::History;
use crate::core::room::{Joined, Room};
use crate::core::stats::{AuthReason, Stats};
use crate::proto::ReplayRequest;
use crate::proto::{Epoch, Outbound};

type Shard = Mutex<HashMap<Box<str>, Arc<Room>>>;

/// Members a welcome lists without `--roster-limit`: the REST users page's default.
pub const DEFAULT_ROSTER_LIMIT: usize = 100;

pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Per-room settings (`--room-buffer`, `--rooms-config`); read when a room is created,
    /// replaced on reload.
    settings: RwLock<Arc<Settings>>,
    /// Publish limit of new rooms whose settings do not set `rate_limit` (`--room-rate-limit`).
    room_rate: Option<RateSpec>,
    /// History settings and archive, shared by every room.
    history: Arc<HistoryService>,
    stats: Arc<Stats>,
    /// Rooms with joins or leaves not yet announced; drained by the presence task.
    presence_queue: Mutex<Vec<Arc<Room>>>,
    /// Rooms held now, against `max_rooms` (`--max-rooms`).
    rooms: AtomicUsize,
    max_rooms: usize,
    /// `--roster-limit`: members a welcome lists at most.
    roster_limit: usize,
    lobby: Lobby,
    /// `--write-coalesce`: releases busy rooms' held batches; `None`: off.
    coalescer: Option<Coalescer>,
}

/// Why a join was refused. Nothing changed: no membership, no room created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("this room needs a password")]
    PasswordRequired,
    #[error("wrong password for this room")]
    WrongPassword,
    #[error("the room is full ({max} members)")]
    RoomFull { max: u32 },
    #[error("the server holds --max-rooms rooms ({max}): no new room can be created")]
    TooManyRooms { max: usize },
    /// The room's past read beforehand went stale (`Seeding::retry_if_stale`): prepare it
    /// again and retry. Never reaches a client: `Bus::join` retries, and its last try reads
    /// under the lock instead.
    #[error("the room's history changed while it was read; try again")]
    SeedStale,
    #[error("this direct-message room is only for the users its name lists")]
    NotAddressed,
}

impl JoinError {
    /// The error code clients see (HTTP 403 body or error frame).
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::PasswordRequired | JoinError::WrongPassword => "bad_password",
            JoinError::RoomFull { .. } => "room_full",
            JoinError::TooManyRooms { .. } => "max_rooms",
            JoinError::SeedStale => "internal",
            JoinError::NotAddressed => "forbidden_room",
        }
    }

    /// Whether the refusal is the server's capacity, not the room's rules (HTTP 503, not 403).
    pub fn is_capacity(&self) -> bool {
        matches!(self, JoinError::TooManyRooms { .. } | JoinError::SeedStale)
    }

    /// The `auth_refused` label of this refusal, when the access rules made it.
    pub fn auth_reason(&self) -> Option<AuthReason> {
        match self {
            JoinError::PasswordRequired | JoinError::WrongPassword => Some(AuthReason::BadPassword),
            JoinError::NotAddressed => Some(AuthReason::ForbiddenRoom),
            JoinError::RoomFull { .. } | JoinError::TooManyRooms { .. } | JoinError::SeedStale => {
                None
            }
        }
    }

    /// Whether this refusal could be a guess (a wrong password), which counts towards the
    /// failure lockout; a missing one is a client's mistake.
    pub fn is_guess(&self) -> bool {
        matches!(self, JoinError::WrongPassword)
    }
}

/// A request to join one chat room.
#[derive(Clone, Copy)]
pub struct JoinRequest<'a> {
    /// Already a valid, joinable name.
    pub name: &'a str,
    /// The connection id, also the member id.
    pub id: u64,
    pub user: &'a Arc<str>,
    pub password: Option<&'a str>,
    /// Past messages to write after the welcome (`history`/`since`).
    pub replay: Option<ReplayRequest>,
    /// The joiner's access token, when tokens are on: the `$lobby` shows only the rooms it
    /// covers. (Whether it allows the room itself is checked before a join gets here.)
    pub grant: Option<&'a Grant>,
}

/// Where a room created by a join starts. Standalone: the default (seq 0, nobody elsewhere,
/// nothing kept beyond its archive).
#[derive(Default)]
pub struct Start<'a> {
    /// The cluster's last seq of the room: the room numbers after it.
    pub seq: u64,
    /// Members on other processes.
    pub remote_members: usize,
    /// What Redis kept of the room, oldest first: the end of its history ring.
    pub kept: &'a [Arc<Outbound>],
    /// The room's past, read from the archive before any lock was taken (`seed_job`).
    pub seeding: Seeding,
    /// The cluster's epoch of the room (its seqs count in it), rather than the archive's or a
    /// fresh one.
    pub epoch: Option<Epoch>,
}

/// Whether a joiner may enter a room with `settings` that has `members` now. The password is
/// checked first, so a full room tells nothing to someone without it.
fn admit(settings: &RoomSettings, members: usize, password: Option<&str>) -> Result<(), JoinError> {
    if let Some(expected) = &settings.password {
        match password {
            None => return Err(JoinError::PasswordRequired),
            Some(given) if !expected.matches(given) => return Err(JoinError::WrongPassword),
            Some(_) => {}
        }
    }
    match settings.max_members {
        Some(max) if members >= max as usize => Err(JoinError::RoomFull { max }),
        _ => Ok(()),
    }
}

impl Hub {
    /// A hub whose rooms all get `room_buffer` and no restriction (no settings file), and keep
    /// no history.
    pub fn new(shards: usize, room_buffer: usize, stats: Arc<Stats>) -> Self {
        Self::with_settings(
            shards,
            Settings::from_flags(room_buffer),
            crate::core::lobby::DEFAULT_TOP,
            stats,
        )
    }

    /// A hub with per-room `settings`, whose lobby lists the `lobby_top` busiest rooms.
    pub fn with_settings(
        shards: usize,
        settings: Settings,
        lobby_top: usize,
        stats: Arc<Stats>,
    ) -> Self {
        let shards = shards.max(1).next_power_of_two();
        Hub {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            settings: RwLock::new(Arc::new(settings)),
            room_rate: None,
            history: Arc::new(HistoryService::disabled()),
            lobby: Lobby::new(lobby_top, stats.clone()),
            stats,
            presence_queue: Mutex::new(Vec::new()),
            rooms: AtomicUsize::new(0),
            max_rooms: usize::MAX,
            coalescer: None,
            roster_limit: DEFAULT_ROSTER_LIMIT,
        }
    }

    /// Sets how many members a welcome lists at most (`--roster-limit`; 0: none).
    pub fn with_roster_limit(mut self, limit: usize) -> Self {
        self.roster_limit = limit;
        self
    }

    /// Caps the rooms held at once (`--max-rooms`).
    pub fn with_max_rooms(mut self, max: usize) -> Self {
        self.max_rooms = max;
        self
    }

    /// Coalesces the messages of rooms created from now on when they are busy
    /// (`--write-coalesce`).
    pub fn with_coalescer(mut self, coalescer: Option<Coalescer>) -> Self {
        self.coalescer = coalescer;
        self
    }

    /// Sets the publish limit of rooms created from now on whose settings do not set one.
    pub fn with_room_rate(mut self, spec: Option<RateSpec>) -> Self {
        self.room_rate = spec;
        self
    }

    /// Gives rooms created from now on history (their ring holds the resolved per-room
    /// `history` setting, `--history` where the settings leave it unset) and the archive.
    pub fn with_history(mut self, history: Arc<HistoryService>) -> Self {
        self.history = history;
        self
    }

    pub fn history(&self) -> &Arc<HistoryService> {
        &self.history
    }

    fn shard(&self, name: &str) -> &Shard {
        let h = self.hasher.hash_one(name) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Adds a member to a chat room (never `$lobby`: see `lobby()`), creating the room if
    /// needed, if the password and the room's member cap allow, and takes the past messages
    /// `req.replay` asks for, atomically with the subscription (no gap, no duplicate between
    /// them and live messages). The name must already be valid. The checks and the membership
    /// happen under the shard and room locks: two joiners can never both take a room's last
    /// place. A refused join creates nothing and replays nothing. A room this join creates
    /// starts as `start` says (cluster mode: where the cluster already is).
    pub fn join(&self, req: &JoinRequest<'_>, start: Start<'_>) -> Result<Joined, JoinError> {
        let name = req.name;
        let mut shard = self.shard(name).lock();
        let (room, created) = match shard.get(name) {
            Some(room) => (room.clone(), false),
            None => {
                let settings = self.settings.read().resolve(name);
                admit(&settings, 0, req.password)?;
                // No disk read under the shard lock: a past read beforehand that went stale
                // sends the join back to read it again.
                if start.seeding.retry_if_stale
                    && self.history.needs_read(
                        name,
                        self.capacity(&settings),
                        start.seeding.prepared.as_ref(),
                    )
                {
                    return Err(JoinError::SeedStale);
                }
                // Under the shard lock: a refused join creates nothing. Exact across shards:
                // the count is taken before the room exists and given back if refused.
                if self.rooms.fetch_add(1, Ordering::Relaxed) >= self.max_rooms {
                    self.rooms.fetch_sub(1, Ordering::Relaxed);
                    self.stats.rooms_refused.inc();
                    return Err(JoinError::TooManyRooms {
                        max: self.max_rooms,
                    });
                }
                let settings_private = settings.is_private();
                let room = self.create_room(
                    name,
                    settings,
                    start.seq,
                    start.kept,
                    start.seeding.prepared,
                    start.epoch,
                );
                room.set_remote_members(start.remote_members);
                shard.insert(name.into(), room.clone());
                self.stats.rooms.inc();
                self.lobby.room_created(name, settings_private);
                (room, true)
            }
        };
        let mut state = room.lock();
        if !created {
            admit(&state.settings, state.members.len(), req.password)?;
        }
        let (rx, welcome, replay) =
            room.add_member(&mut state, req.id, req.user, req.replay, self.roster_limit);
        let last_seq = state.seq();
        self.queue_presence(&room, &mut state);
        drop(state);
        drop(shard);
        self.lobby.counts_changed();
        Ok(Joined {
            room,
            rx,
            welcome,
            replay,
            last_seq,
        })
    }

    /// The `$lobby`, which is not in the registry.
    pub fn lobby(&self) -> &Lobby {
        &self.lobby
    }

    /// A new room with `settings`, continuing from its archived past (then `kept`, cluster mode)
    /// and starting after `seq` at least. Its history ring holds `settings.history` messages, or `--history` where the
    /// settings leave it unset. Called under the shard lock, so it never races the same room's
    /// `retire`.
    fn create_room(
        &self,
        name: &str,
        settings: RoomSettings,
        seq: u64,
        kept: &[Arc<Outbound>],
        prepared: Option<Prepared>,
        epoch: Option<Epoch>,
    ) -> Arc<Room> {
        let capacity = self.capacity(&settings);
        let max_bytes = settings
            .history_bytes
            .map_or(self.history.settings().room_bytes, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            });
        let mut seed = self.history.new_room(name, capacity, max_bytes, prepared);
        seed.history = seed.history.followed_by(kept);
        if let Some(epoch) = epoch {
            seed.epoch = epoch;
        }
        let limiter = crate::core::limit::room_limiter(settings.rate_limit, self.room_rate);
        let coalesce = self.coalescer.as_ref().map(|c| c.shared().clone());
        let room = Room::new(
            name,
            settings,
            seed,
            self.history.clone(),
            self.stats.clone(),
        )
        .with_limiter(limiter)
        .with_seq(seq);
        Arc::new_cyclic(|me| room.with_coalesce(coalesce, me.clone()))
    }

    /// Messages a room with `settings` keeps.
    fn capacity(&self, settings: &RoomSettings) -> usize {
        settings
            .history
            .map_or(self.history.settings().capacity, |n| n as usize)
    }

    /// The blocking read that prepares room `name`'s creation from the archive (its last seq
    /// and messages), to run off the runtime threads and before any lock: `None` when there
    /// is no archive or the room is already live. Its result goes in `Start::prepared`; a read
    /// that went stale meanwhile is done again under the lock (see `Archive::seed`).
    pub fn seed_job(
        &self,
        name: &str,
    ) -> Option<impl FnOnce() -> Option<Prepared> + Send + 'static> {
        self.history.archive()?;
        if self.get(name).is_some() {
            return None;
        }
        let capacity = self.capacity(&self.settings.read().resolve(name));
        let history = self.history.clone();
        let name = name.to_owned();
        Some(move || history.archive().map(|a| a.prepare(&name, capacity)))
    }

    /// Removes member `id` from chat room `room`; the room leaves the map with its last member.
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
                self.rooms.fetch_sub(1, Ordering::Relaxed);
                state.retired = true;
                // Nobody is left to receive them (they are kept in history already).
                room.release_held(&mut state);
                let history = std::mem::replace(&mut state.history, History::new(0));
                self.history
                    .retire(room.name_arc(), state.seq(), state.epoch(), history);
                self.lobby
                    .room_closed(room.name(), state.settings.is_private());
            }
        }
        // Queued even when the room just emptied: in cluster mode the other processes still
        // have to hear about the leave (standalone, the flush finds no member and sends nothing).
        self.queue_presence(room, &mut state);
        drop(state);
        drop(shard);
        self.lobby.counts_changed();
        true
    }

    /// Puts new settings in force: rooms created from now on get them whole; every existing
    /// room takes its new password, cap and presence mode now (its broadcast and history rings
    /// keep their sizes until the room closes).
    pub fn reload(&self, settings: Settings) {
        let settings = Arc::new(settings);
        // Swap first: a room created while the loop below runs either reads the new settings or
        // sits in a shard the loop has yet to visit.
        *self.settings.write() = settings.clone();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (name, room) in shard.iter() {
                room.lock().settings = settings.resolve(name);
            }
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    /// Sends the lobby's coalesced frames for this tick (nothing when nobody is in it).
    pub fn flush_lobby(&self) {
        let settings = self.settings();
        self.lobby.flush(
            || {
                let (mut rooms, _) = self.list(usize::MAX);
                rooms.retain(|(room, _)| !settings.is_private(room.name()));
                rooms
            },
            |room| settings.has_password(room),
        );
    }

    fn queue_presence(&self, room: &Arc<Room>, state: &mut crate::core::room::RoomState) {
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

    fn join_replay(
        hub: &Hub,
        name: &str,
        id: u64,
        user: &Arc<str>,
        password: Option<&str>,
        replay: Option<ReplayRequest>,
    ) -> Result<Joined, JoinError> {
        let req = JoinRequest {
            name,
            id,
            user,
            password,
            replay,
            grant: None,
        };
        hub.join(&req, Start::default())
    }

    fn join(
        hub: &Hub,
        name: &str,
        id: u64,
        user: &Arc<str>,
        password: Option<&str>,
    ) -> Result<Joined, JoinError> {
        join_replay(hub, name, id, user, password, None)
    }

    /// A join that creates `name` after `seq` (cluster mode).
    fn seeded(
        hub: &Hub,
        name: &str,
        id: u64,
        user: &Arc<str>,
        seq: u64,
    ) -> Result<Joined, JoinError> {
        let req = JoinRequest {
            name,
            id,
            user,
            password: None,
            replay: None,
            grant: None,
        };
        let start = Start {
            seq,
            ..Start::default()
        };
        hub.join(&req, start)
    }

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
        let a = join(&hub, "r", 1, &alice, None).unwrap();
        let b = join(&hub, "r", 2, &alice, None).unwrap();
        assert!(Arc::ptr_eq(&a.room, &b.room));
        assert_eq!(hub.room_count(), 1);
        assert!(hub.leave(&a.room, 1));
        assert!(!hub.leave(&a.room, 1), "second leave is a no-op");
        assert_eq!(hub.get("r").map(|r| r.member_count()), Some(1));
        assert!(hub.leave(&b.room, 2));
        assert!(hub.get("r").is_none());
        assert_eq!(hub.room_count(), 0);
        // A fresh join creates a fresh room.
        let c = join(&hub, "r", 3, &alice, None).unwrap();
        assert!(!Arc::ptr_eq(&c.room, &a.room));
    }

    #[test]
    fn welcome_seq_is_the_last_seq_before_the_joiner() {
        let hub = hub();
        let u: Arc<str> = "u".into();
        let a = join(&hub, "r", 1, &u, None).unwrap();
        assert_eq!(a.room.publish("u", "one", 1, false), 1);
        assert_eq!(a.room.publish("u", "two", 1, false), 2);
        let mut b = join(&hub, "r", 2, &u, None).unwrap();
        let v: serde_json::Value = payload(&b.welcome.encode());
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
        let msg = |text| crate::core::room::Publish {
            user: "x",
            text,
            id: None,
            author: crate::core::dedupe::Author::Api,
            origin: 0,
            skip_origin: false,
        };
        let req = JoinRequest {
            name: "r",
            id: 1,
            user: &u,
            password: None,
            replay: None,
            grant: None,
        };
        let start = Start {
            seq: 10,
            remote_members: 4,
            ..Start::default()
        };
        let mut a = hub.join(&req, start).unwrap();
        let v = payload(&a.welcome.encode());
        assert_eq!(v["seq"], 10);
        assert_eq!(v["members"], 5, "one here, four elsewhere");
        assert!(!a.room.deliver(10, 1, &msg("old")), "not past the welcome");
        assert!(a.room.deliver(12, 1, &msg("new")));
        assert!(!a.room.deliver(11, 1, &msg("late")), "never backwards");
        let v = payload(&a.rx.try_recv().unwrap().frame);
        assert_eq!(
            (v["seq"].as_u64(), v["text"].as_str()),
            (Some(12), Some("new"))
        );
        assert!(a.rx.try_recv().is_err());
        // Seeding only applies to a room the join creates.
        let b = seeded(&hub, "r", 2, &u, 99).unwrap();
        assert_eq!(payload(&b.welcome.encode())["seq"], 12);
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
                        let j = join(&hub, &name, id, &u, None).unwrap();
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

    fn hub_with(file: &str) -> Hub {
        let settings = Settings::parse(file, "test.toml", 16).unwrap();
        Hub::with_settings(4, settings, 50, Arc::new(Stats::new()))
    }

    #[test]
    fn racing_joiners_never_exceed_the_member_cap() {
        let hub = Arc::new(hub_with("[rooms.capped]\nmax_members = 5\n"));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    let u: Arc<str> = "u".into();
                    let mut kept = Vec::new();
                    for i in 0..200u64 {
                        match join(&hub, "capped", t * 1000 + i, &u, None) {
                            Ok(j) => kept.push(j),
                            Err(e) => assert_eq!(e, JoinError::RoomFull { max: 5 }),
                        }
                    }
                    kept
                })
            })
            .collect();
        let joined: Vec<Joined> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(joined.len(), 5, "exactly the cap got in");
        assert_eq!(hub.get("capped").unwrap().member_count(), 5);
        // One leaves: exactly one more place.
        let room = &joined[0].room;
        let id = room.users_page(None, 1)[0].id;
        assert!(hub.leave(room, id));
        let u: Arc<str> = "late".into();
        assert!(join(&hub, "capped", 9_999, &u, None).is_ok());
        assert!(join(&hub, "capped", 10_000, &u, None).is_err());
    }

    #[test]
    fn a_refused_join_creates_nothing() {
        let hub = hub_with("[rooms.\"vip:*\"]\npassword = \"pw\"\nmax_members = 1\n");
        let u: Arc<str> = "u".into();
        assert_eq!(
            join(&hub, "vip:1", 1, &u, None).err(),
            Some(JoinError::PasswordRequired)
        );
        assert_eq!(
            join(&hub, "vip:1", 1, &u, Some("PW")).err(),
            Some(JoinError::WrongPassword)
        );
        assert_eq!(
            hub.room_count(),
            0,
            "no room was created for a refused join"
        );
        let a = join(&hub, "vip:1", 1, &u, Some("pw")).unwrap();
        // Full, but the password is checked first.
        assert_eq!(
            join(&hub, "vip:1", 2, &u, Some("x")).err(),
            Some(JoinError::WrongPassword)
        );
        assert_eq!(
            join(&hub, "vip:1", 2, &u, Some("pw")).err(),
            Some(JoinError::RoomFull { max: 1 })
        );
        assert_eq!(JoinError::WrongPassword.code(), "bad_password");
        assert_eq!(JoinError::RoomFull { max: 1 }.code(), "room_full");
        let info = a.room.info();
        assert!(info.password_protected);
        assert_eq!(info.max_members, Some(1));
        assert!(
            join(&hub, "open", 3, &u, None).is_ok(),
            "other rooms are open"
        );
    }

    #[test]
    fn reload_reaches_existing_rooms_and_new_ones() {
        let hub = hub_with("[rooms.a]\nmax_members = 1\n");
        let u: Arc<str> = "u".into();
        let a = join(&hub, "a", 1, &u, None).unwrap();
        assert!(join(&hub, "a", 2, &u, None).is_err());
        hub.reload(
            Settings::parse(
                "[defaults]\nroom_buffer = 3\n[rooms.a]\npassword = \"p\"\n",
                "t",
                16,
            )
            .unwrap(),
        );
        assert_eq!(
            join(&hub, "a", 2, &u, None).err(),
            Some(JoinError::PasswordRequired),
            "the cap is gone and the password is in force for the live room"
        );
        assert!(join(&hub, "a", 2, &u, Some("p")).is_ok());
        assert_eq!(a.room.info().max_members, None);
        assert_eq!(hub.settings().resolve("b").room_buffer, 3);
    }

    #[test]
    fn room_buffer_sizes_new_rooms_and_a_reload_leaves_live_rings_alone() {
        use tokio::sync::broadcast::error::TryRecvError;
        let hub = hub_with("[rooms.\"tiny:*\"]\nroom_buffer = 2\n");
        let u: Arc<str> = "u".into();
        let lags_after = |j: &mut Joined, n: u64| {
            for i in 0..n {
                j.room.publish("u", &format!("m{i}"), 0, false);
            }
            matches!(j.rx.try_recv(), Err(TryRecvError::Lagged(_)))
        };
        let mut tiny = join(&hub, "tiny:1", 1, &u, None).unwrap();
        assert!(lags_after(&mut tiny, 3), "a 2-frame ring overflows at 3");
        let mut other = join(&hub, "other", 2, &u, None).unwrap();
        assert!(!lags_after(&mut other, 3), "the flag's 16 frames elsewhere");

        hub.reload(Settings::parse("[rooms.\"tiny:*\"]\nroom_buffer = 64\n", "t", 16).unwrap());
        let mut live = join(&hub, "tiny:1", 3, &u, None).unwrap();
        assert!(lags_after(&mut live, 3), "the live room keeps its ring");
        let mut fresh = join(&hub, "tiny:2", 4, &u, None).unwrap();
        assert!(
            !lags_after(&mut fresh, 40),
            "a room created after the reload gets 64"
        );
    }

    #[test]
    fn the_lobby_is_not_a_room() {
        let hub = hub();
        let u: Arc<str> = "u".into();
        let mut l = hub
            .lobby()
            .join(1, &u, None, &crate::core::auth::Scope::all());
        assert_eq!(
            payload(&l.welcome.encode())["room"],
            crate::proto::names::LOBBY
        );
        assert_eq!(hub.room_count(), 0);
        assert!(hub.get(crate::proto::names::LOBBY).is_none());
        assert_eq!(hub.stats.rooms.get(), 0);
        let r = join(&hub, "r", 2, &u, None).unwrap();
        hub.flush_lobby();
        assert_eq!(
            payload(&l.rx.try_recv().unwrap().frame),
            serde_json::json!({"type": "room_created", "room": "r"})
        );
        let counts = payload(&l.rx.try_recv().unwrap().frame);
        assert_eq!(
            counts,
            serde_json::json!({"type": "room_counts", "rooms": [{"room": "r", "members": 1}], "total": 1})
        );
        assert!(hub.leave(&r.room, 2));
        hub.flush_lobby();
        assert_eq!(
            payload(&l.rx.try_recv().unwrap().frame),
            serde_json::json!({"type": "room_closed", "room": "r"})
        );
        assert!(hub.lobby().leave(&l.room, 1));
        assert!(!hub.lobby().leave(&l.room, 1));
    }

    /// A listed room that needs a password says so in every lobby frame that names it, so a
    /// page that learns the room from the lobby marks it as `GET /api/rooms` does.
    #[test]
    fn the_lobby_marks_rooms_that_need_a_password() {
        let hub = hub_with("[rooms.club]\npassword = \"pw\"\nprivate = false\n");
        let u: Arc<str> = "u".into();
        let mut l = hub
            .lobby()
            .join(1, &u, None, &crate::core::auth::Scope::all());
        let _club = join(&hub, "club", 2, &u, Some("pw")).unwrap();
        let _open = join(&hub, "open", 3, &u, None).unwrap();
        hub.flush_lobby();
        let frames: Vec<_> = std::iter::from_fn(|| l.rx.try_recv().ok())
            .map(|o| payload(&o.frame))
            .collect();
        assert_eq!(
            frames,
            vec![
                serde_json::json!({"type": "room_created", "room": "club", "password_protected": true}),
                serde_json::json!({"type": "room_created", "room": "open"}),
                serde_json::json!({"type": "room_counts", "rooms": [
                    {"room": "club", "members": 1, "password_protected": true},
                    {"room": "open", "members": 1},
                ], "total": 2}),
            ]
        );
        // A burst (more than four changes in a tick) lists the locked ones beside `created`.
        let hub2 = hub_with("[rooms.\"vault:*\"]\npassword = \"pw\"\nprivate = false\n");
        let mut l2 = hub2
            .lobby()
            .join(1, &u, None, &crate::core::auth::Scope::all());
        let _kept: Vec<_> = (0..3u64)
            .map(|i| join(&hub2, &format!("vault:{i}"), 2 + i, &u, Some("pw")).unwrap())
            .chain((0..3u64).map(|i| join(&hub2, &format!("hall{i}"), 9 + i, &u, None).unwrap()))
            .collect();
        hub2.flush_lobby();
        let v = payload(&l2.rx.try_recv().unwrap().frame);
        assert_eq!(v["type"], "rooms_changed", "{v}");
        assert_eq!(
            v["password_protected"],
            serde_json::json!(["vault:0", "vault:1", "vault:2"]),
            "{v}"
        );
        assert_eq!(v["created"].as_array().map(Vec::len), Some(6), "{v}");
    }

    #[test]
    fn presence_is_coalesced_per_room() {
        let hub = hub();
        let mut joined = Vec::new();
        for id in 0..50u64 {
            let u: Arc<str> = format!("u{id}").into();
            joined.push(join(&hub, "r", id, &u, None).unwrap());
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

    #[test]
    fn replay_and_live_frames_meet_exactly_under_concurrent_publishing() {
        use crate::core::history::HistorySettings;
        use crate::proto::ReplayRequest;
        let stats = Arc::new(Stats::new());
        let settings = HistorySettings {
            capacity: 100_000,
            ..HistorySettings::default()
        };
        let service = Arc::new(HistoryService::new(settings, stats.clone()).unwrap());
        let hub = Arc::new(Hub::new(4, 1 << 16, stats).with_history(service));
        let u: Arc<str> = "u".into();
        let anchor = join(&hub, "r", 1, &u, None).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publishers: Vec<_> = (0..2)
            .map(|_| {
                let room = anchor.room.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        room.publish("p", "x", 0, false);
                    }
                })
            })
            .collect();
        for id in 2..200u64 {
            // Some messages back: well inside the ring, and more arrive during the join.
            let since = anchor.room.last_seq().saturating_sub(20);
            let mut j = join_replay(
                &hub,
                "r",
                id,
                &u,
                None,
                Some(ReplayRequest::Since(since, None)),
            )
            .unwrap();
            let replay = j.replay.take().unwrap();
            let mut expect = since + 1;
            for f in &replay.frames {
                assert_eq!(f.seq, expect, "replay is gapless");
                expect += 1;
            }
            assert_eq!(expect, j.last_seq + 1, "replay ends at the welcome's seq");
            // The first live message is the one right after.
            loop {
                match j.rx.try_recv() {
                    Ok(out) if out.seq == 0 => continue,
                    Ok(out) => {
                        assert_eq!(out.seq, expect, "live starts right after the replay");
                        break;
                    }
                    Err(_) => std::thread::yield_now(),
                }
            }
            hub.leave(&j.room, id);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for p in publishers {
            p.join().unwrap();
        }
    }

    #[test]
    fn history_depth_comes_from_the_room_settings_then_the_flag() {
        use crate::core::history::HistorySettings;
        use crate::proto::ReplayRequest;
        let stats = Arc::new(Stats::new());
        let flag = HistorySettings {
            capacity: 3,
            ..HistorySettings::default()
        };
        let service = Arc::new(HistoryService::new(flag, stats.clone()).unwrap());
        let settings = Settings::parse(
            "[rooms.\"deep:*\"]\nhistory = 10\n[rooms.off]\nhistory = 0\n",
            "t",
            16,
        )
        .unwrap();
        let hub = Hub::with_settings(4, settings, 50, stats).with_history(service);
        let u: Arc<str> = "u".into();
        let kept = |name: &str| {
            let a = join(&hub, name, 1, &u, None).unwrap();
            for i in 0..20 {
                a.room.publish("u", &format!("m{i}"), 1, false);
            }
            let b = join_replay(&hub, name, 2, &u, None, Some(ReplayRequest::Last(100))).unwrap();
            let n = b.replay.map(|r| r.frames.len());
            hub.leave(&a.room, 1);
            hub.leave(&b.room, 2);
            n
        };
        assert_eq!(kept("deep:1"), Some(10), "the file's depth");
        assert_eq!(
            kept("off"),
            Some(0),
            "history = 0 turns it off for that room"
        );
        assert_eq!(kept("plain"), Some(3), "unset: the --history flag");
    }

    #[test]
    fn a_refused_join_replays_nothing_and_a_password_join_replays() {
        use crate::core::history::HistorySettings;
        use crate::proto::ReplayRequest;
        let stats = Arc::new(Stats::new());
        let flag = HistorySettings {
            capacity: 10,
            ..HistorySettings::default()
        };
        let service = Arc::new(HistoryService::new(flag, stats.clone()).unwrap());
        let settings = Settings::parse("[rooms.vip]\npassword = \"pw\"\n", "t", 16).unwrap();
        let hub = Hub::with_settings(4, settings, 50, stats).with_history(service);
        let u: Arc<str> = "u".into();
        let a = join(&hub, "vip", 1, &u, Some("pw")).unwrap();
        a.room.publish("u", "secret", 1, false);
        let since = Some(ReplayRequest::Since(0, None));
        assert_eq!(
            join_replay(&hub, "vip", 2, &u, Some("no"), since).err(),
            Some(JoinError::WrongPassword)
        );
        let b = join_replay(&hub, "vip", 2, &u, Some("pw"), since).unwrap();
        assert_eq!(b.replay.map(|r| r.frames.len()), Some(1));
    }

    #[test]
    fn delivered_messages_are_kept_and_their_ids_remembered() {
        use crate::core::history::HistorySettings;
        use crate::proto::ReplayRequest;
        use std::time::Duration;
        let stats = Arc::new(Stats::new());
        let flag = HistorySettings {
            capacity: 10,
            dedupe_window: Duration::from_secs(60),
            dedupe_max: 100,
            ..HistorySettings::default()
        };
        let service = Arc::new(HistoryService::new(flag, stats.clone()).unwrap());
        let hub = Hub::new(4, 16, stats).with_history(service);
        let u: Arc<str> = "u".into();
        let a = seeded(&hub, "r", 1, &u, 40).unwrap();
        for (seq, id) in [(41, "k1"), (43, "k3")] {
            let p = crate::core::room::Publish {
                user: "far",
                text: "from another process",
                id: Some(id),
                author: crate::core::dedupe::Author::Key("u:far"),
                origin: 0,
                skip_origin: false,
            };
            assert!(a.room.deliver(seq, 1, &p));
        }
        let retry = |id| crate::core::room::Publish {
            user: "far",
            text: "again",
            id: Some(id),
            author: crate::core::dedupe::Author::User("far"),
            origin: 0,
            skip_origin: false,
        };
        assert_eq!(a.room.duplicate_of(&retry("k3")), Some(43));
        assert_eq!(a.room.duplicate_of(&retry("k2")), None);
        let someone_else = crate::core::room::Publish {
            author: crate::core::dedupe::Author::User("near"),
            ..retry("k3")
        };
        assert_eq!(a.room.duplicate_of(&someone_else), None);
        let b = join_replay(&hub, "r", 2, &u, None, Some(ReplayRequest::Since(40, None))).unwrap();
        let replay = b.replay.unwrap();
        let seqs: Vec<u64> = replay.frames.iter().map(|o| o.seq).collect();
        assert_eq!(seqs, [41, 43]);
        assert_eq!(
            payload(&replay.header)["complete"],
            false,
            "seq 42 never reached this process"
        );
        assert_eq!(payload(&replay.frames[1].frame)["id"], "k3");
    }

    #[test]
    fn a_publish_that_finds_the_room_as_its_last_member_leaves_numbers_nothing() {
        let hub = hub();
        let u: Arc<str> = "u".into();
        let a = join(&hub, "r", 1, &u, None).unwrap();
        assert_eq!(a.room.publish("u", "one", 1, false), 1);
        // A REST publish looked the room up; then its last member leaves.
        let found = hub.get("r").unwrap();
        hub.leave(&a.room, 1);
        let p = crate::core::room::Publish {
            user: "api",
            text: "late",
            id: None,
            author: crate::core::dedupe::Author::Api,
            origin: 0,
            skip_origin: false,
        };
        assert_eq!(found.publish_message(&p), None, "reaches nobody: no seq");
        assert!(found.is_closed());
        assert_eq!(found.last_seq(), 1, "the closed room numbered nothing more");
    }

    #[test]
    fn a_stale_read_of_a_rooms_past_sends_the_join_back_instead_of_reading_under_the_lock() {
        use crate::core::history::HistorySettings;
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::new());
        let flag = HistorySettings {
            capacity: 10,
            db: Some(dir.path().join("h.sqlite")),
            db_queue: 100,
            ..HistorySettings::default()
        };
        let service = Arc::new(HistoryService::new(flag, stats.clone()).unwrap());
        let hub = Hub::new(4, 16, stats.clone()).with_history(service);
        let u: Arc<str> = "u".into();
        let req = |id| JoinRequest {
            name: "r",
            id,
            user: &u,
            password: None,
            replay: None,
            grant: None,
        };
        let read = |hub: &Hub| Seeding {
            prepared: hub.seed_job("r").and_then(|job| job()),
            retry_if_stale: true,
        };
        // Read before the room lived once: this read goes stale below.
        let early = read(&hub);
        let fresh = read(&hub);
        let a = hub
            .join(
                &req(1),
                Start {
                    seeding: fresh,
                    ..Start::default()
                },
            )
            .unwrap();
        assert_eq!(a.room.publish("u", "one", 1, false), 1);
        hub.leave(&a.room, 1);
        // The retired room's ring stays in memory until the writer has it on disk and forgets
        // it; from then on a join reads the disk, and the early read no longer matches.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !hub.history.needs_read("r", 10, None) {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never caught up"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let stale = Start {
            seeding: early,
            ..Start::default()
        };
        assert!(matches!(
            hub.join(&req(2), stale),
            Err(JoinError::SeedStale)
        ));
        assert_eq!(hub.room_count(), 0, "a join sent back creates nothing");
        let b = hub
            .join(
                &req(3),
                Start {
                    seeding: read(&hub),
                    ..Start::default()
                },
            )
            .unwrap();
        assert_eq!(b.last_seq, 1, "numbering goes on after the room's past");
        assert_eq!(
            stats.history_db_locked_reads.get(),
            0,
            "nothing was read under the lock"
        );
    }

    #[test]
    fn a_welcome_lists_one_page_whatever_the_room_size() {
        let hub = Hub::new(4, 16, Arc::new(Stats::new())).with_roster_limit(100);
        let u: Arc<str> = "member".into();
        let mut kept = Vec::new();
        for id in 1..=10_000 {
            kept.push(join(&hub, "crowd", id, &u, None).unwrap());
        }
        let last = join(&hub, "crowd", 10_001, &"late".into(), None).unwrap();
        let frame = last.welcome.encode();
        let v = payload(&frame);
        let users = v["users"].as_array().unwrap();
        assert_eq!(users.len(), 100, "one page, not 10,001 names");
        assert_eq!(
            (&users[0]["id"], &users[99]["id"]),
            (&1.into(), &100.into())
        );
        assert_eq!(v["next_users_after"], 100);
        assert_eq!(v["members"], 10_001);
        assert!(frame.len() < 4_000, "{} bytes", frame.len());
        // A room whose presence names nobody lists nobody; nor does a limit of 0.
        let quiet = hub_with("[rooms.q]\npresence = \"counts\"\n");
        let v = payload(&join(&quiet, "q", 1, &u, None).unwrap().welcome.encode());
        assert!(v.get("users").is_none(), "{v}");
        let none = Hub::new(4, 16, Arc::new(Stats::new())).with_roster_limit(0);
        let v = payload(&join(&none, "r", 1, &u, None).unwrap().welcome.encode());
        assert!(v.get("users").is_none(), "{v}");
        // Other processes' members merge in by id, each id once.
        let small = Hub::new(4, 16, Arc::new(Stats::new())).with_roster_limit(2);
        let mut w = join(&small, "m", 5, &u, None).unwrap().welcome;
        let entry = |id: u64| crate::proto::UserEntry {
            id,
            user: "far".into(),
        };
        w.merge_users(vec![entry(9), entry(3), entry(5)]);
        let v = payload(&w.encode());
        let ids: Vec<u64> = v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [3, 5]);
        assert_eq!(v["next_users_after"], 5);
        w.set_partial();
        assert_eq!(payload(&w.encode())["users_partial"], true);
    }
}
