//! The Redis link: one task per process that connects (and reconnects, with backoff), keeps the
//! channel subscriptions equal to the rooms with local members, announces this process's counts
//! and presence, heartbeats, and hands every received payload to the local rooms.
//!
//! In cluster mode it also replaces the presence ticker: while Redis is reachable, presence goes
//! through the room channels; while it is not, it is flushed locally as standalone.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use tokio::task::JoinHandle;
use tokio::time::{interval, interval_at, Instant, MissedTickBehavior};

use super::{kept, scripts, wire, Cluster, ClusterError, Interest, ROOMS_PER_CALL, SEQ_TTL_MS};
use crate::core::dedupe::Author;
use crate::core::hub::Hub;
use crate::core::room::{PresenceDelta, Publish, UserEntry};
use crate::core::stats::unix_millis;
use crate::core::stats::Stats;
use crate::proto::Epoch;
use crate::shutdown::Shutdown;

/// This process's side of the link: its rooms and its connection count.
struct Here {
    hub: Arc<Hub>,
    stats: Arc<Stats>,
}

/// First pause between reconnection attempts; doubled after each failure up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most one line per this long about dropped payloads.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
/// On shutdown, time given to remove this process's counts from Redis.
const RETIRE_TIMEOUT: Duration = Duration::from_millis(500);

/// One connection generation: a command connection and a subscriber connection.
struct Link {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
}

/// Aborts the delivery task when the link it belongs to ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the link until shutdown, then removes this process's counts from Redis.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    hub: Arc<Hub>,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) {
    let shared = Arc::new(Here { hub, stats });
    let mut presence = interval(cluster.presence_interval);
    presence.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut backoff = BACKOFF_MIN;
    loop {
        let connecting = connect(&cluster);
        tokio::pin!(connecting);
        let link = loop {
            tokio::select! {
                res = &mut connecting => break res,
                _ = presence.tick() => shared.hub.flush_presence(),
                () = shutdown.recv() => return,
            }
        };
        match link {
            Ok(link) => {
                let started = Instant::now();
                match serve(&shared, &cluster, link, &mut shutdown).await {
                    Ok(()) => {
                        retire(&cluster).await;
                        return;
                    }
                    Err(e) => cluster.set_down(&e),
                }
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(e) => cluster.set_down(&e),
        }
        let pause = tokio::time::sleep(jittered(backoff));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                _ = presence.tick() => shared.hub.flush_presence(),
                () = shutdown.recv() => return,
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `d` ± 20 %, so that processes that lost Redis together do not all come back in step.
fn jittered(d: Duration) -> Duration {
    let r = std::hash::RandomState::new().hash_one(unix_millis()) % 401;
    d.mul_f64(0.8 + r as f64 / 1000.0)
}

async fn connect(cluster: &Cluster) -> Result<Link, ClusterError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cluster.timeout))
        .set_response_timeout(Some(cluster.timeout));
    let conn = cluster
        .timed(
            cluster
                .client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await?;
    let pubsub = cluster.timed(cluster.client.get_async_pubsub()).await?;
    let (sink, stream) = pubsub.split();
    Ok(Link { conn, sink, stream })
}

/// Serves one link generation: `Ok` on shutdown, `Err` when Redis failed.
async fn serve(
    shared: &Arc<Here>,
    cluster: &Arc<Cluster>,
    link: Link,
    shutdown: &mut Shutdown,
) -> Result<(), ClusterError> {
    let Link {
        mut conn,
        mut sink,
        stream,
    } = link;
    // Counted before anything else: other processes read these. The roster is written whole:
    // whatever changed while the link was down (or Redis lost) is in it.
    let mut conns_written = write_counts(shared, cluster, &mut conn).await?;
    cluster.roster.lock().open();
    write_roster(shared, cluster, &mut conn).await?;
    cluster.set_up(conn.clone());
    let mut delivery = AbortOnDrop(tokio::spawn(deliver(
        shared.clone(),
        cluster.clone(),
        stream,
    )));
    let mut subscribed: HashSet<Arc<str>> = HashSet::new();
    let mut presence = interval(cluster.presence_interval);
    presence.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let beat_every = cluster.node_ttl / 3;
    let mut beat = interval_at(Instant::now() + beat_every, beat_every);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    reconcile(shared, cluster, &mut conn, &mut sink, &mut subscribed).await?;
    loop {
        tokio::select! {
            () = shutdown.recv() => return Ok(()),
            _ = &mut delivery.0 => return Err(ClusterError::Down),
            () = cluster.wake.notified() => {
                reconcile(shared, cluster, &mut conn, &mut sink, &mut subscribed).await?;
            }
            _ = presence.tick() => {
                conns_written = sync_presence(shared, cluster, &mut conn, conns_written).await?;
            }
            _ = beat.tick() => {
                conns_written = write_counts(shared, cluster, &mut conn).await?;
                // Subscribed, Redis answers PING with an array: any answer will do.
                cluster.timed(sink.ping::<redis::Value>()).await?;
                refresh_remote_counts(&shared.hub, cluster, &mut conn).await?;
            }
        }
    }
}

/// Hands every payload of the subscriber connection to the local rooms, in arrival order.
/// Ends when the connection does.
async fn deliver(shared: Arc<Here>, cluster: Arc<Cluster>, mut stream: PubSubStream) {
    while let Some(msg) = stream.next().await {
        cluster.on_payload(
            &shared.hub,
            &shared.stats,
            msg.get_channel_name(),
            msg.get_payload_bytes(),
        );
    }
}

impl Cluster {
    /// One payload from a room channel. What does not parse or validate (`wire::decode`) is
    /// dropped and counted, and reaches no member.
    fn on_payload(&self, hub: &Hub, stats: &Stats, channel: &str, payload: &[u8]) {
        let Some(name) = channel.strip_prefix(&self.keys.channel_prefix) else {
            return;
        };
        // Unsubscribed since (the last local member left): nobody here to deliver to.
        let Some(interest) = self.interest(name) else {
            return;
        };
        match wire::decode(payload, self.max_text_bytes) {
            Ok(wire::Payload::Message { seq, epoch, body }) => {
                self.metrics.received.inc();
                let (origin, skip) = if *body.node == *self.node {
                    (body.origin, body.skip_origin)
                } else {
                    (0, false)
                };
                // Under the interest lock, so that a joiner creating the room either sees this
                // seq as the room's start or finds the message delivered (`Cluster::join`).
                let mut state = interest.state.lock();
                state.last_seq = state.last_seq.max(seq);
                if epoch.is_some() {
                    state.epoch = epoch;
                }
                if let Some(room) = hub.get(name) {
                    if let Some(epoch) = epoch {
                        // Redis started a new epoch (it lost the room's numbering).
                        room.enter_epoch(epoch);
                    }
                    let legacy;
                    let author = match body.author.as_deref() {
                        Some(key) => Author::Key(key),
                        None => {
                            legacy = body.legacy_author();
                            Author::Key(&legacy)
                        }
                    };
                    let p = Publish {
                        user: &body.user,
                        text: &body.text,
                        id: body.id.as_deref(),
                        author,
                        origin,
                        skip_origin: skip,
                    };
                    if !room.deliver(seq, body.ts, &p) {
                        self.metrics.stale_dropped.inc();
                    }
                } else if self.history_depth > 0 {
                    // A joiner is creating the room: its ring continues past what Redis kept.
                    let out = kept::frame_of(name, seq, &body);
                    kept::push(&mut state.kept, out, self.history_depth);
                }
            }
            Ok(wire::Payload::Presence(body)) => {
                let remote = {
                    let mut state = interest.state.lock();
                    if *body.node != *self.node && !state.set_remote(&body.node, body.count) {
                        drop(state);
                        self.dropped(stats, channel, &"too many processes claim members");
                        return;
                    }
                    state.remote_sum()
                };
                if let Some(room) = hub.get(name) {
                    room.set_remote_members(remote);
                    // Id 0 where an older process sent names only (checked: all or none).
                    let entries = |names: &[Cow<'_, str>], ids: &[u64]| -> Vec<UserEntry> {
                        let ids = ids.iter().copied().chain(std::iter::repeat(0));
                        names
                            .iter()
                            .zip(ids)
                            .map(|(user, id)| UserEntry {
                                id,
                                user: (**user).into(),
                            })
                            .collect()
                    };
                    room.send_presence(&PresenceDelta {
                        joined: entries(&body.joined, &body.joined_ids),
                        left: entries(&body.left, &body.left_ids),
                        truncated: body.truncated,
                    });
                }
            }
            Err(e) => self.dropped(stats, channel, &e),
        }
    }

    /// Counts a dropped payload; logs it at most once per `DROP_LOG_EVERY`, with the number
    /// dropped since the last line, so that a flood of garbage cannot flood the log.
    fn dropped(&self, stats: &Stats, channel: &str, why: &dyn std::fmt::Display) {
        stats.dropped.redis_payloads_dropped.inc();
        let now = unix_millis();
        let last = self.drop_logged_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < DROP_LOG_EVERY.as_millis() as u64
            || self
                .drop_logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let total = stats.dropped.redis_payloads_dropped.get();
        let since = total.saturating_sub(self.drops_logged.swap(total, Ordering::Relaxed));
        tracing::warn!(
            channel,
            error = %why,
            dropped_since_last_log = since,
            "cluster: payload dropped (did not parse or validate)"
        );
    }
}

/// Makes the subscriptions match the interests: unsubscribes rooms nobody here is in any more,
/// subscribes and seeds the new ones (and, after a reconnection, all of them), then wakes the
/// joiners waiting for them. Loops until nothing changed during a round.
async fn reconcile(
    shared: &Here,
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
    sink: &mut PubSubSink,
    subscribed: &mut HashSet<Arc<str>>,
) -> Result<(), ClusterError> {
    loop {
        let (to_subscribe, to_unsubscribe) = {
            let map = cluster.interests.lock();
            let to_subscribe: Vec<Arc<Interest>> = map
                .values()
                .filter(|e| !e.interest.state.lock().ready)
                .map(|e| e.interest.clone())
                .collect();
            let to_unsubscribe: Vec<Arc<str>> = subscribed
                .iter()
                .filter(|name| !map.contains_key(&***name))
                .cloned()
                .collect();
            (to_subscribe, to_unsubscribe)
        };
        if to_subscribe.is_empty() && to_unsubscribe.is_empty() {
            return Ok(());
        }
        for chunk in to_unsubscribe.chunks(ROOMS_PER_CALL) {
            let channels: Vec<String> = chunk.iter().map(|n| cluster.keys.channel(n)).collect();
            cluster.timed(sink.unsubscribe(channels)).await?;
            for name in chunk {
                subscribed.remove(name);
            }
        }
        for chunk in to_subscribe.chunks(ROOMS_PER_CALL) {
            let channels: Vec<String> = chunk
                .iter()
                .filter(|i| !subscribed.contains(&i.name))
                .map(|i| cluster.keys.channel(&i.name))
                .collect();
            if !channels.is_empty() {
                // Returns once Redis confirmed every channel: from here on, each message
                // published on them reaches this process.
                cluster.timed(sink.subscribe(channels)).await?;
            }
            for interest in chunk {
                subscribed.insert(interest.name.clone());
            }
            seed(shared, cluster, conn, chunk).await?;
            cluster.ready.notify_waiters();
        }
    }
}

/// Reads the seqs (raised to at least ours), kept messages and remote counts of freshly
/// subscribed rooms, and marks them ready. A room that does not exist here yet gets the kept
/// messages as the start of its ring (`kept.rs`).
async fn seed(
    shared: &Here,
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
    interests: &[Arc<Interest>],
) -> Result<(), ClusterError> {
    let hub = &*shared.hub;
    let mut invocation = scripts::SEED.prepare_invoke();
    invocation.arg(SEQ_TTL_MS);
    for interest in interests {
        let local = hub.get(&interest.name).map_or(0, |r| r.last_seq());
        let floor = interest.state.lock().last_seq.max(local);
        invocation
            .key(cluster.keys.seq(&interest.name))
            .key(cluster.keys.hist(&interest.name))
            .key(cluster.keys.epoch(&interest.name))
            .arg(floor);
    }
    invocation
        .arg(cluster.history_depth)
        .arg(Epoch::random().to_string());
    let answer: redis::Value = cluster.timed(invocation.invoke_async(conn)).await?;
    let seeds = kept::parse_seed(answer, interests.len())?;
    let remote = remote_counts(cluster, conn, interests).await?;
    for (interest, (seq, list, epoch)) in interests.iter().zip(seeds) {
        let mut state = interest.state.lock();
        state.last_seq = state.last_seq.max(seq);
        state.epoch = Some(epoch);
        if let Some(room) = hub.get(&interest.name) {
            // After a Redis restart the room may be in a new epoch.
            room.enter_epoch(epoch);
        }
        // Checked under the interest lock, which a joiner creating the room holds.
        if cluster.history_depth > 0 && hub.get(&interest.name).is_none() {
            let kept::FromList {
                frames: fresh,
                out_of_order,
                invalid,
            } = kept::from_list(&interest.name, &list, seq, cluster.max_text_bytes);
            shared.stats.dropped.redis_payloads_dropped.inc_by(invalid);
            if out_of_order > 0 {
                cluster.metrics.kept_out_of_order.inc_by(out_of_order);
                tracing::warn!(
                    room = %interest.name,
                    out_of_order,
                    "cluster: kept messages out of order in Redis were dropped"
                );
            }
            let arrived = std::mem::take(&mut state.kept);
            state.kept = kept::merge(fresh, arrived, cluster.history_depth);
        }
        apply_remote(&mut state, &remote, &interest.name);
        state.ready = true;
        let sum = state.remote_sum();
        drop(state);
        if let Some(room) = hub.get(&interest.name) {
            room.set_remote_members(sum);
        }
    }
    Ok(())
}

/// Node → room → count, for the given rooms, from every other live process.
type RemoteCounts = HashMap<String, HashMap<String, usize>>;

async fn remote_counts(
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
    interests: &[Arc<Interest>],
) -> Result<RemoteCounts, ClusterError> {
    let names: Vec<&str> = interests.iter().map(|i| &*i.name).collect();
    let mut out = RemoteCounts::new();
    for chunk in names.chunks(ROOMS_PER_CALL) {
        for remote in cluster.read_counts_on(conn, chunk).await? {
            out.entry(remote.node).or_default().extend(remote.rooms);
        }
    }
    Ok(out)
}

fn apply_remote(state: &mut super::InterestState, remote: &RemoteCounts, room: &str) {
    state.remote.clear();
    for (node, rooms) in remote {
        if let Some(&n) = rooms.get(room) {
            // Past the cap the rest are left out (set_remote's reason).
            let _ = state.set_remote(node, n);
        }
    }
}

/// Re-reads every room's remote counts (heartbeat): forgets processes that died.
async fn refresh_remote_counts(
    hub: &Hub,
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
) -> Result<(), ClusterError> {
    let interests: Vec<Arc<Interest>> = cluster
        .interests
        .lock()
        .values()
        .map(|e| e.interest.clone())
        .collect();
    let remote = remote_counts(cluster, conn, &interests).await?;
    for interest in &interests {
        let sum = {
            let mut state = interest.state.lock();
            apply_remote(&mut state, &remote, &interest.name);
            state.remote_sum()
        };
        if let Some(room) = hub.get(&interest.name) {
            room.set_remote_members(sum);
        }
    }
    Ok(())
}

/// Re-writes this process's node hash whole (atomically) and refreshes its TTL; returns the
/// connection count written.
async fn write_counts(
    shared: &Here,
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
) -> Result<i64, ClusterError> {
    let key = cluster.keys.node(&cluster.node);
    let conns = shared.stats.connections.get();
    let rooms = shared.hub.list(usize::MAX).0;
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("DEL").arg(&key).ignore();
    pipe.cmd("HSET")
        .arg(&key)
        .arg("!alive")
        .arg(unix_millis())
        .arg("!conns")
        .arg(conns)
        .ignore();
    for chunk in rooms.chunks(1000) {
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for (room, n) in chunk {
            hset.arg(room.name()).arg(*n);
        }
        pipe.add_command(hset).ignore();
    }
    pipe.cmd("PEXPIRE")
        .arg(&key)
        .arg(cluster.node_ttl.as_millis() as u64)
        .ignore();
    pipe.cmd("PEXPIRE")
        .arg(cluster.keys.roster(&cluster.node))
        .arg(cluster.node_ttl.as_millis() as u64)
        .ignore();
    pipe.cmd("SADD")
        .arg(&cluster.keys.nodes)
        .arg(&*cluster.node)
        .ignore();
    cluster.timed(pipe.query_async::<()>(conn)).await?;
    Ok(conns)
}

/// Rewrites this process's roster whole (atomically): every local member of every room, then
/// the key's TTL (renewed by every heartbeat, so a process that dies takes its roster with it).
async fn write_roster(
    shared: &Here,
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
) -> Result<(), ClusterError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    add_whole_roster(&mut pipe, shared, cluster);
    cluster.timed(pipe.query_async::<()>(conn)).await
}

/// The commands that replace this process's roster with every local membership now.
fn add_whole_roster(pipe: &mut redis::Pipeline, shared: &Here, cluster: &Cluster) {
    let key = cluster.keys.roster(&cluster.node);
    pipe.cmd("DEL").arg(&key).ignore();
    for (room, _) in shared.hub.list(usize::MAX).0 {
        let members = room.users_page(None, usize::MAX);
        for chunk in members.chunks(1000) {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&key);
            for m in chunk {
                zadd.arg(0)
                    .arg(wire::roster_entry(room.name(), m.id, &m.user));
            }
            pipe.add_command(zadd).ignore();
        }
    }
    pipe.cmd("PEXPIRE")
        .arg(&key)
        .arg(cluster.node_ttl.as_millis() as u64)
        .ignore();
}

/// The roster changes of the last interval (or, past the queue's bound, the whole roster again),
/// written before the presence that announces them: a process that hears of a join can read the
/// member in Redis.
fn add_roster_changes(pipe: &mut redis::Pipeline, shared: &Here, cluster: &Cluster) {
    let (changes, overflow) = cluster.roster.lock().take();
    if overflow {
        add_whole_roster(pipe, shared, cluster);
        return;
    }
    if changes.is_empty() {
        return;
    }
    let key = cluster.keys.roster(&cluster.node);
    // In order: a join and a leave of one member in one interval must end with the leave.
    for change in changes {
        match change {
            super::RosterChange::Add(entry) => pipe.cmd("ZADD").arg(&key).arg(0).arg(entry),
            super::RosterChange::Remove(entry) => pipe.cmd("ZREM").arg(&key).arg(entry),
        }
        .ignore();
    }
    pipe.cmd("PEXPIRE")
        .arg(&key)
        .arg(cluster.node_ttl.as_millis() as u64)
        .ignore();
}

/// Announces the joins and leaves of the last presence interval on the rooms' channels (every
/// process, this one included, turns them into presence frames on receipt) and updates this
/// process's counts and roster. Returns the connection count written.
async fn sync_presence(
    shared: &Here,
    cluster: &Cluster,
    conn: &mut MultiplexedConnection,
    conns_written: i64,
) -> Result<i64, ClusterError> {
    let rooms = shared.hub.take_presence_queue();
    let conns = shared.stats.connections.get();
    if rooms.is_empty() && conns == conns_written && !cluster.roster.lock().pending() {
        return Ok(conns);
    }
    let key = cluster.keys.node(&cluster.node);
    let mut pipe = redis::pipe();
    add_roster_changes(&mut pipe, shared, cluster);
    let mut announced = Vec::with_capacity(rooms.len());
    for room in rooms {
        let Some(delta) = room.take_presence() else {
            continue;
        };
        let count = shared.hub.get(room.name()).map_or(0, |r| r.member_count());
        if count > 0 {
            pipe.cmd("HSET")
                .arg(&key)
                .arg(room.name())
                .arg(count)
                .ignore();
        } else {
            pipe.cmd("HDEL").arg(&key).arg(room.name()).ignore();
        }
        let payload = wire::encode_presence(&wire::PresenceBody {
            node: Cow::Borrowed(&cluster.node),
            count,
            joined: delta
                .joined
                .iter()
                .map(|u| Cow::Borrowed(&*u.user))
                .collect(),
            left: delta.left.iter().map(|u| Cow::Borrowed(&*u.user)).collect(),
            truncated: delta.truncated,
            joined_ids: delta.joined.iter().map(|u| u.id).collect(),
            left_ids: delta.left.iter().map(|u| u.id).collect(),
        });
        pipe.cmd("PUBLISH")
            .arg(cluster.keys.channel(room.name()))
            .arg(payload)
            .ignore();
        announced.push((room, delta));
    }
    pipe.cmd("HSET").arg(&key).arg("!conns").arg(conns).ignore();
    pipe.cmd("PEXPIRE")
        .arg(&key)
        .arg(cluster.node_ttl.as_millis() as u64)
        .ignore();
    match cluster.timed(pipe.query_async::<()>(conn)).await {
        Ok(()) => Ok(conns),
        Err(e) => {
            // Local members still hear about each other.
            for (room, delta) in announced {
                room.send_presence(&delta);
            }
            Err(e)
        }
    }
}

/// On shutdown: removes this process's counts at once rather than after their TTL.
async fn retire(cluster: &Cluster) {
    let Ok(mut conn) = cluster.connection() else {
        return;
    };
    let mut pipe = redis::pipe();
    pipe.cmd("DEL")
        .arg(cluster.keys.node(&cluster.node))
        .arg(cluster.keys.roster(&cluster.node))
        .ignore();
    pipe.cmd("SREM")
        .arg(&cluster.keys.nodes)
        .arg(&*cluster.node)
        .ignore();
    let _ = tokio::time::timeout(RETIRE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
}
