//! One room: its broadcast ring of pre-encoded frames, its members, its sequence and counters.
//! Membership changes go through `Hub` (which owns the create/remove race); publishing goes
//! straight here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use governor::DefaultDirectRateLimiter;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::protocol::{self, Outbound, PresenceOut};
use crate::settings::{Presence, RoomSettings};
use crate::stats::{unix_millis, RateWindow, Stats, WaitHistogram};

/// Most user names one presence frame lists per direction; the member count stays exact.
pub const PRESENCE_NAMES_MAX: usize = 100;

pub struct Room {
    name: Arc<str>,
    /// Frames for every member. A member that falls `--room-buffer` frames behind gets
    /// `Lagged` from its receiver and is evicted; the sender never waits for anyone.
    tx: broadcast::Sender<Arc<Outbound>>,
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
    stats: Arc<Stats>,
    /// `--room-rate-limit`: publishes past it are refused before they are numbered.
    limiter: Option<DefaultDirectRateLimiter>,
}

#[derive(Default)]
pub(crate) struct RoomState {
    /// Member id (the connection id) → user name. Ordered so the users list pages stably.
    pub(crate) members: BTreeMap<u64, Arc<str>>,
    seq: u64,
    published: u64,
    rate: RateWindow,
    /// Joins and leaves since the last presence frame.
    joined: Vec<Arc<str>>,
    left: Vec<Arc<str>>,
    /// Whether the room is already queued for the next presence flush.
    pub(crate) presence_queued: bool,
    /// This room's settings (`--rooms-config`), replaced on reload. Under the room lock so a join
    /// checks password and cap against exactly the members it is added to.
    pub(crate) settings: RoomSettings,
}

/// User names that joined and left since the last presence frame.
pub type PresenceDelta = (Vec<Arc<str>>, Vec<Arc<str>>);

/// A point-in-time copy of a room's figures, for the HTTP API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomInfo {
    pub room: String,
    pub members: usize,
    pub users: Vec<UserEntry>,
    pub next_users_after: Option<u64>,
    pub published: u64,
    pub evicted: u64,
    pub last_seq: u64,
    pub created_at: u64,
    pub messages_per_sec: f64,
    pub p99_wait_ms: Option<f64>,
    /// Whether joining needs a password (the password itself is never shown).
    pub password_protected: bool,
    /// The member cap, `None` without one.
    pub max_members: Option<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UserEntry {
    pub id: u64,
    pub user: Arc<str>,
}

impl Room {
    /// A room whose ring holds `settings.room_buffer` frames.
    pub(crate) fn new(name: &str, settings: RoomSettings, stats: Arc<Stats>) -> Self {
        let (tx, _) = broadcast::channel(settings.room_buffer.max(1));
        Room {
            name: name.into(),
            tx,
            state: Mutex::new(RoomState {
                settings,
                ..RoomState::default()
            }),
            evicted: AtomicU64::new(0),
            remote_members: AtomicUsize::new(0),
            created_at_ms: unix_millis(),
            wait: WaitHistogram::default(),
            stats,
            limiter: None,
        }
    }

    /// Starts the room after `seq` (cluster mode: the cluster's last seq of the room, so that the
    /// first joiner's welcome is right). A new room starts at 0.
    pub(crate) fn with_seq(mut self, seq: u64) -> Self {
        self.state.get_mut().seq = seq;
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

    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, RoomState> {
        self.state.lock()
    }

    pub fn member_count(&self) -> usize {
        self.state.lock().members.len()
    }

    /// Adds a member under the caller's lock of this room; returns its receiver and the welcome
    /// frame. Called by `Hub::join` only.
    pub(crate) fn add_member(
        &self,
        state: &mut RoomState,
        id: u64,
        user: &Arc<str>,
    ) -> (broadcast::Receiver<Arc<Outbound>>, bytes::Bytes) {
        let rx = self.tx.subscribe();
        state.members.insert(id, user.clone());
        if state.settings.presence != Presence::Off && state.joined.len() < PRESENCE_NAMES_MAX {
            state.joined.push(user.clone());
        }
        let members = state.members.len() + self.remote_members.load(Ordering::Relaxed);
        let welcome = protocol::welcome_frame(&self.name, user, members, state.seq);
        (rx, welcome)
    }

    /// Removes a member under the caller's lock; returns whether it was there.
    pub(crate) fn remove_member(&self, state: &mut RoomState, id: u64) -> bool {
        let Some(user) = state.members.remove(&id) else {
            return false;
        };
        if state.settings.presence != Presence::Off && state.left.len() < PRESENCE_NAMES_MAX {
            state.left.push(user);
        }
        true
    }

    /// Publishes a chat message to every member; returns its seq. Encodes the frame exactly once.
    pub fn publish(&self, user: &str, text: &str, origin: u64, skip_origin: bool) -> u64 {
        let now_ms = unix_millis();
        let mut state = self.state.lock();
        let seq = state.seq + 1;
        self.send_message(&mut state, seq, user, text, now_ms, origin, skip_origin);
        seq
    }

    /// Delivers a message numbered elsewhere (cluster mode: by Redis) to every member, unless
    /// its `seq` is not past the room's last one (already delivered, or older than what a
    /// member's welcome promised): then it is dropped and `false` returned.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &self,
        seq: u64,
        user: &str,
        text: &str,
        ts: u64,
        origin: u64,
        skip_origin: bool,
    ) -> bool {
        let mut state = self.state.lock();
        if seq <= state.seq {
            return false;
        }
        self.send_message(&mut state, seq, user, text, ts, origin, skip_origin);
        true
    }

    /// Numbers, encodes (once) and sends a message under the room lock, so frames enter the
    /// ring in `seq` order.
    #[allow(clippy::too_many_arguments)]
    fn send_message(
        &self,
        state: &mut RoomState,
        seq: u64,
        user: &str,
        text: &str,
        ts: u64,
        origin: u64,
        skip_origin: bool,
    ) {
        state.seq = seq;
        state.published += 1;
        state.rate.record(ts / 1000);
        let frame = protocol::message_frame(&self.name, user, text, seq, ts);
        self.stats.frames_encoded.inc();
        self.stats.published.inc();
        let out = Outbound {
            frame,
            origin,
            skip_origin,
            published_at: Instant::now(),
        };
        // No receiver means no member is left to deliver to: nothing is lost.
        let _ = self.tx.send(Arc::new(out));
    }

    /// The room's last seq.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().seq
    }

    /// Sets how many members the room has on other cluster processes.
    pub fn set_remote_members(&self, n: usize) {
        self.remote_members.store(n, Ordering::Relaxed);
    }

    /// Sends the coalesced presence frame if anything changed since the last one.
    pub(crate) fn flush_presence(&self) {
        if let Some((joined, left)) = self.take_presence() {
            self.send_presence(&joined, &left);
        }
    }

    /// Takes the joins and leaves not yet announced (`None` when there were none).
    pub fn take_presence(&self) -> Option<PresenceDelta> {
        let mut state = self.state.lock();
        state.presence_queued = false;
        if state.joined.is_empty() && state.left.is_empty() {
            return None;
        }
        Some((
            std::mem::take(&mut state.joined),
            std::mem::take(&mut state.left),
        ))
    }

    /// Sends one presence frame with these names to the local members (if any are left), as the
    /// room's presence mode says: names for `events`, the count alone for `counts`, nothing for
    /// `off`.
    pub fn send_presence(&self, joined: &[Arc<str>], left: &[Arc<str>]) {
        let state = self.state.lock();
        if state.members.is_empty() || state.settings.presence == Presence::Off {
            return;
        }
        // `counts` keeps the frame's shape (clients need not care) but names nobody.
        let named = state.settings.presence == Presence::Events;
        let frame = protocol::encode_frame(&PresenceOut {
            kind: "presence",
            room: &self.name,
            joined: if named { joined } else { &[] },
            left: if named { left } else { &[] },
            members: state.members.len() + self.remote_members.load(Ordering::Relaxed),
        });
        self.stats.frames_encoded.inc();
        self.send_frame(frame);
    }

    /// Sends a frame the server made (presence, lobby events) to every member. No seq.
    pub(crate) fn send_frame(&self, frame: bytes::Bytes) {
        let out = Outbound {
            frame,
            origin: 0,
            skip_origin: false,
            published_at: Instant::now(),
        };
        // No receiver means no member is left to deliver to: nothing is lost.
        let _ = self.tx.send(Arc::new(out));
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

    /// The room's figures, with one page of its users.
    pub fn info(&self, users_limit: usize, users_after: Option<u64>) -> RoomInfo {
        let now_ms = unix_millis();
        let state = self.state.lock();
        let start = users_after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let users: Vec<UserEntry> = state
            .members
            .range((start, std::ops::Bound::Unbounded))
            .take(users_limit)
            .map(|(id, user)| UserEntry {
                id: *id,
                user: user.clone(),
            })
            .collect();
        let next_users_after = match users.last() {
            Some(last) if state.members.range(last.id + 1..).next().is_some() => Some(last.id),
            _ => None,
        };
        RoomInfo {
            room: self.name.to_string(),
            members: state.members.len(),
            users,
            next_users_after,
            published: state.published,
            evicted: self.evicted.load(Ordering::Relaxed),
            last_seq: state.seq,
            created_at: self.created_at_ms,
            messages_per_sec: state.rate.per_second(now_ms / 1000),
            p99_wait_ms: self.wait.quantile_ms(0.99, now_ms / 60_000),
            password_protected: state.settings.password.is_some(),
            max_members: state.settings.max_members,
        }
    }
}

impl RoomState {
    pub(crate) fn has_presence_pending(&self) -> bool {
        !self.joined.is_empty() || !self.left.is_empty()
    }
}
