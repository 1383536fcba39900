//! One Server-Sent Events stream's life: the rooms it was admitted to (before the 200), their
//! frames as events, heartbeats, the token's expiry, eviction and the shutdown drain.
//!
//! The stream is the response body. hyper's task for the HTTP connection polls it, so one task
//! owns the whole connection (no second task, no channel between them), and a client that stops
//! reading simply stops being polled: its room receivers fall behind (evicted like a WebSocket
//! member, `--lag-policy`), or hyper's write stalls past `--write-timeout` (the connection is
//! dropped and `StreamNote` tells the stream it was evicted). Whichever way the body goes, its
//! drop leaves the rooms.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use smallvec::SmallVec;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{sleep_until, Instant};

use super::membership::{recv_any, Batch, Membership};
use super::{ConnectionGuard, Context, MAX_BATCH};
use crate::config::LagPolicy;
use crate::core::auth::Grant;
use crate::core::room::Joined;
use crate::core::stats::AuthReason;
use crate::proto::sse::{self, composite_id, event_id};
use crate::proto::{frame_payload, Epoch, Outbound};
use crate::shutdown::{Shutdown, Turn};

/// What the HTTP layer and the accept loop tell each other about one TCP connection that may
/// carry a stream: shared through the request's extensions.
#[derive(Debug, Default)]
pub struct StreamNote {
    /// A stream is being served: at shutdown the accept loop waits for it to end (at its turn
    /// in the drain) instead of giving the connection one second.
    streaming: AtomicBool,
    /// hyper gave up on the connection because the client took no byte within
    /// `--write-timeout`: the stream, dropped next, counts itself evicted.
    write_timed_out: AtomicBool,
}

impl StreamNote {
    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    pub fn mark_write_timed_out(&self) {
        self.write_timed_out.store(true, Ordering::Relaxed);
    }
}

/// A stream admitted by the HTTP layer: its rooms already joined (welcome and replay taken with
/// each join), the connection already counted.
pub(crate) struct Start {
    pub(crate) cx: Arc<Context>,
    pub(crate) id: u64,
    /// In the order the request named them; that is the order of the composite id.
    pub(crate) joined: Vec<Joined>,
    pub(crate) grant: Option<Arc<Grant>>,
    pub(crate) guard: ConnectionGuard,
    /// `--sse-heartbeat`.
    pub(crate) heartbeat: Duration,
    pub(crate) note: Option<Arc<StreamNote>>,
}

/// The events of one stream, as the response body polls them. Never fails; ends after the
/// server's `close` event.
pub struct Events(Pin<Box<dyn Stream<Item = Bytes> + Send>>);

impl Stream for Events {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Bytes>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// The stream of an admitted request: the welcomes and replays first, then live frames.
pub(crate) fn events(start: Start) -> Events {
    let feed = Box::new(Feed::new(start));
    Events(Box::pin(futures_util::stream::unfold(
        feed,
        |mut feed| async move {
            let chunk = feed.next().await?;
            Some((chunk, feed))
        },
    )))
}

/// Everything one stream owns. Boxed, so that each event moves a pointer, not the state.
struct Feed {
    cx: Arc<Context>,
    id: u64,
    rooms: SmallVec<[Membership; 1]>,
    /// Each room's position: the seq of the last message queued (or, before any, the position
    /// the stream started from). The id of every event is made from these.
    positions: SmallVec<[(Epoch, u64); 1]>,
    grant: Option<Arc<Grant>>,
    shutdown: Shutdown,
    heartbeat: Duration,
    /// When a heartbeat is due: `heartbeat` after the last bytes handed to hyper.
    next_beat: Instant,
    /// Events ready to go, oldest first. Emptied (and its buffer freed) between bursts.
    queue: VecDeque<Bytes>,
    /// The `close` event is queued: the stream ends once the queue is empty.
    done: bool,
    note: Option<Arc<StreamNote>>,
    /// Dropped with the stream, whichever way it ends.
    _guard: ConnectionGuard,
}

impl Feed {
    fn new(start: Start) -> Feed {
        let Start {
            cx,
            id,
            joined,
            grant,
            guard,
            heartbeat,
            note,
        } = start;
        if let Some(note) = &note {
            note.streaming.store(true, Ordering::Relaxed);
        }
        cx.stats.sse.streams.inc();
        let mut feed = Feed {
            id,
            rooms: SmallVec::new(),
            positions: SmallVec::new(),
            grant,
            shutdown: cx.shutdown.clone(),
            heartbeat,
            next_beat: Instant::now() + heartbeat,
            queue: VecDeque::new(),
            done: false,
            note,
            cx,
            _guard: guard,
        };
        // Every position first: each welcome's id names every room.
        let mut starts = Vec::with_capacity(joined.len());
        for j in joined {
            // A replay's first message comes next, so the stream stands just before it.
            let start = j
                .replay
                .as_ref()
                .and_then(|r| r.frames.first())
                .map_or(j.last_seq, |o| o.seq.saturating_sub(1));
            feed.positions.push((j.room.epoch(), start));
            starts.push((j.welcome.encode(), j.replay));
            feed.rooms.push(Membership::new(j.room, j.rx, j.last_seq));
        }
        for (i, (welcome, replay)) in starts.into_iter().enumerate() {
            let id = feed.current_id();
            feed.queue
                .push_back(sse::event(Some(&id), "welcome", frame_payload(&welcome)));
            let Some(replay) = replay else { continue };
            if let Some(head) = replay_head(&replay.header) {
                feed.queue.push_back(head);
            }
            for out in &replay.frames {
                feed.push_frame(i, out);
            }
        }
        feed
    }

    /// The next bytes for the body; `None` ends it. Cancel-safe: every wait in it loses nothing
    /// when dropped (the body is dropped mid-wait whenever the client goes).
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.queue.pop_front() {
                if self.queue.is_empty() && self.queue.capacity() > 8 {
                    self.queue = VecDeque::new();
                }
                self.next_beat = Instant::now() + self.heartbeat;
                return Some(chunk);
            }
            if self.done {
                return None;
            }
            let wake = self.next_wake();
            tokio::select! {
                turn = self.shutdown.turn() => self.restart(turn),
                (index, res) = recv_any(&mut self.rooms) => self.on_room_frame(index, res),
                () = sleep_until(wake) => self.on_timer(),
            }
        }
    }

    /// The next heartbeat, or the token's expiry when that comes first.
    fn next_wake(&self) -> Instant {
        match &self.grant {
            Some(grant) => self.next_beat.min(Instant::now() + grant.expires_in()),
            None => self.next_beat,
        }
    }

    fn on_timer(&mut self) {
        if self.grant.as_ref().is_some_and(|g| g.expired()) {
            self.cx.stats.auth_refused.inc(AuthReason::SocketExpired);
            self.finish(None, serde_json::json!({"code": "token_expired"}));
            return;
        }
        if Instant::now() >= self.next_beat {
            self.queue.push_back(Bytes::from_static(sse::HEARTBEAT));
        }
    }

    /// The drain gave this stream its turn: `retry:` asks `EventSource` to come back after the
    /// same spread delay a WebSocket gets in its close reason.
    fn restart(&mut self, turn: Turn) {
        if turn == Turn::Late {
            self.cx.stats.shutdown_late_closes.inc();
        }
        let ms = self.shutdown.retry_after_ms(self.id);
        self.finish(
            Some(ms),
            serde_json::json!({"code": "restart", "retry_after_ms": ms}),
        );
    }

    /// Queues the last event and leaves every room at once (the body may take a while to go).
    fn finish(&mut self, retry_ms: Option<u64>, data: serde_json::Value) {
        self.queue.push_back(sse::close_event(retry_ms, &data));
        self.done = true;
        self.leave_all();
    }

    /// Handles what `recv_any` produced, then whatever else is already queued in any room (up
    /// to `MAX_BATCH`), as `conn::deliver` does for a socket.
    fn on_room_frame(&mut self, index: usize, first: Result<Arc<Outbound>, RecvError>) {
        let mut batch = Batch::new();
        let resync = self.cx.limits.lag_policy == LagPolicy::Resync;
        let stats = self.cx.stats.clone();
        match first {
            Ok(out) => {
                if let Some(m) = self.rooms.get_mut(index) {
                    m.accept(index, out, self.id, &mut batch, &stats);
                }
            }
            Err(RecvError::Lagged(_)) if resync => {
                if let Some(m) = self.rooms.get_mut(index) {
                    m.lagged();
                }
            }
            Err(RecvError::Lagged(_)) => return self.evict(index),
            // The room's sender lives in the Room we hold: it cannot close while we are in it.
            Err(RecvError::Closed) => {
                return self.finish(None, serde_json::json!({"code": "room_closed"}))
            }
        }
        let mut evict = None;
        'rooms: for (i, m) in self.rooms.iter_mut().enumerate() {
            while batch.len() < MAX_BATCH {
                match m.rx.try_recv() {
                    Ok(out) => m.accept(i, out, self.id, &mut batch, &stats),
                    Err(TryRecvError::Lagged(_)) if resync => m.lagged(),
                    Err(TryRecvError::Lagged(_)) => {
                        evict = Some(i);
                        break 'rooms;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => continue 'rooms,
                }
            }
            break;
        }
        if let Some(i) = evict {
            return self.evict(i);
        }
        if batch.is_empty() {
            return;
        }
        stats.frames_out.inc_by(batch.len() as u64);
        stats.writes.inc();
        let now = std::time::Instant::now();
        let mut seen: SmallVec<[usize; 4]> = SmallVec::new();
        for (i, out) in &batch {
            if !seen.contains(i) {
                seen.push(*i);
                self.rooms[*i].room.record_wait(out.published_at, now);
            }
            self.push_frame(*i, out);
        }
    }

    /// Queues a room frame's event, with the stream's id when it is a message. One room: the
    /// frame's shared event as it is (its id is the room's position). Several: the composite
    /// id, then the shared event less its own id line.
    fn push_frame(&mut self, i: usize, out: &Outbound) {
        // Every room index has its position: both are pushed together at the stream's start.
        let Some(&(epoch, _)) = self.positions.get(i) else {
            return;
        };
        let (event, encoded) = out.sse_event(epoch);
        if encoded {
            self.cx.stats.sse.events_encoded.inc();
        }
        if out.seq == 0 {
            self.queue.push_back(event.clone());
            return;
        }
        if let Some(p) = self.positions.get_mut(i) {
            p.1 = out.seq;
        }
        if self.rooms.len() == 1 {
            self.queue.push_back(event.clone());
        } else {
            self.queue.push_back(sse::id_line(&self.current_id()));
            self.queue.push_back(sse::without_id(event));
        }
    }

    /// The id of the stream's position now.
    fn current_id(&self) -> String {
        match self.positions.as_slice() {
            [(epoch, seq)] => event_id(*epoch, *seq),
            many => composite_id(
                self.rooms
                    .iter()
                    .zip(many)
                    .map(|(m, (epoch, seq))| (m.room.name(), *epoch, *seq)),
            ),
        }
    }

    /// A slow consumer: its receiver fell a ring behind (or its bytes stalled, see `Drop`).
    fn evict(&mut self, index: usize) {
        self.count_eviction(index);
        self.finish(None, serde_json::json!({"code": "slow_consumer"}));
    }

    fn count_eviction(&self, index: usize) {
        if let Some(m) = self.rooms.get(index) {
            m.room.record_eviction();
        }
        self.cx.stats.sse.evictions.inc();
    }

    fn leave_all(&mut self) {
        for m in self.rooms.drain(..) {
            self.cx.bus.leave(&m.room, self.id);
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let stalled = self
            .note
            .as_ref()
            .is_some_and(|n| n.write_timed_out.load(Ordering::Relaxed));
        if stalled && !self.done {
            self.count_eviction(0);
        }
        self.leave_all();
        self.cx.stats.sse.streams.dec();
    }
}

/// The event that announces a replay: `history` for `?history=`, nothing for a recovery that
/// misses nothing (the messages simply follow), `reset` for one that cannot (the position is
/// older than what the room keeps, or the room's numbering restarted): the client should
/// reload what it shows; the messages still kept follow.
fn replay_head(header: &[u8]) -> Option<Bytes> {
    let payload = frame_payload(header);
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match (v["type"].as_str(), v["complete"].as_bool()) {
        (Some("history"), _) => Some(sse::event(None, "history", payload)),
        (Some("recovery"), Some(true)) => None,
        _ => Some(sse::event(None, "reset", payload)),
    }
}
