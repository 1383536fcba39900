//! One room: its broadcast ring of pre-encoded frames, its members, its sequence and counters.
//! Membership changes go through `Hub` (which owns the create/remove race); publishing goes
//! straight here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use governor::DefaultDirectRateLimiter;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::config::rooms::{Presence, RoomSettings};
use crate::core::coalesce::{self, Held};
use crate::core::dedupe::{Author, Dedupe};
use crate::core::history::HistoryService;
use crate::core::ring::{History, Replay, Seed};
use crate::core::stats::{unix_millis, RateWindow, Stats, WaitHistogram};
use crate::proto::ReplayRequest;
pub use crate::proto::UserEntry;
use crate::proto::{self, Epoch, Ids, Names, Outbound, ServerFrame};

/// Most user names one presence frame lists per direction; the member count stays exact.
pub const PRESENCE_NAMES_MAX: usize = 100;

/// Slots a new room's broadcast ring starts with. Each slot costs about 40 bytes whether it is
/// used or not, so a full `--room-buffer` ring (1,024 by default) in every room would cost an
/// idle 100-member room 0.4 KiB per member; rings grow when a member falls behind instead.
const FIRST_RING: usize = 16;

/// The room's broadcast ring of frames for every member. It starts at `FIRST_RING` slots and
/// grows (four times, up to `--room-buffer`) as soon as some member is half a ring behind, so a
/// member is only ever overwritten, and so `Lagged` and evicted, once it falls `--room-buffer`
/// frames behind; the sender never waits for anyone.
struct Fanout {
    tx: broadcast::Sender<Arc<Outbound>>,
    /// Slots of `tx`'s ring (a power of two) and the most it may have (`--room-buffer`).
    slots: usize,
    max_slots: usize,
    /// Receivers of newer rings, subscribed for each member when its ring was replaced, taken
    /// in order each time the member reads a `moved` item from the ring it is on.
    moved: HashMap<u64, VecDeque<broadcast::Receiver<Arc<Outbound>>>>,
}

impl Fanout {
    fn new(max_slots: usize) -> Self {
        let max_slots = max_slots.max(1);
        let slots = FIRST_RING.min(max_slots).next_power_of_two();
        Fanout {
            tx: broadcast::channel(slots).0,
            slots,
            max_slots,
            moved: HashMap::new(),
        }
    }
}

pub struct Room {
    name: Arc<str>,
    /// Everything that must change together with the sequence: publishing holds this lock while
    /// it numbers, encodes and sends, so frames enter the ring in `seq` order, and joining holds
    /// it while it subscribes, so a joiner's `welcome.seq` is exactly the last seq it misses.
    state: Mutex<RoomState>,
    evicted: AtomicU64,
    /// Members of this room on other cluster processes, as last heard (cluster mode; always 0
    /// otherwise). Added to the local count in `welcome` and `presence` frames.
    remote_members: AtomicUsize,
    created_at_ms: u64,
    /// How long frames waited between publication and the write that carried them.
    wait: WaitHistogram,
    /// Where published messages are archived (and where the room's history goes when it
    /// leaves memory).
    history_service: Arc<HistoryService>,
    stats: Arc<Stats>,
    /// `--room-rate-limit`: publishes past it are refused before they are numbered.
    limiter: Option<DefaultDirectRateLimiter>,
    /// `--write-coalesce`, with this room's own handle for scheduling its batches; `None`: every
    /// message is sent as it is published.
    coalesce: Option<(Arc<coalesce::Shared>, Weak<Room>)>,
}

pub(crate) struct RoomState {
    /// Member id (the connection id) → user name. Ordered so the users list pages stably.
    pub(crate) members: BTreeMap<u64, Arc<str>>,
    /// Under the room lock: frames enter the ring in `seq` order, a joiner subscribes between two
    /// of them, and replacing the ring moves every member with nothing lost.
    fanout: Fanout,
    seq: u64,
    /// The incarnation `seq` counts in (see `proto::epoch`).
    epoch: Epoch,
    published: u64,
    /// Boxed and made at the first message: 960 bytes that a room nobody publishes in (most
    /// rooms of idle sockets) does not need.
    rate: Option<Box<RateWindow>>,
    /// Joins and leaves since the last presence frame.
    joined: Vec<UserEntry>,
    left: Vec<UserEntry>,
    /// Names were left out of `joined` or `left` (past `PRESENCE_NAMES_MAX`).
    presence_truncated: bool,
    /// Whether the room is already queued for the next presence flush.
    pub(crate) presence_queued: bool,
    /// The last messages, for joins with `history`/`since` and the paging API. Under this
    /// lock so that a joiner's replay and subscription happen between two publications.
    pub(crate) history: History,
    /// Recently published message ids (idempotent publishing).
    dedupe: Dedupe,
    /// The room left the registry: a late REST publish into it reaches nobody and is not kept.
    pub(crate) retired: bool,
    /// This room's settings (`--rooms-config`), replaced on reload. Under the room lock so a join
    /// checks password and cap against exactly the members it is added to.
    pub(crate) settings: RoomSettings,
    /// When the previous message was published: one less than a coalescing window before this
    /// one makes the room busy (see `core::coalesce`).
    last_message_at: Option<Instant>,
    /// Messages numbered and kept but not yet sent to the members (a busy room's batch), and
    /// when the batch started. Sent before anything else goes out or anyone subscribes, so
    /// members see every frame in order and a joiner's welcome `seq` stays exact.
    held: Vec<Arc<Outbound>>,
    held_since: Option<Instant>,
}

/// A chat message to publish.
#[derive(Clone, Copy)]
pub struct Publish<'a> {
    pub user: &'a str,
    pub text: &'a str,
    /// Idempotency key (already validated).
    pub id: Option<&'a str>,
    /// Whose `id` it is: ids are deduplicated per author, never across authors.
    pub author: Author<'a>,
    /// Connection that publishes it (0 for REST).
    pub origin: u64,
    /// The origin asked not to receive its own copy.
    pub skip_origin: bool,
}

/// The outcome of a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    /// The `id` was already published within the dedupe window: `seq` is the first copy's and
    /// nothing was broadcast.
    pub duplicate: bool,
}

/// Members that joined and left since the last presence frame.
#[derive(Debug, Default)]
pub struct PresenceDelta {
    /// Id 0 is an id an older process did not send: the frame then names without ids.
    pub joined: Vec<UserEntry>,
    pub left: Vec<UserEntry>,
    /// Some names were left out: the frame says so (`"truncated": true`).
    pub truncated: bool,
}

/// A point-in-time copy of a room's figures, for the HTTP API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomInfo {
    pub room: String,
    /// Members on every process.
    pub members: usize,
    /// Members on this process.
    pub local_members: usize,
    /// One page of the members of every process, by id.
    pub users: Vec<UserEntry>,
    pub next_users_after: Option<u64>,
    /// Cluster mode: the other processes' members could not be read; `users` are this
    /// process's only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub users_partial: bool,
    pub published: u64,
    pub evicted: u64,
    pub last_seq: u64,
    /// When this process created its copy of the room (Unix ms); `None` when it has none.
    pub created_at: Option<u64>,
    pub messages_per_sec: f64,
    pub p99_wait_ms: Option<f64>,
    /// Whether joining needs a password (the password itself is never shown).
    pub password_protected: bool,
    /// The member cap, `None` without one.
    pub max_members: Option<u32>,
}

/// What a successful join hands to the connection.
pub struct Joined {
    pub room: Arc<Room>,
    pub rx: broadcast::Receiver<Arc<Outbound>>,
    /// The `welcome` frame, to be written before anything from `rx`.
    pub welcome: Welcome,
    /// Past messages asked for, to be written after the welcome and before anything from `rx`.
    pub replay: Option<Replay>,
    /// The room's last seq at the join (the welcome's `seq`): live frames start after it.
    pub last_seq: u64,
}

/// A joiner's welcome, kept in parts until it is written: cluster mode adds the other
/// processes' members to `users` first (`merge_users`). Encoding it copies at most the roster
/// limit of names, whatever the size of the room.
#[derive(Debug, Clone)]
pub struct Welcome {
    room: Arc<str>,
    user: Arc<str>,
    members: usize,
    seq: u64,
    epoch: Epoch,
    /// The first members by id, at most `limit + 1` (one more than listed says there are more);
    /// `None`: the room shows no names (`presence` other than `events`, or a limit of 0).
    users: Option<Vec<UserEntry>>,
    limit: usize,
    /// Other processes' members could not be read: `users` are this process's only.
    partial: bool,
}

impl Welcome {
    /// Whether the welcome lists members (and so wants the other processes' too).
    pub fn lists_users(&self) -> bool {
        self.users.is_some()
    }

    /// The most members the welcome lists.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Adds members of other processes (ids unique across the cluster), keeping the first
    /// `limit + 1` by id; a repeated id is kept once.
    pub fn merge_users(&mut self, more: Vec<UserEntry>) {
        if let Some(users) = &mut self.users {
            merge_page(users, more, self.limit + 1);
        }
    }

    /// Says that the other processes' members are missing from `users`.
    pub fn set_partial(&mut self) {
        self.partial = self.users.is_some();
    }

    /// The complete WebSocket frame.
    pub fn encode(&self) -> Bytes {
        let (users, next_users_after) = match &self.users {
            Some(users) => {
                let shown = &users[..users.len().min(self.limit)];
                let next = (users.len() > self.limit)
                    .then(|| shown.last().map(|u| u.id))
                    .flatten();
                (Some(shown), next)
            }
            None => (None, None),
        };
        ServerFrame::Welcome {
            room: &self.room,
            user: &self.user,
            members: self.members,
            seq: self.seq,
            epoch: self.epoch,
            users,
            next_users_after,
            users_partial: self.partial,
        }
        .encode()
    }
}

/// Merges `more` into `page` (both by id), keeping the first `keep` and each id once.
pub fn merge_page(page: &mut Vec<UserEntry>, more: Vec<UserEntry>, keep: usize) {
    page.extend(more);
    page.sort_unstable_by_key(|u| u.id);
    page.dedup_by_key(|u| u.id);
    page.truncate(keep);
}

impl Room {
    /// A room whose broadcast ring holds `settings.room_buffer` frames, starting from `seed` (its
    /// last seq and its history ring, sized by the room's resolved `history` setting).
    pub(crate) fn new(
        name: &str,
        settings: RoomSettings,
        seed: Seed,
        history_service: Arc<HistoryService>,
        stats: Arc<Stats>,
    ) -> Self {
        let state = RoomState {
            members: BTreeMap::new(),
            fanout: Fanout::new(settings.room_buffer),
            seq: seed.last_seq,
            epoch: seed.epoch,
            published: 0,
            rate: None,
            joined: Vec::new(),
            left: Vec::new(),
            presence_truncated: false,
            presence_queued: false,
            history: seed.history,
            dedupe: history_service.new_dedupe(),
            retired: false,
            settings,
            last_message_at: None,
            held: Vec::new(),
            held_since: None,
        };
        Room {
            name: name.into(),
            state: Mutex::new(state),
            evicted: AtomicU64::new(0),
            remote_members: AtomicUsize::new(0),
            created_at_ms: unix_millis(),
            wait: WaitHistogram::default(),
            history_service,
            stats,
            limiter: None,
            coalesce: None,
        }
    }

    /// Coalesces this room's busy stretches through `shared`. `me` is the room's own `Arc`
    /// (`Arc::new_cyclic`), which its scheduled batches point back to.
    pub(crate) fn with_coalesce(
        mut self,
        shared: Option<Arc<coalesce::Shared>>,
        me: Weak<Room>,
    ) -> Self {
        self.coalesce = shared.map(|s| (s, me));
        self
    }

    /// Starts the room after `seq` (cluster mode: the cluster's last seq of the room, so that the
    /// first joiner's welcome is right), or after its archived seq if that is later. A new room
    /// starts at its seed's seq (0 without an archive).
    pub(crate) fn with_seq(mut self, seq: u64) -> Self {
        let state = self.state.get_mut();
        state.seq = state.seq.max(seq);
        self
    }

    /// Limits how many messages the room accepts per second.
    pub(crate) fn with_limiter(mut self, limiter: Option<DefaultDirectRateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// Takes one message from the room's rate budget, or says how long until there is one.
    /// Called before `publish`; a room without a limit always admits.
    pub fn admit(&self) -> Result<(), std::time::Duration> {
        use governor::clock::{Clock, DefaultClock};
        match &self.limiter {
            None => Ok(()),
            Some(l) => l
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, RoomState> {
        self.state.lock()
    }

    pub fn member_count(&self) -> usize {
        self.state.lock().members.len()
    }

    /// The user name of member `id`, if it is one.
    pub fn member(&self, id: u64) -> Option<Arc<str>> {
        self.state.lock().members.get(&id).cloned()
    }

    /// Members on other cluster processes, as last heard.
    pub fn remote_members(&self) -> usize {
        self.remote_members.load(Ordering::Relaxed)
    }

    /// Adds a member under the caller's lock of this room; returns its receiver and the welcome.
    /// Called by `Hub::join` only. The welcome lists the first `roster_limit` members by id
    /// (the joiner included) where the room shows names, and says whether there are more.
    /// With `replay`, also returns the past messages to write right after the welcome: taken
    /// under the same lock as the subscription, they end exactly where `rx` begins.
    pub(crate) fn add_member(
        &self,
        state: &mut RoomState,
        id: u64,
        user: &Arc<str>,
        replay: Option<ReplayRequest>,
        roster_limit: usize,
    ) -> (broadcast::Receiver<Arc<Outbound>>, Welcome, Option<Replay>) {
        // Held messages are already in the welcome's `seq` and the replay: they go out before
        // this member can receive anything.
        self.release_held(state);
        let rx = state.fanout.tx.subscribe();
        state.members.insert(id, user.clone());
        if state.settings.presence != Presence::Off {
            if state.joined.len() < PRESENCE_NAMES_MAX {
                state.joined.push(UserEntry {
                    id,
                    user: user.clone(),
                });
            } else {
                state.presence_truncated = true;
                self.stats.presence_names_dropped.inc();
            }
        }
        let members = state
            .members
            .len()
            .saturating_add(self.remote_members.load(Ordering::Relaxed));
        let named = state.settings.presence == Presence::Events && roster_limit > 0;
        let users = named.then(|| {
            state
                .members
                .iter()
                .take(roster_limit.saturating_add(1))
                .map(|(id, user)| UserEntry {
                    id: *id,
                    user: user.clone(),
                })
                .collect()
        });
        let welcome = Welcome {
            room: self.name.clone(),
            user: user.clone(),
            members,
            seq: state.seq,
            epoch: state.epoch,
            users,
            limit: roster_limit,
            partial: false,
        };
        let replay = replay.map(|req| {
            state
                .history
                .replay(&self.name, req, state.seq, state.epoch)
        });
        (rx, welcome, replay)
    }

    /// Removes a member under the caller's lock; returns whether it was there.
    pub(crate) fn remove_member(&self, state: &mut RoomState, id: u64) -> bool {
        let Some(user) = state.members.remove(&id) else {
            return false;
        };
        state.fanout.moved.remove(&id);
        if state.settings.presence != Presence::Off {
            if state.left.len() < PRESENCE_NAMES_MAX {
                state.left.push(UserEntry { id, user });
            } else {
                state.presence_truncated = true;
                self.stats.presence_names_dropped.inc();
            }
        }
        true
    }

    /// Publishes a chat message to every member; returns its seq (0: the room has closed).
    /// Encodes the frame exactly once.
    pub fn publish(&self, user: &str, text: &str, origin: u64, skip_origin: bool) -> u64 {
        self.publish_message(&Publish {
            user,
            text,
            id: None,
            author: Author::Connection(origin),
            origin,
            skip_origin,
        })
        .map_or(0, |p| p.seq)
    }

    /// Publishes `p` unless its `id` repeats one inside the dedupe window. Encodes the frame
    /// exactly once; history and archive keep that same frame. `None`: the room closed (its last
    /// member left) after the caller found it; nothing is numbered, since nobody would get it
    /// and the room that replaces it would number another message the same.
    pub fn publish_message(&self, p: &Publish<'_>) -> Option<Published> {
        let now_ms = unix_millis();
        let mut state = self.state.lock();
        if state.retired {
            return None;
        }
        if let Some(seq) = self.duplicate_in(&mut state, p, now_ms) {
            return Some(Published {
                seq,
                duplicate: true,
            });
        }
        let seq = state.seq.saturating_add(1);
        self.send_message(&mut state, seq, now_ms, p);
        Some(Published {
            seq,
            duplicate: false,
        })
    }

    /// Whether the room has left the registry (its last member left).
    pub fn is_closed(&self) -> bool {
        self.state.lock().retired
    }

    /// The seq of an earlier message with `p`'s `id` by `p`'s author inside the dedupe window,
    /// if any (counted as a duplicate). Cluster mode asks before it publishes through Redis.
    pub fn duplicate_of(&self, p: &Publish<'_>) -> Option<u64> {
        p.id?;
        let mut state = self.state.lock();
        self.duplicate_in(&mut state, p, unix_millis())
    }

    fn duplicate_in(&self, state: &mut RoomState, p: &Publish<'_>, now_ms: u64) -> Option<u64> {
        let seq = state.dedupe.check(&p.author, p.id?, now_ms)?;
        self.stats.duplicates.inc();
        Some(seq)
    }

    /// Delivers a message numbered elsewhere (cluster mode: by Redis), published at `ts`, to
    /// every member, unless its `seq` is not past the room's last one (already delivered, or
    /// older than what a member's welcome promised): then it is dropped and `false` returned.
    /// Kept in history like a local publication; its `id` is remembered for deduplication.
    pub fn deliver(&self, seq: u64, ts: u64, p: &Publish<'_>) -> bool {
        let mut state = self.state.lock();
        if seq <= state.seq {
            return false;
        }
        self.send_message(&mut state, seq, ts, p);
        true
    }

    /// Numbers, encodes (once) and sends a message under the room lock, so frames enter the
    /// broadcast ring and the history in `seq` order; hands it to the archive.
    fn send_message(&self, state: &mut RoomState, seq: u64, ts: u64, p: &Publish<'_>) {
        state.seq = seq;
        state.published += 1;
        state.rate.get_or_insert_default().record(ts / 1000);
        let frame = proto::message_frame_with_id(&self.name, p.user, p.text, seq, ts, p.id);
        self.stats.frames_encoded.inc();
        self.stats.published.inc();
        let out = Arc::new(Outbound {
            frame,
            origin: p.origin,
            skip_origin: p.skip_origin,
            published_at: Instant::now(),
            seq,
            sse: Default::default(),
            deflated: state.settings.compression.then(OnceLock::new),
            moved: false,
        });
        if let Some(id) = p.id {
            // The window runs on this process's clock (`ts` may come from another process).
            state.dedupe.record(&p.author, id, seq, unix_millis());
        }
        if !state.retired {
            state.history.push(&out);
            self.history_service
                .record(&self.name, ts, state.epoch, &out);
        }
        self.send_or_hold(state, out);
    }

    /// Sends a message to the members now, or holds it for its batch when the room is busy
    /// (`--write-coalesce`).
    fn send_or_hold(&self, state: &mut RoomState, out: Arc<Outbound>) {
        let now = out.published_at;
        let previous = state.last_message_at.replace(now);
        let Some((shared, me)) = &self.coalesce else {
            self.send(state, out);
            return;
        };
        if state.held.is_empty() && !shared.busy(previous, now) {
            self.send(state, out);
            return;
        }
        state.held.push(out);
        if state.held.len() >= shared.max_frames() {
            self.release_held(state);
        } else if state.held.len() == 1 {
            state.held_since = Some(now);
            let me: Weak<dyn Held> = me.clone();
            shared.schedule(now, me);
        }
    }

    /// Sends the held batch now, if there is one: a member about to close (a drain's turn) gets
    /// what was already numbered, its own acknowledgement included.
    pub fn release(&self) {
        let mut state = self.state.lock();
        self.release_held(&mut state);
    }

    /// Sends the held batch, if any, in order.
    pub(crate) fn release_held(&self, state: &mut RoomState) {
        if state.held.is_empty() {
            return;
        }
        self.stats.coalesced_batches.inc();
        self.stats.coalesced_frames.inc_by(state.held.len() as u64);
        state.held_since = None;
        // Taken out while it is sent (sending needs the state), then put back empty: the
        // batch's space serves the next one.
        let mut held = std::mem::take(&mut state.held);
        for out in held.drain(..) {
            self.send(state, out);
        }
        state.held = held;
    }

    /// Puts a frame in the ring, then grows the ring if some member is half a ring behind.
    fn send(&self, state: &mut RoomState, out: Arc<Outbound>) {
        let fanout = &mut state.fanout;
        // No receiver means no member is left to deliver to: nothing is lost.
        let _ = fanout.tx.send(out);
        if fanout.slots >= fanout.max_slots || fanout.tx.len() * 2 <= fanout.slots {
            return;
        }
        // A new ring four times larger, with a receiver for every member subscribed now, before
        // anything is sent on it; then a `moved` item ends the old ring, after every frame a
        // member still has to read from it.
        let slots = (fanout.slots * 4).min(fanout.max_slots).next_power_of_two();
        let (tx, _) = broadcast::channel(slots);
        for &id in state.members.keys() {
            fanout
                .moved
                .entry(id)
                .or_default()
                .push_back(tx.subscribe());
        }
        let old = std::mem::replace(&mut fanout.tx, tx);
        fanout.slots = slots;
        self.stats.rings_grown.inc();
        let _ = old.send(Arc::new(Outbound::moved()));
    }

    /// The receiver of the next ring for member `id`, which has just read the `moved` item
    /// ending its current one. `None` only if the member is not in the room.
    pub fn moved_receiver(&self, id: u64) -> Option<broadcast::Receiver<Arc<Outbound>>> {
        let mut state = self.state.lock();
        let queue = state.fanout.moved.get_mut(&id)?;
        let rx = queue.pop_front();
        if queue.is_empty() {
            state.fanout.moved.remove(&id);
        }
        rx
    }

    /// Up to `limit` kept messages with a seq below `before`, newest first, and the oldest seq
    /// the ring keeps (older ones can only come from the archive).
    pub fn history_page(&self, before: u64, limit: usize) -> (Vec<Arc<Outbound>>, Option<u64>) {
        let state = self.state.lock();
        (state.history.page(before, limit), state.history.first_seq())
    }

    /// The room's last seq.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().seq
    }

    /// The room's epoch and last seq, read together.
    pub fn position(&self) -> (Epoch, u64) {
        let state = self.state.lock();
        (state.epoch, state.seq)
    }

    /// Moves the room to `epoch` (cluster mode: Redis lost the room's numbering and started a
    /// new one). Members stay; a `since` in the old epoch is answered `complete: false` from now.
    pub fn enter_epoch(&self, epoch: Epoch) {
        let mut state = self.state.lock();
        if state.epoch != epoch {
            tracing::info!(room = %self.name, %epoch, "room entered a new epoch");
            state.epoch = epoch;
        }
    }

    /// The room's epoch (what `seq`s count in).
    pub fn epoch(&self) -> Epoch {
        self.state.lock().epoch
    }

    /// Sets how many members the room has on other cluster processes.
    pub fn set_remote_members(&self, n: usize) {
        self.remote_members.store(n, Ordering::Relaxed);
    }

    /// Sends the coalesced presence frame if anything changed since the last one.
    pub(crate) fn flush_presence(&self) {
        if let Some(delta) = self.take_presence() {
            self.send_presence(&delta);
        }
    }

    /// Takes the joins and leaves not yet announced (`None` when there were none).
    pub fn take_presence(&self) -> Option<PresenceDelta> {
        let mut state = self.state.lock();
        state.presence_queued = false;
        if state.joined.is_empty() && state.left.is_empty() {
            return None;
        }
        Some(PresenceDelta {
            joined: std::mem::take(&mut state.joined),
            left: std::mem::take(&mut state.left),
            truncated: std::mem::take(&mut state.presence_truncated),
        })
    }

    /// Sends one presence frame with these names to the local members (if any are left), as the
    /// room's presence mode says: names for `events`, the count alone for `counts`, nothing for
    /// `off`. At most `PRESENCE_NAMES_MAX` names per direction, whoever made the delta (another
    /// process's may be longer); the rest are counted and the frame says `truncated`.
    pub fn send_presence(&self, delta: &PresenceDelta) {
        let mut state = self.state.lock();
        // After the messages published before it.
        self.release_held(&mut state);
        if state.members.is_empty() || state.settings.presence == Presence::Off {
            return;
        }
        // `counts` keeps the frame's shape (clients need not care) but names nobody.
        let named = state.settings.presence == Presence::Events;
        let capped = |names: &'_ [UserEntry]| -> usize {
            let over = names.len().saturating_sub(PRESENCE_NAMES_MAX);
            if named && over > 0 {
                self.stats.presence_names_dropped.inc_by(over as u64);
            }
            names.len().min(PRESENCE_NAMES_MAX)
        };
        let (joined, left) = (capped(&delta.joined), capped(&delta.left));
        let truncated =
            named && (delta.truncated || joined < delta.joined.len() || left < delta.left.len());
        let (joined, left): (&[UserEntry], &[UserEntry]) = if named {
            (&delta.joined[..joined], &delta.left[..left])
        } else {
            (&[], &[])
        };
        // Id 0: an older process sent names only; then the frame carries no ids at all.
        let with_ids = named && joined.iter().chain(left).all(|u| u.id != 0);
        let frame = ServerFrame::Presence {
            room: &self.name,
            joined: Names(joined),
            left: Names(left),
            members: state
                .members
                .len()
                .saturating_add(self.remote_members.load(Ordering::Relaxed)),
            truncated,
            joined_ids: with_ids.then_some(Ids(joined)),
            left_ids: with_ids.then_some(Ids(left)),
        }
        .encode();
        self.stats.frames_encoded.inc();
        self.send_frame_locked(&mut state, frame);
    }

    /// Sends a frame the server made (presence, lobby events) to every member. No seq.
    pub(crate) fn send_frame(&self, frame: bytes::Bytes) {
        let mut state = self.state.lock();
        self.send_frame_locked(&mut state, frame);
    }

    fn send_frame_locked(&self, state: &mut RoomState, frame: bytes::Bytes) {
        self.send(state, Arc::new(Outbound::notice(frame)));
    }

    /// Counts a member evicted as a slow consumer. The caller then leaves the room.
    pub fn record_eviction(&self) {
        self.evicted.fetch_add(1, Ordering::Relaxed);
        self.stats.evictions.inc();
    }

    /// Records how long the oldest frame of a completed write waited in the server.
    pub fn record_wait(&self, published_at: Instant, now: Instant) {
        self.wait.record(
            now.saturating_duration_since(published_at),
            unix_millis() / 60_000,
        );
    }

    /// Up to `n` members with ids above `after` (all of them without), by id.
    pub fn users_page(&self, after: Option<u64>, n: usize) -> Vec<UserEntry> {
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        self.state
            .lock()
            .members
            .range((start, std::ops::Bound::Unbounded))
            .take(n)
            .map(|(id, user)| UserEntry {
                id: *id,
                user: user.clone(),
            })
            .collect()
    }

    /// The room's figures; its users are paged apart (`users_page`), since in cluster mode
    /// they come from every process.
    pub fn info(&self) -> RoomInfo {
        let now_ms = unix_millis();
        let state = self.state.lock();
        RoomInfo {
            room: self.name.to_string(),
            members: state.members.len(),
            local_members: state.members.len(),
            users: Vec::new(),
            next_users_after: None,
            users_partial: false,
            published: state.published,
            evicted: self.evicted.load(Ordering::Relaxed),
            last_seq: state.seq,
            created_at: Some(self.created_at_ms),
            messages_per_sec: state
                .rate
                .as_ref()
                .map_or(0.0, |r| r.per_second(now_ms / 1000)),
            p99_wait_ms: self.wait.quantile_ms(0.99, now_ms / 60_000),
            password_protected: state.settings.password.is_some(),
            max_members: state.settings.max_members,
        }
    }
}

impl Held for Room {
    fn release_due(&self, now: Instant) {
        let Some((shared, _)) = &self.coalesce else {
            return;
        };
        let mut state = self.state.lock();
        // A batch sent early (full, or a join) may have been followed by a newer one, which has
        // its own turn a window after it started.
        if state
            .held_since
            .is_some_and(|since| since + shared.window() <= now)
        {
            self.release_held(&mut state);
        }
    }
}

impl RoomInfo {
    /// A room with members on other processes only: its settings, no local figures.
    pub fn elsewhere(name: &str, settings: &RoomSettings) -> Self {
        RoomInfo {
            room: name.to_owned(),
            members: 0,
            local_members: 0,
            users: Vec::new(),
            next_users_after: None,
            users_partial: false,
            published: 0,
            evicted: 0,
            last_seq: 0,
            created_at: None,
            messages_per_sec: 0.0,
            p99_wait_ms: None,
            password_protected: settings.password.is_some(),
            max_members: settings.max_members,
        }
    }
}

impl RoomState {
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub(crate) fn has_presence_pending(&self) -> bool {
        !self.joined.is_empty() || !self.left.is_empty()
    }
}
