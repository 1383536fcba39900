//! The broker of a process that runs alone: every room lives in this process's `Hub`, and a
//! publish is numbered and broadcast right here.

use std::sync::Arc;

use super::{BoxFuture, Broker, Fallback, JoinRequest, Link, PublishError, Remote, Totals};
use crate::core::archive::Seeding;
use crate::core::hub::{Hub, JoinError, Start};
use crate::core::room::{Joined, Publish, Published, Room, UserEntry};
use crate::core::stats::Stats;
use crate::shutdown::Shutdown;

pub struct Local {
    /// `--presence-interval`: how often coalesced presence frames go out.
    presence_interval: std::time::Duration,
}

impl Local {
    pub fn new(presence_interval: std::time::Duration) -> Self {
        Local { presence_interval }
    }
}

impl Broker for Local {
    fn join<'a>(
        &'a self,
        hub: &'a Hub,
        req: JoinRequest<'a>,
        seeding: Seeding,
    ) -> BoxFuture<'a, Result<Joined, JoinError>> {
        let start = Start {
            seeding,
            ..Start::default()
        };
        let joined = hub.join(&req, start);
        Box::pin(std::future::ready(joined))
    }

    fn leave(&self, hub: &Hub, room: &Arc<Room>, id: u64) {
        hub.leave(room, id);
    }

    fn publish<'a>(
        &'a self,
        _name: &'a str,
        local: Option<Arc<Room>>,
        p: &'a Publish<'a>,
        _fallback: Fallback,
    ) -> BoxFuture<'a, Result<Published, PublishError>> {
        let published = match local {
            // A room that closed after it was looked up answers like one that was never there.
            Some(room) => room.publish_message(p).ok_or(PublishError::NoSuchRoom),
            None => Err(PublishError::NoSuchRoom),
        };
        Box::pin(std::future::ready(published))
    }

    fn roster<'a>(
        &'a self,
        _name: &'a str,
        _after: Option<u64>,
        _n: usize,
    ) -> BoxFuture<'a, Result<Vec<UserEntry>, ()>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn remote<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Remote, ()>> {
        Box::pin(std::future::ready(Ok(Remote::default())))
    }

    fn totals<'a>(&'a self, hub: &'a Hub, connections: u64) -> BoxFuture<'a, Result<Totals, ()>> {
        let rooms = hub
            .list(usize::MAX)
            .0
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        Box::pin(std::future::ready(Ok(Totals {
            nodes: 1,
            connections,
            rooms,
        })))
    }

    fn link(&self) -> Option<Link> {
        None
    }

    fn stats_json(&self) -> Option<serde_json::Value> {
        None
    }

    /// Flushes coalesced presence every `--presence-interval` until shutdown.
    fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        _stats: Arc<Stats>,
        mut shutdown: Shutdown,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut tick = tokio::time::interval(self.presence_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => hub.flush_presence(),
                    () = shutdown.recv() => return,
                }
            }
        })
    }
}
