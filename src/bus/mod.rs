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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use crate::core::hub::JoinRequest;
use crate::core::hub::{Hub, JoinError};
use crate::core::room::{Joined, Publish, Published, Room, RoomInfo};
use crate::core::stats::Stats;
use crate::proto::names::LOBBY;
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

/// One implementation of where rooms live. Methods take the process's `Hub`, which holds the
/// local copy of every room with a local member.
pub trait Broker: Send + Sync + 'static {
    /// Joins a chat room (never `$lobby`) in `hub`, with admission and replay atomic with the
    /// subscription. Cancel-safe: dropped early, it leaves nothing behind.
    fn join<'a>(
        &'a self,
        hub: &'a Hub,
        req: JoinRequest<'a>,
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

/// The rooms of this server, wherever they live.
pub struct Bus {
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    stats: Arc<Stats>,
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
}

/// `/api/stats`'s view of every process together.
pub struct StatsView {
    pub nodes: Option<usize>,
    pub connections: u64,
    pub rooms: usize,
}

impl Bus {
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>, stats: Arc<Stats>) -> Self {
        Bus { hub, broker, stats }
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

    /// Joins a room (`$lobby` included). Cancel-safe.
    pub async fn join(&self, req: JoinRequest<'_>) -> Result<Joined, JoinError> {
        // The lobby is each process's own: never a broker's room.
        if req.name == LOBBY {
            return Ok(self.hub.lobby().join(req.id, req.user, req.replay));
        }
        self.broker.join(&self.hub, req).await
    }

    /// Leaves a room joined through `join`.
    pub fn leave(&self, room: &Arc<Room>, id: u64) {
        if self.hub.lobby().is(room) {
            self.hub.lobby().leave(id);
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

    /// A room's figures with one page of its users (this process's users). `None`: no process
    /// has a member in it.
    pub async fn room_info(
        &self,
        name: &str,
        users_limit: usize,
        users_after: Option<u64>,
    ) -> Option<RoomInfo> {
        let local = self.hub.get(name);
        let remote = self.broker.remote(name).await.unwrap_or_default();
        let mut info = match &local {
            Some(room) => room.info(users_limit, users_after),
            None if remote.members > 0 => {
                let settings = self.hub.settings().resolve(name);
                RoomInfo::elsewhere(name, &settings)
            }
            None => return None,
        };
        info.members = info.members.saturating_add(remote.members);
        info.last_seq = info.last_seq.max(remote.last_seq);
        Some(info)
    }

    /// Rooms with members anywhere, largest first, at most `limit`.
    pub async fn rooms(&self, limit: usize) -> RoomList {
        let (local, _) = self.hub.list(usize::MAX);
        let local: Vec<(String, usize)> = local
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        let (mut all, cluster) = match self.broker.link() {
            None => (local.clone(), None),
            Some(_) => match self.broker.totals(&self.hub, 0).await {
                Ok(totals) => (totals.rooms, Some("up")),
                Err(()) => (local.clone(), Some("down")),
            },
        };
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let total = all.len();
        let local: std::collections::HashMap<String, usize> = local.into_iter().collect();
        let rooms = all
            .into_iter()
            .take(limit)
            .map(|(room, members)| RoomCount {
                local_members: local.get(&room).copied().unwrap_or(0),
                room,
                members,
            })
            .collect();
        RoomList {
            rooms,
            total,
            cluster,
        }
    }

    /// Connections, rooms and processes, every process together where the broker can tell.
    pub async fn totals(&self) -> StatsView {
        let connections = self.stats.connections.get().max(0) as u64;
        match self.broker.totals(&self.hub, connections).await {
            Ok(t) => StatsView {
                nodes: Some(t.nodes),
                connections: t.connections,
                rooms: t.rooms.iter().filter(|(_, n)| *n > 0).count(),
            },
            Err(()) => StatsView {
                nodes: None,
                connections,
                rooms: self.hub.room_count(),
            },
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
