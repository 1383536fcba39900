//! Where rooms live: the one interface that connections, the HTTP API and the server use for
//! joining, leaving, publishing and reading counts, whatever the deployment.
//!
//! `Bus` is the façade every caller holds. It owns the rules that are the same in every mode
//! (the `$lobby`, the room rate limit, the shape of room info) and hands the rest to a
//! `Broker`: `local::Local` when this process runs alone, `redis::Redis` when rooms are shared
//! by every process on one Redis. Callers never ask which one it is.
//!
//! Why a trait object and not an enum: the next broker (NATS, Postgres `LISTEN`) is one new file
//! and one line in `server.rs`, with no match to extend at each method. The price is one boxed
//! future per join and per publish; the connection task boxes those steps anyway (its idle
//! size is a headline figure), so nothing is added to an idle connection.

pub mod local;
pub mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::core::archive::Seeding;
use crate::core::auth::Scope;
pub use crate::core::hub::JoinRequest;
use crate::core::hub::{Hub, JoinError};
use crate::core::room::{merge_page, Joined, Publish, Published, Room, RoomInfo, UserEntry};
use crate::core::stats::Stats;
use crate::proto::names::{direct_admits, LOBBY};
use crate::shutdown::Shutdown;

/// A boxed future borrowing from its broker.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to do with a message when the broker cannot reach the other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Deliver it to this process's members and say so (a WebSocket sender stays in the room).
    LocalMembers,
    /// Publish nothing (a REST caller can retry, with an `id` to stay idempotent).
    Nothing,
}

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The room's `--room-rate-limit`: try again after this long.
    #[error("the room is at its --room-rate-limit")]
    RateLimited(Duration),
    /// No process has a member in the room.
    #[error("no room of that name has members")]
    NoSuchRoom,
    /// The other processes could not be reached.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        /// `Fallback::LocalMembers` delivered it here.
        delivered_locally: bool,
    },
}

/// A room as the other processes report it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Remote {
    /// Members on other live processes.
    pub members: usize,
    /// The room's last seq as the cluster numbers it (0 when unknown).
    pub last_seq: u64,
}

/// Counts of every process together, this one included.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub nodes: usize,
    pub connections: u64,
    /// Room → members anywhere.
    pub rooms: Vec<(String, usize)>,
}

/// How the link to the other processes is doing, for `/healthz` and `/api/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// `up` or `down`.
    pub redis: &'static str,
    pub node: String,
    pub down_since: Option<u64>,
    pub error: Option<String>,
}

/// How many times a join reads a new room's past off the lock before it reads it under the
/// lock (the room came or went during each read: rare, and rarer each time).
const SEED_TRIES: usize = 4;

/// One implementation of where rooms live. Methods take the process's `Hub`, which holds the
/// local copy of every room with a local member.
pub trait Broker: Send + Sync + 'static {
    /// Joins a chat room (never `$lobby`) in `hub`, with admission and replay atomic with the
    /// subscription. Cancel-safe: dropped early, it leaves nothing behind.
    /// `seeding` is the room's past read from the archive beforehand (`Hub::seed_job`), for
    /// `Start::seeding`.
    fn join<'a>(
        &'a self,
        hub: &'a Hub,
        req: JoinRequest<'a>,
        seeding: Seeding,
    ) -> BoxFuture<'a, Result<Joined, JoinError>>;

    /// Leaves a chat room this member joined through `join`.
    fn leave(&self, hub: &Hub, room: &Arc<Room>, id: u64);

    /// Publishes `p` into `name`; `local` is this process's copy of the room, if any. A
    /// repeated `id` answers the first copy's seq, `duplicate: true`.
    fn publish<'a>(
        &'a self,
        name: &'a str,
        local: Option<Arc<Room>>,
        p: &'a Publish<'a>,
        fallback: Fallback,
    ) -> BoxFuture<'a, Result<Published, PublishError>>;

    /// What the other processes have of `name` (`Err`: they cannot be asked now).
    fn remote<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Remote, ()>>;

    /// Up to `n` members of `name` on the other processes with ids above `after`, by id
    /// (`Err`: they cannot be asked now). This process's members are the hub's.
    fn roster<'a>(
        &'a self,
        name: &'a str,
        after: Option<u64>,
        n: usize,
    ) -> BoxFuture<'a, Result<Vec<UserEntry>, ()>>;

    /// The member ids this process hands out start after this: processes that share rooms take
    /// ids from ranges of their own, so that an id names one member everywhere.
    fn member_id_base(&self) -> u64 {
        0
    }

    /// Counts of every process (`Err`: the other processes cannot be asked now).
    fn totals<'a>(&'a self, hub: &'a Hub, connections: u64) -> BoxFuture<'a, Result<Totals, ()>>;

    /// The link to the other processes; `None` when there is none.
    fn link(&self) -> Option<Link>;

    /// Broker counters for `/api/stats` (`None` when there are none).
    fn stats_json(&self) -> Option<serde_json::Value>;

    /// The broker's background work (presence ticks, the Redis link) until `shutdown`.
    fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        stats: Arc<Stats>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, ()>;
}

/// How old the counts behind `GET /api/rooms` and `GET /api/stats` may be.
pub const COUNTS_MAX_AGE: Duration = Duration::from_secs(1);

/// The rooms of this server, wherever they live.
pub struct Bus {
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    stats: Arc<Stats>,
    /// The last counts snapshot (see `counts`).
    counts: tokio::sync::Mutex<Option<Arc<Counts>>>,
}

/// Room and connection counts of every process, as of `taken`.
struct Counts {
    taken: Instant,
    /// Rooms with members anywhere, largest first (ties by name). This process's alone when
    /// the others cannot be asked.
    all: Vec<(String, usize)>,
    /// This process's members per room.
    local: HashMap<String, usize>,
    /// `None`: the other processes could not be asked.
    nodes: Option<usize>,
    connections: u64,
    /// `up`/`down` when there is a link to other processes.
    cluster: Option<&'static str>,
}

/// A page of the room list.
#[derive(Debug, Serialize)]
pub struct RoomList {
    pub rooms: Vec<RoomCount>,
    pub total: usize,
    /// `up`/`down` when there is a link to other processes; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct RoomCount {
    pub room: String,
    pub members: usize,
    pub local_members: usize,
    /// Joining needs the room's password: a client asks for it before it tries.
    pub password_protected: bool,
}

/// `/api/stats`'s view of every process together.
pub struct StatsView {
    pub nodes: Option<usize>,
    pub connections: u64,
    pub rooms: usize,
}

impl Bus {
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>, stats: Arc<Stats>) -> Self {
        Bus {
            hub,
            broker,
            stats,
            counts: tokio::sync::Mutex::new(None),
        }
    }

    /// Where this process's member ids start (see `Broker::member_id_base`).
    pub fn member_id_base(&self) -> u64 {
        self.broker.member_id_base()
    }

    /// This process's rooms.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Starts the broker's background work.
    pub fn spawn(&self, shutdown: Shutdown) {
        let run = self
            .broker
            .clone()
            .run(self.hub.clone(), self.stats.clone(), shutdown);
        tokio::spawn(run);
    }

    /// Joins a room (`$lobby` included). Cancel-safe. A direct-message room admits only the
    /// users it names (with tokens on, the user is the token's `sub`), checked here so the
    /// upgrade and a `join` frame, in either deployment, refuse alike.
    pub async fn join(&self, req: JoinRequest<'_>) -> Result<Joined, JoinError> {
        if !direct_admits(req.name, req.user) {
            return Err(JoinError::NotAddressed);
        }
        // The lobby is each process's own: never a broker's room.
        if req.name == LOBBY {
            let all = Scope::all();
            let scope = req.grant.map_or(&all, |g| g.scope());
            return Ok(self.hub.lobby().join(req.id, req.user, req.replay, scope));
        }
        // A room about to be created reads its past from the archive here, on the blocking
        // pool, so that no runtime thread waits on the disk and no lock is held meanwhile. If
        // the room came or went during the read, the read is stale: read again (only the last
        // of a few tries may read under the lock, counted in `history_db_locked_reads`).
        for tries_left in (0..SEED_TRIES).rev() {
            let prepared = match self.hub.seed_job(req.name) {
                Some(job) => tokio::task::spawn_blocking(job).await.ok().flatten(),
                None => None,
            };
            let seeding = Seeding {
                prepared,
                retry_if_stale: tries_left > 0,
            };
            match self.broker.join(&self.hub, req, seeding).await {
                Err(JoinError::SeedStale) if tries_left > 0 => {}
                Ok(joined) => return Ok(self.with_roster(joined, req.id).await),
                done => return done,
            }
        }
        Err(JoinError::SeedStale)
    }

    /// Adds the other processes' members to a welcome that lists members, when the room has
    /// some elsewhere. Read after the join subscribed: a change before the read is in it, one
    /// after it comes as presence (ids make hearing of one twice harmless). Unreadable, the
    /// welcome lists this process's members and says `users_partial`. Cancel-safe: dropped
    /// while it reads, it leaves the room it was handed.
    async fn with_roster(&self, mut joined: Joined, id: u64) -> Joined {
        if !joined.welcome.lists_users() || joined.room.remote_members() == 0 {
            return joined;
        }
        /// Leaves the room unless the join is handed on.
        struct Leave<'a> {
            bus: &'a Bus,
            room: Arc<Room>,
            id: u64,
            armed: bool,
        }
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                if self.armed {
                    self.bus.leave(&self.room, self.id);
                }
            }
        }
        let mut guard = Leave {
            bus: self,
            room: joined.room.clone(),
            id,
            armed: true,
        };
        let n = joined.welcome.limit().saturating_add(1);
        let remote = self.broker.roster(guard.room.name(), None, n).await;
        guard.armed = false;
        match remote {
            Ok(users) => joined.welcome.merge_users(users),
            Err(()) => joined.welcome.set_partial(),
        }
        joined
    }

    /// Leaves a room joined through `join`.
    pub fn leave(&self, room: &Arc<Room>, id: u64) {
        if self.hub.lobby().is(room) {
            self.hub.lobby().leave(room, id);
        } else {
            self.broker.leave(&self.hub, room, id);
        }
    }

    /// Publishes into a room this process has a copy of (a member's own room).
    pub async fn publish_in(
        &self,
        room: &Arc<Room>,
        p: &Publish<'_>,
        fallback: Fallback,
    ) -> Result<Published, PublishError> {
        self.publish_to(room.name(), Some(room.clone()), p, fallback)
            .await
    }

    /// Publishes into `name` from outside the room (REST).
    pub async fn publish(
        &self,
        name: &str,
        p: &Publish<'_>,
        fallback: Fallback,
    ) -> Result<Published, PublishError> {
        let local = self.hub.get(name);
        self.publish_to(name, local, p, fallback).await
    }

    async fn publish_to(
        &self,
        name: &str,
        local: Option<Arc<Room>>,
        p: &Publish<'_>,
        fallback: Fallback,
    ) -> Result<Published, PublishError> {
        // The room's limit is checked before the message goes anywhere. A room with no member
        // here has no limiter here.
        if let Some(Err(wait)) = local.as_ref().map(|r| r.admit()) {
            self.stats.rate_limited.inc();
            return Err(PublishError::RateLimited(wait));
        }
        self.broker.publish(name, local, p, fallback).await
    }

    /// A room's figures with one page of its users, those of every process by id. `None`: no
    /// process has a member in it. When the other processes cannot be asked, the page is this
    /// process's and says `users_partial`.
    pub async fn room_info(
        &self,
        name: &str,
        users_limit: usize,
        users_after: Option<u64>,
    ) -> Option<RoomInfo> {
        let local = self.hub.get(name);
        let remote = self.broker.remote(name).await;
        let reachable = remote.is_ok();
        let remote = remote.unwrap_or_default();
        let mut info = match &local {
            Some(room) => room.info(),
            None if remote.members > 0 => {
                let settings = self.hub.settings().resolve(name);
                RoomInfo::elsewhere(name, &settings)
            }
            None => return None,
        };
        info.members = info.members.saturating_add(remote.members);
        info.last_seq = info.last_seq.max(remote.last_seq);
        // One more than a page: whether there is a next one.
        let n = users_limit.saturating_add(1);
        let mut page = local.map_or_else(Vec::new, |r| r.users_page(users_after, n));
        info.users_partial = !reachable;
        if remote.members > 0 {
            match self.broker.roster(name, users_after, n).await {
                Ok(more) => merge_page(&mut page, more, n),
                Err(()) => info.users_partial = true,
            }
        }
        if page.len() > users_limit {
            page.truncate(users_limit);
            info.next_users_after = page.last().map(|u| u.id);
        }
        info.users = page;
        Some(info)
    }

    /// Rooms with members anywhere that `shown` lets the caller see, largest first, at most
    /// `limit`; `total` counts the shown ones. From the counts snapshot: at most
    /// `COUNTS_MAX_AGE` old.
    pub async fn rooms(&self, limit: usize, shown: impl Fn(&str) -> bool) -> RoomList {
        let settings = self.hub.settings();
        let counts = self.counts().await;
        let mut visible = counts.all.iter().filter(|(room, _)| shown(room));
        let rooms = visible
            .by_ref()
            .take(limit)
            .map(|(room, members)| RoomCount {
                local_members: counts.local.get(room).copied().unwrap_or(0),
                password_protected: settings.has_password(room),
                room: room.clone(),
                members: *members,
            })
            .collect::<Vec<_>>();
        RoomList {
            total: rooms.len() + visible.count(),
            rooms,
            cluster: counts.cluster,
        }
    }

    /// Connections, rooms and processes, every process together where the broker can tell.
    /// From the counts snapshot: at most `COUNTS_MAX_AGE` old.
    pub async fn totals(&self) -> StatsView {
        let counts = self.counts().await;
        StatsView {
            nodes: counts.nodes,
            connections: counts.connections,
            rooms: counts.all.len(),
        }
    }

    /// The counts snapshot, taken again when it is older than `COUNTS_MAX_AGE`. One request
    /// takes it while the others wait for it, so a burst of requests costs one listing (and,
    /// in cluster mode, one scan of every process's counts on Redis).
    async fn counts(&self) -> Arc<Counts> {
        let mut slot = self.counts.lock().await;
        if let Some(counts) = slot.as_ref().filter(|c| c.taken.elapsed() < COUNTS_MAX_AGE) {
            return counts.clone();
        }
        let counts = Arc::new(self.take_counts().await);
        *slot = Some(counts.clone());
        counts
    }

    async fn take_counts(&self) -> Counts {
        let connections = self.stats.connections.get().max(0) as u64;
        let local: Vec<(String, usize)> = self
            .hub
            .list(usize::MAX)
            .0
            .into_iter()
            .map(|(room, n)| (room.name().to_owned(), n))
            .collect();
        let linked = self.broker.link().is_some();
        let (mut all, nodes, connections, cluster) =
            match self.broker.totals(&self.hub, connections).await {
                Ok(t) => (
                    t.rooms,
                    Some(t.nodes),
                    t.connections,
                    linked.then_some("up"),
                ),
                Err(()) => (local.clone(), None, connections, Some("down")),
            };
        all.retain(|(_, members)| *members > 0);
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Counts {
            taken: Instant::now(),
            all,
            local: local.into_iter().collect(),
            nodes,
            connections,
            cluster,
        }
    }

    /// The link to other processes, if any.
    pub fn link(&self) -> Option<Link> {
        self.broker.link()
    }

    /// Broker counters for `/api/stats`.
    pub fn broker_stats(&self) -> Option<serde_json::Value> {
        self.broker.stats_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker whose rooms always have members elsewhere and whose roster never answers.
    struct Stalling;

    impl Broker for Stalling {
        fn join<'a>(
            &'a self,
            hub: &'a Hub,
            req: JoinRequest<'a>,
            _seeding: Seeding,
        ) -> BoxFuture<'a, Result<Joined, JoinError>> {
            let joined = hub.join(&req, crate::core::hub::Start::default());
            if let Ok(j) = &joined {
                j.room.set_remote_members(1);
            }
            Box::pin(std::future::ready(joined))
        }
        fn leave(&self, hub: &Hub, room: &Arc<Room>, id: u64) {
            hub.leave(room, id);
        }
        fn publish<'a>(
            &'a self,
            _: &'a str,
            _: Option<Arc<Room>>,
            _: &'a Publish<'a>,
            _: Fallback,
        ) -> BoxFuture<'a, Result<Published, PublishError>> {
            Box::pin(std::future::ready(Err(PublishError::NoSuchRoom)))
        }
        fn remote<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Remote, ()>> {
            Box::pin(std::future::ready(Ok(Remote::default())))
        }
        fn roster<'a>(
            &'a self,
            _: &'a str,
            _: Option<u64>,
            _: usize,
        ) -> BoxFuture<'a, Result<Vec<UserEntry>, ()>> {
            Box::pin(std::future::pending())
        }
        fn totals<'a>(&'a self, _: &'a Hub, _: u64) -> BoxFuture<'a, Result<Totals, ()>> {
            Box::pin(std::future::ready(Err(())))
        }
        fn link(&self) -> Option<Link> {
            None
        }
        fn stats_json(&self) -> Option<serde_json::Value> {
            None
        }
        fn run(self: Arc<Self>, _: Arc<Hub>, _: Arc<Stats>, _: Shutdown) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn a_join_dropped_while_it_reads_the_roster_leaves_nothing_behind() {
        let stats = Arc::new(Stats::new());
        let hub = Arc::new(Hub::new(4, 16, stats.clone()));
        let bus = Bus::new(hub.clone(), Arc::new(Stalling), stats);
        let user: Arc<str> = "alice".into();
        let req = JoinRequest {
            name: "r",
            id: 1,
            user: &user,
            password: None,
            replay: None,
            grant: None,
        };
        let join = tokio::time::timeout(Duration::from_millis(20), bus.join(req)).await;
        assert!(join.is_err(), "the roster read never ends");
        assert!(
            hub.get("r").is_none(),
            "the member left with the dropped join"
        );
        assert_eq!(hub.room_count(), 0);
    }
}
