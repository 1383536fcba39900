//! Cluster mode (`--redis`): rooms shared by every roomcast process on one Redis.
//!
//! - **Messages.** A publish (WebSocket or REST) runs one Lua script (`scripts::PUBLISH`) that
//!   takes the room's next seq with INCR and PUBLISHes the message with it on the room's
//!   channel, atomically: Redis's publication order is the seq order, on every subscriber.
//!   Every process, the publisher's included, delivers what it receives from the channel into
//!   its local room, where it is encoded once for all local members. Nothing is delivered
//!   straight from the publish, or two processes could see two orders.
//! - **Subscriptions** follow local membership: a process subscribes to a room's channel when
//!   its first local member joins and unsubscribes when its last one leaves (`Interest`,
//!   reference-counted per room name). The link task (`link.rs`) owns the subscriber connection
//!   and reconciles what is subscribed with what is wanted, after every change and after every
//!   reconnection.
//! - **Welcome.** The first local joiner of a room waits until the subscription is confirmed,
//!   then reads the room's seq (`scripts::SEED`): every message past that seq was published after
//!   the subscription and will arrive. The room starts at that seq, so `welcome.seq` is the last
//!   seq the joiner misses; anything not past it is dropped on arrival (`Room::deliver`).
//! - **History.** The publish script also appends the message to a capped list per room (the
//!   last `--history`). The seed answers that list with the seq, so a room this process creates
//!   starts its history ring with the cluster's last messages up to its start seq; those that
//!   arrive before the room exists are appended (`kept.rs`). `history`/`since` joins are then
//!   answered from the local ring as standalone, with no gap and no duplicate.
//! - **Counts.** Each process keeps a Redis hash (its "node hash") of room → local member count,
//!   plus its connection count, and re-writes it every heartbeat (a third of
//!   `--cluster-node-ttl`) with that TTL. A process that dies stops heartbeating and its hash
//!   expires: readers only sum the hashes that still exist.
//! - **Rosters.** Each process keeps its members in a sorted set of its own (`P:roster:<node>`,
//!   entries `wire::roster_entry`), written with the presence of each interval (joins and leaves
//!   in order, before the presence payload that announces them), whole when the link comes up,
//!   and expiring with the node hash, so a process that dies takes its members with it. A
//!   welcome and the room-info API read the first page of a room's members from every live
//!   process's roster (`scripts::ROSTER`) and merge it with this process's own. Member ids are
//!   unique across processes: each process hands out ids from a range of its own
//!   (`member_id_base`).
//! - **Outages.** While Redis is unreachable the process keeps serving its local rooms: a
//!   WebSocket message is delivered to local members only and its sender gets an error frame
//!   (`cluster_unavailable`); a REST publish gets 503. The link reconnects with backoff,
//!   re-announces its counts, resubscribes every room it needs and raises each room's Redis seq
//!   to at least its local one, so numbering never goes backwards after a Redis restart.

mod kept;
mod link;
mod scripts;
pub mod wire;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use super::{BoxFuture, Broker, Fallback, Link, PublishError, Remote, Totals};
use crate::core::archive::Seeding;
use crate::core::dedupe::Author;
use crate::core::hub::{Hub, JoinError, JoinRequest, Start};
use crate::core::room::{Joined, Publish, Published, Room, UserEntry};
use crate::core::stats::{unix_millis, Stats};
use crate::proto::{Epoch, Outbound};
use crate::shutdown::Shutdown;

/// What cluster mode needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `--redis`: the server's URL.
    pub url: String,
    /// `--redis-prefix`: of every key and channel.
    pub prefix: String,
    /// `--redis-timeout`: every command and connection attempt.
    pub timeout: Duration,
    /// `--cluster-node-ttl`: the node hash's TTL.
    pub node_ttl: Duration,
    /// `--history`: messages each room's Redis list keeps.
    pub history_depth: usize,
    /// `--presence-interval`.
    pub presence_interval: Duration,
    /// `--max-message-bytes`: the longest text accepted from the channel, as from a client.
    pub max_text_bytes: usize,
}

/// How long a room's seq key outlives its last publish or subscription, and its history list
/// its last publish. Unit: milliseconds. Long enough that a quiet room keeps its numbering and
/// its recent messages; a room nobody uses stops costing memory.
const SEQ_TTL_MS: u64 = 24 * 3600 * 1000;
/// Most other processes whose member counts one room keeps.
const MAX_REMOTE_NODES: usize = 1024;
/// Most rooms one script call reads or seeds (Lua's `unpack` has a stack limit near 8,000).
const ROOMS_PER_CALL: usize = 500;
/// Most roster changes kept between two presence intervals; past it the next interval writes
/// the roster whole instead (a burst of joins costs one rewrite, not unbounded memory).
const MAX_ROSTER_QUEUE: usize = 100_000;
/// Member ids of one process take the low 32 bits; the high bits are the process's range, drawn
/// at start from `[1, 2^21)` so that every id stays below 2^53 (a JSON number a browser reads
/// exactly).
const ID_RANGE_BITS: u32 = 32;
const ID_RANGES: u64 = (1 << 21) - 1;

/// Why cluster mode could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad --redis URL: {0}")]
    BadUrl(redis::RedisError),
    #[error("Redis is unreachable")]
    Down,
    #[error("Redis did not answer within --redis-timeout")]
    Timeout,
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis answered something unexpected: {0}")]
    Protocol(&'static str),
}

/// The cluster side of one roomcast process.
pub struct Cluster {
    /// This process's id in Redis (random per start): names its node hash and marks its own
    /// messages so that `origin` and `"echo": false` work as they do standalone.
    node: Arc<str>,
    keys: Keys,
    client: redis::Client,
    /// `--redis-timeout`: every command and connection attempt.
    timeout: Duration,
    /// `--cluster-node-ttl`: the node hash's TTL.
    node_ttl: Duration,
    /// `--history`: messages each room's Redis list keeps (0: no list).
    history_depth: usize,
    presence_interval: Duration,
    /// `--max-message-bytes`: payloads with longer text are dropped.
    max_text_bytes: usize,
    /// When a dropped payload was last logged (Unix ms), and the drop count logged then: the
    /// log says how many went unlogged in between.
    drop_logged_at: AtomicU64,
    drops_logged: AtomicU64,
    /// Commands go through this connection; `None` while the link is down. Cloned out under
    /// the lock (a multiplexed connection is a handle), never used under it.
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    health: Mutex<Health>,
    /// Room name → how many local memberships need its channel.
    interests: Mutex<HashMap<Arc<str>, Entry>>,
    /// Raised when `interests` gains or loses a room: the link reconciles its subscriptions.
    wake: Notify,
    /// Raised when rooms become ready or the link goes down: joiners waiting re-check.
    ready: Notify,
    /// Membership changes not yet written to this process's roster in Redis.
    roster: Mutex<RosterQueue>,
    /// The first member id this process hands out, less one (see `ID_RANGE_BITS`).
    id_base: u64,
    metrics: Metrics,
}

/// One membership change for this process's roster.
pub(crate) enum RosterChange {
    /// A roster entry (`wire::roster_entry`) to add.
    Add(String),
    /// One to remove.
    Remove(String),
}

/// The roster changes waiting for the next presence interval.
#[derive(Default)]
pub(crate) struct RosterQueue {
    /// `false` while the link is down: nothing is queued, the next link writes the roster whole.
    open: bool,
    changes: Vec<RosterChange>,
    /// More than `MAX_ROSTER_QUEUE` changes came: the next interval writes the roster whole.
    overflow: bool,
}

impl RosterQueue {
    fn push(&mut self, change: RosterChange) {
        if !self.open || self.overflow {
            return;
        }
        if self.changes.len() >= MAX_ROSTER_QUEUE {
            self.overflow = true;
            self.changes = Vec::new();
            return;
        }
        self.changes.push(change);
    }

    /// The link is up: changes from now on are queued (the roster is being written whole).
    pub(crate) fn open(&mut self) {
        *self = RosterQueue {
            open: true,
            ..RosterQueue::default()
        };
    }

    fn close(&mut self) {
        *self = RosterQueue::default();
    }

    pub(crate) fn pending(&self) -> bool {
        self.overflow || !self.changes.is_empty()
    }

    /// The changes queued so far, and whether there were too many to keep.
    pub(crate) fn take(&mut self) -> (Vec<RosterChange>, bool) {
        let overflow = std::mem::take(&mut self.overflow);
        (std::mem::take(&mut self.changes), overflow)
    }
}

#[derive(Default)]
struct Health {
    /// When the link went down (Unix ms); `None` while up.
    down_since: Option<u64>,
    last_error: Option<String>,
}

struct Entry {
    refs: u32,
    interest: Arc<Interest>,
}

/// This process's stake in one room's channel.
pub(crate) struct Interest {
    name: Arc<str>,
    /// Taken by the link when it delivers into the room and by a joiner while it joins, so that
    /// a room created by a join starts at exactly the last seq delivered before it.
    state: Mutex<InterestState>,
}

#[derive(Default)]
struct InterestState {
    /// The largest seq this process has seen or numbered for the room.
    last_seq: u64,
    /// The room's epoch in Redis, as last read (seed) or received (a message).
    epoch: Option<Epoch>,
    /// Subscribed (confirmed) and seeded on the current link.
    ready: bool,
    /// Member counts of the room on other processes, by node id, as last heard.
    remote: Vec<(Arc<str>, usize)>,
    /// While the room does not exist here: what Redis kept of it (read by the seed) and what
    /// arrived since, oldest first, for the ring of the room the first local joiner creates.
    kept: Vec<Arc<Outbound>>,
}

impl InterestState {
    /// Saturating: the counts come from other processes (or whoever writes to Redis).
    fn remote_sum(&self) -> usize {
        self.remote
            .iter()
            .fold(0usize, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// Records `node`'s count; `false` (and nothing recorded) when that would make more than
    /// `MAX_REMOTE_NODES` processes: names of processes come from the channel, where anyone
    /// may publish, and the heartbeat only clears the ones that do not exist every third of
    /// `--cluster-node-ttl`.
    fn set_remote(&mut self, node: &str, count: usize) -> bool {
        let full = self.remote.len() >= MAX_REMOTE_NODES;
        match self.remote.iter_mut().find(|(n, _)| &**n == node) {
            Some(slot) if count == 0 => {
                let node = slot.0.clone();
                self.remote.retain(|(n, _)| *n != node);
            }
            Some(slot) => slot.1 = count,
            None if count > 0 && full => return false,
            None if count > 0 => self.remote.push((node.into(), count)),
            None => {}
        }
        true
    }
}

/// Redis key and channel names, all under `--redis-prefix`.
struct Keys {
    /// `P:room:` + room: the room's channel.
    channel_prefix: String,
    /// `P:seq:` + room: the room's last seq.
    seq_prefix: String,
    /// `P:epoch:` + room: the room's epoch (`proto::epoch`), set with its seq.
    epoch_prefix: String,
    /// `P:hist:` + room: the room's last messages (a list capped at `--history`).
    hist_prefix: String,
    /// `P:node:` + node id: the node hash (room → count, `!conns`, `!alive`).
    node_prefix: String,
    /// `P:nodes`: the set of node ids that may be alive.
    nodes: String,
    /// `P:roster:` + node id: that process's members (`wire::roster_entry`).
    roster_prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            channel_prefix: format!("{prefix}:room:"),
            seq_prefix: format!("{prefix}:seq:"),
            epoch_prefix: format!("{prefix}:epoch:"),
            hist_prefix: format!("{prefix}:hist:"),
            node_prefix: format!("{prefix}:node:"),
            nodes: format!("{prefix}:nodes"),
            roster_prefix: format!("{prefix}:roster:"),
        }
    }
    fn channel(&self, room: &str) -> String {
        format!("{}{room}", self.channel_prefix)
    }
    fn seq(&self, room: &str) -> String {
        format!("{}{room}", self.seq_prefix)
    }
    fn epoch(&self, room: &str) -> String {
        format!("{}{room}", self.epoch_prefix)
    }
    fn hist(&self, room: &str) -> String {
        format!("{}{room}", self.hist_prefix)
    }
    fn node(&self, node: &str) -> String {
        format!("{}{node}", self.node_prefix)
    }
    fn roster(&self, node: &str) -> String {
        format!("{}{node}", self.roster_prefix)
    }
}

/// Prometheus metrics of cluster mode (`roomcast_cluster_*`).
#[derive(Default)]
struct Metrics {
    up: Gauge,
    outages: Counter,
    connect_failures: Counter,
    published: Counter,
    publish_errors: Counter,
    local_only: Counter,
    received: Counter,
    stale_dropped: Counter,
    join_waits_timed_out: Counter,
    /// Kept (history) messages in Redis dropped for not being past the one before them.
    kept_out_of_order: Counter,
    /// Roster entries read from Redis that broke the rules (format, id, user name): skipped.
    roster_entries_dropped: Counter,
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("cluster");
        r.register("up", "1 while the Redis link is up", self.up.clone());
        let counters: [(&str, &str, &Counter); 10] = [
            ("outages", "Times the Redis link went down", &self.outages),
            (
                "connect_failures",
                "Failed attempts to connect to Redis",
                &self.connect_failures,
            ),
            (
                "published",
                "Messages this process published through Redis",
                &self.published,
            ),
            (
                "publish_errors",
                "Publishes refused because Redis failed or was unreachable",
                &self.publish_errors,
            ),
            (
                "local_only",
                "WebSocket messages delivered to local members only (Redis unreachable)",
                &self.local_only,
            ),
            (
                "received",
                "Messages received from Redis for local rooms",
                &self.received,
            ),
            (
                "stale_dropped",
                "Messages received with a seq not past the room's (dropped)",
                &self.stale_dropped,
            ),
            (
                "kept_out_of_order",
                "Kept messages read from Redis not past the one before them (dropped)",
                &self.kept_out_of_order,
            ),
            (
                "roster_entries_dropped",
                "Roster entries read from Redis that broke the rules (skipped)",
                &self.roster_entries_dropped,
            ),
            (
                "join_waits_timed_out",
                "First joins that stopped waiting for their subscription",
                &self.join_waits_timed_out,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
    }
}

/// Cluster-wide counts, this process's included.
#[derive(Debug, Default)]
struct Snapshot {
    /// Live processes, this one included.
    pub nodes: usize,
    pub connections: u64,
    /// Room → members, rooms with at least one member anywhere.
    pub rooms: HashMap<String, usize>,
}

/// What the other live processes have, as the COUNTS script answers it.
struct NodeCounts {
    node: String,
    connections: u64,
    rooms: Vec<(String, usize)>,
}

impl Cluster {
    /// Checks the URL; connects nothing (the link task does, and retries until Redis answers).
    pub fn new(settings: RedisSettings, registry: &mut Registry) -> Result<Self, ClusterError> {
        let client = redis::Client::open(settings.url.as_str()).map_err(ClusterError::BadUrl)?;
        let draw = std::hash::RandomState::new().hash_one((std::process::id(), unix_millis()));
        let node = format!("{draw:016x}");
        let id_base = (1 + (draw >> 11) % ID_RANGES) << ID_RANGE_BITS;
        let metrics = Metrics::default();
        metrics.register(registry);
        Ok(Cluster {
            node: node.into(),
            keys: Keys::new(&settings.prefix),
            client,
            timeout: settings.timeout,
            node_ttl: settings.node_ttl,
            history_depth: settings.history_depth,
            presence_interval: settings.presence_interval,
            max_text_bytes: settings.max_text_bytes,
            drop_logged_at: AtomicU64::new(0),
            drops_logged: AtomicU64::new(0),
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            health: Mutex::new(Health {
                down_since: Some(unix_millis()),
                last_error: Some("not connected yet".into()),
            }),
            interests: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            ready: Notify::new(),
            roster: Mutex::new(RosterQueue::default()),
            id_base,
            metrics,
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The command connection, or `Down`.
    fn connection(&self) -> Result<MultiplexedConnection, ClusterError> {
        if !self.is_up() {
            return Err(ClusterError::Down);
        }
        self.conn.lock().clone().ok_or(ClusterError::Down)
    }

    /// Runs `fut` within `--redis-timeout`.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(res) => Ok(res?),
            Err(_) => Err(ClusterError::Timeout),
        }
    }

    fn set_up(&self, conn: MultiplexedConnection) {
        *self.conn.lock() = Some(conn);
        *self.health.lock() = Health::default();
        self.up.store(true, Ordering::Release);
        self.metrics.up.set(1);
        tracing::info!(node = %self.node, "cluster: connected to Redis");
    }

    fn set_down(&self, error: &ClusterError) {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        *self.conn.lock() = None;
        {
            let mut health = self.health.lock();
            health.down_since.get_or_insert_with(unix_millis);
            health.last_error = Some(error.to_string());
        }
        self.metrics.up.set(0);
        if was_up {
            self.metrics.outages.inc();
            tracing::warn!(error = %error, "cluster: Redis link down; serving local rooms only");
        } else {
            self.metrics.connect_failures.inc();
            tracing::debug!(error = %error, "cluster: Redis still unreachable");
        }
        // The next link writes the roster whole.
        self.roster.lock().close();
        // Rooms are resubscribed (and seeded) on the next link.
        for entry in self.interests.lock().values() {
            entry.interest.state.lock().ready = false;
        }
        // Joiners waiting for a subscription stop waiting.
        self.ready.notify_waiters();
    }

    /// Registers one more local membership of `name` (subscribing when it is the first).
    fn acquire(&self, name: &str) -> Arc<Interest> {
        let mut map = self.interests.lock();
        if let Some(entry) = map.get_mut(name) {
            entry.refs += 1;
            return entry.interest.clone();
        }
        let name: Arc<str> = name.into();
        let interest = Arc::new(Interest {
            name: name.clone(),
            state: Mutex::new(InterestState::default()),
        });
        map.insert(
            name,
            Entry {
                refs: 1,
                interest: interest.clone(),
            },
        );
        drop(map);
        self.wake.notify_one();
        interest
    }

    /// Drops one local membership of `name` (unsubscribing after the last).
    fn release(&self, name: &str) {
        let mut map = self.interests.lock();
        if let Some(entry) = map.get_mut(name) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                map.remove(name);
                drop(map);
                self.wake.notify_one();
            }
        }
    }

    fn interest(&self, name: &str) -> Option<Arc<Interest>> {
        self.interests.lock().get(name).map(|e| e.interest.clone())
    }

    /// Joins `req.name` in the local hub once this process receives the room's channel, so that
    /// the welcome's seq is exact. While Redis is unreachable it joins at once (local room only).
    /// The password and `max_members` are checked by `Hub::join` (the cap against this
    /// process's members). The `replay` (`history`/`since`) is taken from this process's
    /// history of the room, atomically with the join. A room this process creates starts its
    /// ring with what Redis kept of it (up to its start seq, `kept.rs`), so replays are
    /// cluster-wide; created while Redis is unreachable, it knows only what its archive kept
    /// (`recovery` then says `complete: false` for what it never received).
    /// Cancel-safe: dropped early (or refused), it releases its interest.
    async fn join_room(
        &self,
        hub: &Hub,
        req: JoinRequest<'_>,
        seeding: Seeding,
    ) -> Result<Joined, JoinError> {
        /// Releases the interest unless the join completed.
        struct Release<'a>(&'a Cluster, &'a str, bool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.release(self.1);
                }
            }
        }
        let name = req.name;
        let interest = self.acquire(name);
        let mut guard = Release(self, name, false);
        self.wait_ready(&interest).await;
        let joined = {
            let mut state = interest.state.lock();
            let start = Start {
                seq: state.last_seq,
                remote_members: state.remote_sum(),
                kept: &state.kept,
                epoch: state.epoch,
                seeding,
            };
            let joined = hub.join(&req, start)?;
            // The room exists now, with those frames in its ring.
            state.kept = Vec::new();
            joined
        };
        guard.2 = true;
        self.roster
            .lock()
            .push(RosterChange::Add(wire::roster_entry(
                name, req.id, req.user,
            )));
        Ok(joined)
    }

    /// Up to `n` members of `room` with ids above `after` on the other live processes, by id,
    /// from their rosters. Entries that break the rules are skipped and counted.
    async fn read_roster(
        &self,
        room: &str,
        after: Option<u64>,
        n: usize,
    ) -> Result<Vec<UserEntry>, ClusterError> {
        let mut conn = self.connection()?;
        let (min, max) = wire::roster_range(room, after);
        let mut invocation = scripts::ROSTER.key(&self.keys.nodes);
        invocation
            .arg(&self.keys.node_prefix)
            .arg(&self.keys.roster_prefix)
            .arg(&*self.node)
            .arg(min)
            .arg(max)
            .arg(n);
        let value: redis::Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        let redis::Value::Array(items) = value else {
            return Err(ClusterError::Protocol("ROSTER did not answer an array"));
        };
        let mut out = Vec::new();
        let mut dropped = 0u64;
        // Every other item is a node id; the entries of each node follow it.
        for page in items.iter().skip(1).step_by(2).take(MAX_REMOTE_NODES) {
            let redis::Value::Array(entries) = page else {
                dropped += 1;
                continue;
            };
            for entry in entries.iter().take(n) {
                let parsed = match entry {
                    redis::Value::BulkString(b) => wire::parse_roster_entry(room, b).ok(),
                    _ => None,
                };
                match parsed {
                    Some((id, user)) if after.is_none_or(|a| id > a) => out.push(UserEntry {
                        id,
                        user: user.into(),
                    }),
                    _ => dropped += 1,
                }
            }
        }
        if dropped > 0 {
            self.metrics.roster_entries_dropped.inc_by(dropped);
            tracing::warn!(
                room,
                dropped,
                "cluster: roster entries in Redis broke the rules and were skipped"
            );
        }
        out.sort_unstable_by_key(|u| u.id);
        out.dedup_by_key(|u| u.id);
        out.truncate(n);
        Ok(out)
    }

    async fn wait_ready(&self, interest: &Interest) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_up() || interest.state.lock().ready {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.metrics.join_waits_timed_out.inc();
                tracing::warn!(room = %interest.name, "cluster: joined before the subscription was confirmed");
                return;
            }
        }
    }

    /// The seq a publish of `room` must number above: what this process has seen.
    fn floor(&self, room: &str, local: Option<&Room>) -> u64 {
        let seen = self.interest(room).map_or(0, |i| i.state.lock().last_seq);
        seen.max(local.map_or(0, Room::last_seq))
    }

    /// Publishes through Redis: every process, this one included, delivers what it receives
    /// from the room's channel, so all see one order. A repeated `id` is recognised from what
    /// this process has published or received (a retry racing its first copy through Redis on
    /// another process is not). Without a local copy of the room, `NoSuchRoom` when no process
    /// has a member.
    async fn publish_message(
        &self,
        name: &str,
        local: Option<Arc<Room>>,
        p: &Publish<'_>,
        fallback: Fallback,
    ) -> Result<Published, PublishError> {
        // A connection id is only unique on its own process: qualified with the node id, every
        // process keys this author's ids the same way, and connection 7 here is not connection 7
        // there.
        let qualified;
        let mut p = *p;
        if let Author::Connection(id) = p.author {
            qualified = format!("c:{}:{id}", self.node);
            p.author = Author::Key(&qualified);
        }
        let p = &p;
        // A local room that closed after it was looked up is no reason to publish: the script
        // is asked to check for members elsewhere, as when there was none here.
        let local = local.filter(|r| !r.is_closed());
        if let Some(seq) = local.as_ref().and_then(|r| r.duplicate_of(p)) {
            return Ok(Published {
                seq,
                duplicate: true,
            });
        }
        let floor = self.floor(name, local.as_deref());
        match self.publish_script(name, floor, p, local.is_none()).await {
            Ok(Some(seq)) => Ok(Published {
                seq,
                duplicate: false,
            }),
            Ok(None) => Err(PublishError::NoSuchRoom),
            Err(e) => {
                let delivered_locally = match (&local, fallback) {
                    (Some(room), Fallback::LocalMembers) => {
                        self.metrics.local_only.inc();
                        room.publish_message(p).is_some()
                    }
                    _ => false,
                };
                Err(PublishError::Unavailable {
                    reason: e.to_string(),
                    delivered_locally,
                })
            }
        }
    }

    async fn publish_script(
        &self,
        room: &str,
        floor: u64,
        p: &Publish<'_>,
        need_subscribers: bool,
    ) -> Result<Option<u64>, ClusterError> {
        let body = wire::encode_message(&wire::MessageBody {
            node: self.node.as_ref().into(),
            origin: p.origin,
            skip_origin: p.skip_origin,
            ts: unix_millis(),
            user: p.user.into(),
            text: p.text.into(),
            id: p.id.map(Into::into),
            author: p.id.map(|_| p.author.key()),
        });
        let res = async {
            let mut conn = self.connection()?;
            let mut invocation = scripts::PUBLISH.key(self.keys.seq(room));
            invocation
                .key(self.keys.hist(room))
                .key(self.keys.epoch(room))
                .arg(self.keys.channel(room))
                .arg(floor)
                .arg(body)
                .arg(SEQ_TTL_MS)
                .arg(u8::from(need_subscribers))
                .arg(self.history_depth)
                .arg(Epoch::random().to_string());
            self.timed(invocation.invoke_async::<u64>(&mut conn)).await
        }
        .await;
        match res {
            Ok(0) => Ok(None),
            Ok(seq) => {
                self.metrics.published.inc();
                Ok(Some(seq))
            }
            Err(e) => {
                self.metrics.publish_errors.inc();
                Err(e)
            }
        }
    }

    /// Members of `room` on the other live processes, and its last seq in Redis.
    async fn remote_room(&self, room: &str) -> Result<Remote, ClusterError> {
        let remotes = self.read_counts(&[room]).await?;
        let mut conn = self.connection()?;
        let seq: Option<u64> = self
            .timed(
                redis::cmd("GET")
                    .arg(self.keys.seq(room))
                    .query_async(&mut conn),
            )
            .await
            .unwrap_or(None);
        Ok(Remote {
            members: remotes
                .iter()
                .flat_map(|r| r.rooms.iter())
                .fold(0usize, |sum, (_, n)| sum.saturating_add(*n)),
            last_seq: seq.unwrap_or(0),
        })
    }

    /// Counts of the whole cluster: the other live processes from Redis, this one from `hub`.
    async fn snapshot(&self, hub: &Hub, local_connections: u64) -> Result<Snapshot, ClusterError> {
        let remotes = self.read_counts(&[]).await?;
        let mut snap = Snapshot {
            nodes: remotes.len() + 1,
            connections: local_connections,
            rooms: HashMap::new(),
        };
        for (room, n) in hub.list(usize::MAX).0 {
            snap.rooms.insert(room.name().to_owned(), n);
        }
        for remote in remotes {
            // Saturating: each node hash is whatever is in Redis.
            snap.connections = snap.connections.saturating_add(remote.connections);
            for (room, n) in remote.rooms {
                let sum = snap.rooms.entry(room).or_default();
                *sum = sum.saturating_add(n);
            }
        }
        snap.rooms.retain(|_, n| *n > 0);
        Ok(snap)
    }

    /// Runs COUNTS for `rooms` (all rooms when empty).
    async fn read_counts(&self, rooms: &[&str]) -> Result<Vec<NodeCounts>, ClusterError> {
        let mut conn = self.connection()?;
        self.read_counts_on(&mut conn, rooms).await
    }

    async fn read_counts_on(
        &self,
        conn: &mut MultiplexedConnection,
        rooms: &[&str],
    ) -> Result<Vec<NodeCounts>, ClusterError> {
        let mut invocation = scripts::COUNTS.key(&self.keys.nodes);
        invocation.arg(&self.keys.node_prefix).arg(&*self.node);
        for room in rooms {
            invocation.arg(*room);
        }
        let value: redis::Value = self.timed(invocation.invoke_async(conn)).await?;
        parse_counts(value, rooms)
    }

    fn link_state(&self) -> Link {
        let health = self.health.lock();
        Link {
            redis: if self.is_up() { "up" } else { "down" },
            node: self.node.to_string(),
            down_since: health.down_since,
            error: health.last_error.clone(),
        }
    }

    /// The `cluster` object of `/api/stats`.
    fn counters_json(&self) -> serde_json::Value {
        let m = &self.metrics;
        let mut v = serde_json::to_value(self.link_state()).unwrap_or_default();
        v["subscribed_rooms"] = self.interests.lock().len().into();
        v["outages"] = m.outages.get().into();
        v["connect_failures"] = m.connect_failures.get().into();
        v["published"] = m.published.get().into();
        v["publish_errors"] = m.publish_errors.get().into();
        v["local_only"] = m.local_only.get().into();
        v["received"] = m.received.get().into();
        v["stale_dropped"] = m.stale_dropped.get().into();
        v["kept_out_of_order"] = m.kept_out_of_order.get().into();
        v["roster_entries_dropped"] = m.roster_entries_dropped.get().into();
        v
    }
}

impl Broker for Cluster {
    fn join<'a>(
        &'a self,
        hub: &'a Hub,
        req: JoinRequest<'a>,
        seeding: Seeding,
    ) -> BoxFuture<'a, Result<Joined, JoinError>> {
        Box::pin(self.join_room(hub, req, seeding))
    }

    /// Leaves `room` in the hub, then drops this membership's interest in its channel.
    fn leave(&self, hub: &Hub, room: &Arc<Room>, id: u64) {
        let user = room.member(id);
        if hub.leave(room, id) {
            if let Some(user) = user {
                self.roster
                    .lock()
                    .push(RosterChange::Remove(wire::roster_entry(
                        room.name(),
                        id,
                        &user,
                    )));
            }
            self.release(room.name());
        }
    }

    fn roster<'a>(
        &'a self,
        name: &'a str,
        after: Option<u64>,
        n: usize,
    ) -> BoxFuture<'a, Result<Vec<UserEntry>, ()>> {
        Box::pin(async move { self.read_roster(name, after, n).await.map_err(|_| ()) })
    }

    fn member_id_base(&self) -> u64 {
        self.id_base
    }

    fn publish<'a>(
        &'a self,
        name: &'a str,
        local: Option<Arc<Room>>,
        p: &'a Publish<'a>,
        fallback: Fallback,
    ) -> BoxFuture<'a, Result<Published, PublishError>> {
        Box::pin(self.publish_message(name, local, p, fallback))
    }

    fn remote<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Remote, ()>> {
        Box::pin(async move { self.remote_room(name).await.map_err(|_| ()) })
    }

    fn totals<'a>(&'a self, hub: &'a Hub, connections: u64) -> BoxFuture<'a, Result<Totals, ()>> {
        Box::pin(async move {
            let snap = self.snapshot(hub, connections).await.map_err(|_| ())?;
            Ok(Totals {
                nodes: snap.nodes,
                connections: snap.connections,
                rooms: snap.rooms.into_iter().collect(),
            })
        })
    }

    fn link(&self) -> Option<Link> {
        Some(self.link_state())
    }

    fn stats_json(&self) -> Option<serde_json::Value> {
        Some(self.counters_json())
    }

    /// The Redis link: it also carries presence between processes (and flushes it locally
    /// while Redis is unreachable).
    fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        stats: Arc<Stats>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        Box::pin(link::run(self, hub, stats, shutdown))
    }
}

/// Reads the COUNTS script's answer: `[id, conns, counts, id, conns, counts, …]`.
fn parse_counts(value: redis::Value, rooms: &[&str]) -> Result<Vec<NodeCounts>, ClusterError> {
    use redis::Value;
    let Value::Array(items) = value else {
        return Err(ClusterError::Protocol("COUNTS did not answer an array"));
    };
    let mut out = Vec::with_capacity(items.len() / 3);
    let mut items = items.into_iter();
    while let (Some(id), Some(conns), Some(counts)) = (items.next(), items.next(), items.next()) {
        let node = string_of(&id).ok_or(ClusterError::Protocol("node id"))?;
        let connections = string_of(&conns).and_then(|s| s.parse().ok()).unwrap_or(0);
        let Value::Array(counts) = counts else {
            return Err(ClusterError::Protocol("node counts"));
        };
        let rooms = if rooms.is_empty() {
            let mut pairs = Vec::with_capacity(counts.len() / 2);
            let mut it = counts.iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Some(k), Some(n)) =
                    (string_of(k), string_of(v).and_then(|v| v.parse().ok()))
                {
                    if !k.starts_with('!') {
                        pairs.push((k, n));
                    }
                }
            }
            pairs
        } else {
            rooms
                .iter()
                .zip(counts.iter())
                .filter_map(|(room, v)| {
                    let n: usize = string_of(v)?.parse().ok()?;
                    Some(((*room).to_owned(), n))
                })
                .collect()
        };
        out.push(NodeCounts {
            node,
            connections,
            rooms,
        });
    }
    Ok(out)
}

fn string_of(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_counts_by_node() {
        let mut s = InterestState::default();
        assert!(s.set_remote("a", 3));
        assert!(s.set_remote("b", 2));
        assert!(s.set_remote("a", 1));
        assert_eq!(s.remote_sum(), 3);
        assert!(s.set_remote("b", 0));
        assert!(s.set_remote("c", 0));
        assert_eq!(s.remote, vec![(Arc::from("a"), 1)]);
    }

    #[test]
    fn remote_counts_saturate_and_are_capped_by_node() {
        let mut s = InterestState::default();
        assert!(s.set_remote("a", usize::MAX));
        assert!(s.set_remote("b", usize::MAX));
        assert_eq!(s.remote_sum(), usize::MAX);
        for i in 2..MAX_REMOTE_NODES {
            assert!(s.set_remote(&format!("n{i}"), 1));
        }
        assert!(!s.set_remote("one-too-many", 1));
        assert!(s.set_remote("a", 0), "a known node may always leave");
        assert!(s.set_remote("one-too-many", 1));
    }

    #[test]
    fn counts_answer_is_parsed_for_one_room_and_for_all() {
        use redis::Value::{Array, BulkString, Nil};
        let b = |s: &str| BulkString(s.as_bytes().to_vec());
        let one = Array(vec![
            b("n1"),
            b("4"),
            Array(vec![b("3")]),
            b("n2"),
            b("0"),
            Array(vec![Nil]),
        ]);
        let r = parse_counts(one, &["r"]).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].rooms, vec![("r".to_owned(), 3)]);
        assert_eq!(r[0].connections, 4);
        assert!(r[1].rooms.is_empty());
        let all = Array(vec![
            b("n1"),
            b("5"),
            Array(vec![b("!alive"), b("1"), b("x"), b("2"), b("y"), b("3")]),
        ]);
        let r = parse_counts(all, &[]).unwrap();
        assert_eq!(r[0].rooms, vec![("x".to_owned(), 2), ("y".to_owned(), 3)]);
        assert!(parse_counts(b("nope"), &[]).is_err());
    }
}
