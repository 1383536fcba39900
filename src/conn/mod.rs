//! One WebSocket connection's whole life, owned by one task: completing the upgrade, waiting
//! for input, room frames, pings and shutdown, and closing with a precise code. What happens in
//! between lives beside it: `read` (frames in), `handle` (the chat protocol), `deliver` (room
//! frames out).

mod deliver;
mod end;
mod handle;
mod membership;
mod read;
pub mod sse;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fastwebsockets::upgrade::UpgradeFut;
use fastwebsockets::OpCode;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::Bus;
use crate::config::rate::RateSpec;
use crate::config::LagPolicy;
use crate::core::auth::{Grant, Verifier};
use crate::core::limit::{ConnectionLimiter, PerIpLimit};
use crate::core::lockout::Lockout;
use crate::core::room::Joined;
use crate::core::stats::{AuthReason, Stats};
use crate::proto;
use crate::proto::close;
use crate::shutdown::{Shutdown, Turn, Wake};
use crate::wheel::Alarm;
use crate::ws::deflate::Agreed;
use crate::ws::io::TimedStream;
use crate::ws::write::{at_frame_boundary, total_len, write_now, write_rest};
use end::{End, Handled, Refusal};
use membership::{recv_any, Membership};

/// The bounds every connection applies (from the flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `--max-message-bytes`: past it, close 1009.
    pub max_message_bytes: usize,
    /// `--ping-interval`: silent for two of them, close 1008.
    pub ping_interval: Duration,
    /// `--write-timeout`: a write that takes longer evicts (1008).
    pub write_timeout: Duration,
    /// `--lag-policy`.
    pub lag_policy: LagPolicy,
    /// `--max-rooms-per-connection`.
    pub max_rooms: usize,
    /// `--rate-limit` on the messages (and pings, pongs, continuation fragments) one socket
    /// sends.
    pub rate: Option<RateSpec>,
    /// `--idle-timeout`: a socket in no room for this long is closed (4002); `None`: never.
    pub idle_timeout: Option<Duration>,
    /// `--message-timeout`: a frame, and a fragmented message, must arrive whole within this
    /// from its first byte (1008 `message timeout`).
    pub message_timeout: Duration,
    /// `--compression on`: permessage-deflate is negotiated with clients that offer it, and
    /// room messages of at least this many payload bytes (`--compression-min-bytes`) go to them
    /// compressed. `None`: never negotiated.
    pub compression: Option<usize>,
}

/// What every connection task shares.
pub struct Context {
    pub bus: Arc<Bus>,
    pub stats: Arc<Stats>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    /// `--max-connections-per-ip`, when set.
    pub per_ip: Option<PerIpLimit>,
    /// `--jwt-secret`, when set: checks the tokens a socket sends to `refresh` its grant.
    pub verifier: Option<Arc<Verifier>>,
    /// Failed passwords and tokens per address and room; shared with the HTTP side.
    pub lockout: Arc<Lockout>,
    /// Never sent on: the shutdown sequence waits until every copy of the context (one per
    /// live task) has been dropped, which closes this channel.
    _alive: mpsc::Sender<()>,
}

impl Context {
    pub fn new(
        bus: Arc<Bus>,
        stats: Arc<Stats>,
        limits: Limits,
        shutdown: Shutdown,
        per_ip: Option<PerIpLimit>,
        (verifier, lockout): (Option<Arc<Verifier>>, Arc<Lockout>),
        alive: mpsc::Sender<()>,
    ) -> Self {
        Context {
            bus,
            stats,
            limits,
            shutdown,
            per_ip,
            verifier,
            lockout,
            _alive: alive,
        }
    }
}

/// Most room frames gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// Bytes asked of the kernel per read. The buffer exists only while bytes are in flight.
const READ_CHUNK: usize = 4096;
/// How long a closing socket is given to answer our close frame.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a socket is for.
pub enum Mode {
    /// The chat protocol, with the first room (if the upgrade named one) already joined before
    /// the 101, so that a refused join could still be an HTTP status; the past messages its URL
    /// asked for (`history`/`since`) were taken with the join and are written after the welcome.
    /// `grant` is the verified access token when `--jwt-secret` is set; later joins are checked
    /// against it.
    Rooms {
        first: Option<Joined>,
        grant: Option<Arc<Grant>>,
    },
    /// Echo every message back exactly (`--echo`, for conformance testing only).
    Echo,
}

impl Mode {
    /// Gives back a membership taken before the upgrade when the socket never arrives.
    pub fn abandon(self, cx: &Context, id: u64) {
        if let Mode::Rooms { first: Some(j), .. } = self {
            cx.bus.leave(&j.room, id);
        }
    }
}

/// Gives back what an accepted upgrade holds (the connection gauge and the per-IP count) when
/// its task ends, or never starts.
pub(crate) struct ConnectionGuard {
    /// `None` once a `Connection` took the duty over (`disarm`).
    pub(crate) cx: Option<Arc<Context>>,
    pub(crate) ip: Option<IpAddr>,
}

impl ConnectionGuard {
    /// Hands the duty to whoever holds a context already (a `Connection`, which then gives
    /// back through `release` itself): one pointer less in every connection.
    fn disarm(mut self) -> Option<IpAddr> {
        self.cx = None;
        self.ip
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(cx) = &self.cx {
            release(cx, self.ip);
        }
    }
}

fn release(cx: &Context, ip: Option<IpAddr>) {
    cx.stats.connections.dec();
    if let (Some(ip), Some(per_ip)) = (ip, &cx.per_ip) {
        per_ip.release(ip);
    }
}

/// What the HTTP layer hands over with an accepted upgrade (the 101 is on its way).
pub(crate) struct Accepted {
    pub(crate) cx: Arc<Context>,
    /// Completes once hyper has written the 101 and let go of the socket.
    pub(crate) upgrade: UpgradeFut,
    pub(crate) id: u64,
    pub(crate) user: Arc<str>,
    pub(crate) mode: Mode,
    pub(crate) guard: ConnectionGuard,
    /// permessage-deflate, when the 101 agreed to it.
    pub(crate) deflate: Option<Agreed>,
}

/// A fragmented message between its first frame and its last.
struct Partial {
    /// The first frame's: text or binary.
    opcode: OpCode,
    buf: BytesMut,
    /// When its first frame arrived: the whole message is due `--message-timeout` later.
    started: Instant,
    /// A fragment was refused by `--rate-limit`: the rest is read and dropped.
    refused: bool,
    /// RSV1 on the first frame: `buf` is deflated, and inflated once the message is whole.
    compressed: bool,
}

/// Everything one connection owns. Dropped when the task ends; `leave_all` runs before.
pub struct Connection {
    id: u64,
    user: Arc<str>,
    cx: Arc<Context>,
    /// One owner for both directions: reads and writes go through `&TcpStream` and readiness,
    /// so neither holds a buffer or a future while the socket is idle (and no `Arc` is needed
    /// to split it).
    stream: TcpStream,
    /// Bytes read but not yet taken as frames. Holds no allocation except while a frame is only
    /// partly in.
    /// Boxed: 8 bytes in every idle connection rather than 32, for an allocation that exists
    /// only while bytes are in.
    inbuf: Option<Box<BytesMut>>,
    rooms: SmallVec<[Membership; 1]>,
    /// A fragmented message being reassembled. Boxed (as is `limiter`) because it is rare and
    /// every idle connection would carry its space.
    partial: Option<Box<Partial>>,
    echo: bool,
    /// permessage-deflate, when negotiated: a few bytes; the codec's state is per thread and
    /// per message, never per socket.
    deflate: Option<Agreed>,
    grant: Option<Arc<Grant>>,
    /// `--rate-limit` on the messages this socket sends.
    limiter: Option<Box<ConnectionLimiter>>,
    /// What `ConnectionGuard` held: given back (with the gauge) when the connection is
    /// dropped, whichever way it ends.
    ip: Option<IpAddr>,
    /// When `serve`'s wait wakes for the next deadline: an entry in the shared wheel rather
    /// than a timer in every task (see `wheel`).
    alarm: Alarm,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.cx.shutdown.forget(self.id, &mut self.alarm);
        release(&self.cx, self.ip);
    }
}

/// Runs an accepted upgrade to its end: completes the upgrade, enters the first room, serves,
/// closes. The task's future is sized by its largest state and an idle connection sits in
/// `serve`'s wait for its whole life, so every step that is not that wait (the upgrade, the
/// first welcome and replay, handling a message, closing) runs in a boxed future that exists
/// only while the step does. `accepted` is boxed for the same reason: an async fn keeps its
/// arguments for its whole life.
pub(crate) async fn run(accepted: Box<Accepted>) {
    let Some((mut conn, end)) = Box::pin(open(accepted)).await else {
        return;
    };
    let end = match end {
        Some(end) => end,
        None => conn.serve().await,
    };
    Box::pin(conn.finish(end)).await;
}

impl Connection {
    /// Leaves every room and closes as `end` says.
    async fn finish(mut self, end: End) {
        let end = match end {
            End::Restart(turn) => self.deliver_pending().await.unwrap_or(End::Restart(turn)),
            end => end,
        };
        self.leave_all();
        match end {
            End::Close(code, reason) => self.close(code, reason).await,
            End::Restart(turn) => {
                if turn == Turn::Late {
                    self.cx.stats.shutdown_late_closes.inc();
                }
                let reason = close::restart_reason(self.cx.shutdown.retry_after_ms(self.id));
                self.close(close::SERVICE_RESTART, &reason).await;
            }
            End::Gone => {}
        }
    }
}

/// Waits for the upgrade, takes the TCP stream out of hyper and enters the first room (if the
/// upgrade named one). `None`: the socket never arrived. `Some((_, Some(end)))`: entering
/// failed and the connection ends at once.
async fn open(accepted: Box<Accepted>) -> Option<(Connection, Option<End>)> {
    let Accepted {
        cx,
        upgrade,
        id,
        user,
        mode,
        guard,
        deflate,
    } = *accepted;
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            mode.abandon(&cx, id);
            return None;
        }
    };
    let parts = match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TimedStream>>()
    {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            mode.abandon(&cx, id);
            return None;
        }
    };
    // What hyper read past the request (rarely anything) is the start of the first frame.
    // hyper hands it over as a freeze of its whole read buffer: copy just these bytes.
    let inbuf = (!parts.read_buf.is_empty()).then(|| Box::new(BytesMut::from(&parts.read_buf[..])));
    let stream = parts.io.into_inner().into_inner();

    let (first, echo, grant) = match mode {
        Mode::Rooms { first, grant } => (first, false, grant),
        Mode::Echo => (None, true, None),
    };
    // Echo mode is for conformance runs, which send as fast as they can.
    let limiter = if echo {
        None
    } else {
        cx.limits
            .rate
            .map(|spec| Box::new(ConnectionLimiter::new(spec)))
    };
    let mut conn = Connection {
        id,
        user,
        cx,
        stream,
        inbuf,
        rooms: SmallVec::new(),
        partial: None,
        echo,
        deflate,
        grant,
        limiter,
        ip: guard.disarm(),
        alarm: Alarm::NONE,
    };
    let end = match first {
        Some(joined) => conn.enter(joined).await.err().map(|e| match e {
            Refusal::Reply(_) => End::Close(close::INTERNAL, "could not join the room"),
            Refusal::End(end) => end,
        }),
        None => None,
    };
    Some((conn, end))
}

/// What woke `serve`'s wait.
enum Step {
    Readable,
    Room(
        usize,
        Result<Arc<proto::Outbound>, tokio::sync::broadcast::error::RecvError>,
    ),
    Timer,
}

/// A moment as nanoseconds after a fixed one: 8 bytes where an `Instant` takes 16, for the
/// time of the last read, which `serve` keeps for the whole life of every idle connection.
#[derive(Clone, Copy)]
struct Stamp(u64);

impl Stamp {
    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    fn now() -> Self {
        Self::at(Instant::now())
    }

    fn at(t: Instant) -> Self {
        let nanos = t.saturating_duration_since(Self::base()).as_nanos();
        Stamp(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn get(self) -> Instant {
        Self::base() + Duration::from_nanos(self.0)
    }
}

/// Marks a clock of [`Clocks`] that is not running.
const STOPPED: u32 = u32::MAX;

/// Where the deadlines that depend on what the client did start from, kept by `serve` as ages
/// in milliseconds before the last read (`last_seen`), or `STOPPED`. Both clocks start at a read
/// (or when serving starts), so neither is ever later than it. Ages rather than two `Instant`s
/// because this sits in every idle connection's task: 8 bytes instead of 32.
#[derive(Clone, Copy)]
struct Clocks {
    /// How long the socket has been in no room (`--idle-timeout`).
    idle: u32,
    /// How long `inbuf` has held the same partial frame (`--message-timeout`).
    frame: u32,
}

impl Clocks {
    const ALL_STOPPED: Clocks = Clocks {
        idle: STOPPED,
        frame: STOPPED,
    };

    /// After a read (or the start), `elapsed` after the previous one, whose `complete` frames
    /// were handled. A partial frame left behind started in this read if any frame completed,
    /// else it is the same one as before. Joining a room stops the idle clock; leaving the last
    /// one starts it again (echo sockets have no rooms and no idle clock).
    fn after_read(&mut self, conn: &Connection, complete: usize, elapsed: Duration) {
        // Rounded, so that many short reads do not drift the clocks one way.
        let ms = u32::try_from(elapsed.as_micros().saturating_add(500) / 1000).unwrap_or(STOPPED);
        let older = |age: u32| match age {
            STOPPED => 0,
            age => age.saturating_add(ms).min(STOPPED - 1),
        };
        self.frame = match (!conn.has_input(), complete) {
            (true, _) => STOPPED,
            (false, 0) => older(self.frame),
            (false, _) => 0,
        };
        self.idle = if conn.rooms.is_empty() && !conn.echo {
            older(self.idle)
        } else {
            STOPPED
        };
    }

    /// When a clock started, from its age before `last_seen`.
    fn since(last_seen: Instant, age: u32) -> Option<Instant> {
        (age != STOPPED).then(|| {
            last_seen
                .checked_sub(Duration::from_millis(u64::from(age)))
                .unwrap_or(last_seen)
        })
    }
}

impl Connection {
    /// Runs until the connection must end. Reading waits for readiness with no buffer held, so an
    /// idle socket costs no read buffer; `inbuf` holds only a partial frame between reads.
    async fn serve(&mut self) -> End {
        let mut last_seen = Stamp::now();
        let mut clocks = Clocks::ALL_STOPPED;
        let mut complete = 0;
        if self.has_input() {
            match Box::pin(self.drain_frames()).await {
                Ok(n) => complete = n,
                Err(end) => return end,
            }
            self.release_inbuf();
        }
        clocks.after_read(self, complete, Duration::ZERO);
        // A ping went out since the peer was last heard: the next check is the close. (A flag
        // rather than the ping's own deadline: every byte of this wait is in every idle task.)
        let mut pinged = false;
        // One alarm for every deadline: the next ping, the token's expiry, the idle and the
        // message timeouts.
        self.set_alarm(last_seen.get(), pinged, clocks);
        loop {
            // Unbiased on purpose: a client that keeps sending must not starve its own deliveries
            // (its receiver would lag and be evicted), and a busy room must not starve reading
            // (its pongs would go unread and it would be dropped for silence).
            // `select!` drops its futures before a handler runs, so the state of a handler and
            // that of the wait share space: the handlers here stay at most as large as the wait.
            let step = tokio::select! {
                // The alarm, or this connection's turn in the drain (not the flag going up).
                wake = std::future::poll_fn(|cx| {
                    self.cx.shutdown.poll_wait(self.id, &mut self.alarm, cx)
                }) => match wake {
                    Wake::Turn(turn) => return End::Restart(turn),
                    Wake::Due => Step::Timer,
                },
                // `poll_read_ready` keeps its waker in the socket's own state: unlike
                // `readable()`'s 150-byte future, this wait costs the task nothing.
                ready = std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)) => {
                    if ready.is_err() {
                        return End::Gone;
                    }
                    Step::Readable
                }
                (index, res) = recv_any(&mut self.rooms) => Step::Room(index, res),
            };
            // The handlers await outside the `select!`, each after `step` is gone (moved out or
            // dropped): a value kept across several of their awaits would be laid out beside
            // the wait's futures and add its size to every idle connection's task.
            match step {
                Step::Room(index, res) => {
                    if let Some(end) = self.on_room_frame(index, res).await {
                        return end;
                    }
                }
                Step::Readable => {
                    drop(step);
                    match self.read_available() {
                        Ok(false) => {}
                        Ok(true) => {
                            let now = Instant::now();
                            let elapsed = now.saturating_duration_since(last_seen.get());
                            last_seen = Stamp::at(now);
                            pinged = false;
                            // Boxed: handling messages (parsing, publishing, joining, answering)
                            // needs far more state than waiting does (see `run`).
                            match Box::pin(self.drain_frames()).await {
                                Ok(complete) => clocks.after_read(self, complete, elapsed),
                                Err(end) => return end,
                            }
                            self.release_inbuf();
                            // A refresh may have moved the expiry, a partial frame or leaving
                            // the last room a deadline, and the read the next ping.
                            self.set_alarm(last_seen.get(), pinged, clocks);
                        }
                        Err(end) => return end,
                    }
                }
                Step::Timer => {
                    drop(step);
                    let now = Instant::now();
                    // The alarm may have been set for a deadline that has since moved (a
                    // refresh): each is checked against the clock.
                    if self.grant.as_ref().is_some_and(|g| g.expired()) {
                        self.cx.stats.auth_refused.inc(AuthReason::SocketExpired);
                        return End::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    if self
                        .message_due(last_seen.get(), clocks)
                        .is_some_and(|due| due <= now)
                    {
                        self.cx.stats.dropped.message_timeouts.inc();
                        return End::Close(close::POLICY, "message timeout");
                    }
                    if self
                        .idle_due(last_seen.get(), clocks)
                        .is_some_and(|due| due <= now)
                    {
                        self.cx.stats.dropped.idle_closes.inc();
                        return End::Close(close::IDLE, "idle timeout");
                    }
                    let ping_interval = self.cx.limits.ping_interval;
                    let silent = now.saturating_duration_since(last_seen.get());
                    if silent >= ping_interval * 2 {
                        return End::Close(close::POLICY, "ping timeout");
                    }
                    if silent >= ping_interval && !pinged {
                        if self.write_frames(&[&proto::ping_frame()]).await.is_err() {
                            return End::Gone;
                        }
                        pinged = true;
                    }
                    self.set_alarm(last_seen.get(), pinged, clocks);
                }
            }
        }
    }

    /// Sets the alarm to the earliest deadline (`next_wake`).
    fn set_alarm(&mut self, last_seen: Instant, pinged: bool, clocks: Clocks) {
        let wake = self.next_wake(last_seen, pinged, clocks);
        self.cx.shutdown.set_alarm(&mut self.alarm, wake);
    }

    /// The earliest deadline: the next ping check (a ping one `--ping-interval` after the peer
    /// was last heard, the close one more after), the token's expiry, the idle and message
    /// timeouts.
    fn next_wake(&self, last_seen: Instant, pinged: bool, clocks: Clocks) -> Instant {
        let ping_interval = self.cx.limits.ping_interval;
        let ping = last_seen
            + if pinged {
                ping_interval * 2
            } else {
                ping_interval
            };
        let mut wake = self.until_expiry(ping);
        for due in [
            self.message_due(last_seen, clocks),
            self.idle_due(last_seen, clocks),
        ]
        .into_iter()
        .flatten()
        {
            wake = wake.min(due);
        }
        wake
    }

    /// When what is only partly in (a frame, a fragmented message) must be whole.
    fn message_due(&self, last_seen: Instant, clocks: Clocks) -> Option<Instant> {
        let frame = Clocks::since(last_seen, clocks.frame);
        let message = self.partial.as_ref().map(|p| p.started);
        let first = match (frame, message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        first.map(|t| t + self.cx.limits.message_timeout)
    }

    /// When a socket in no room is closed.
    fn idle_due(&self, last_seen: Instant, clocks: Clocks) -> Option<Instant> {
        Some(Clocks::since(last_seen, clocks.idle)? + self.cx.limits.idle_timeout?)
    }

    /// `wake`, or the moment the token expires when that comes first. Read from the grant each
    /// time, so that the connection keeps no deadline of its own.
    fn until_expiry(&self, wake: Instant) -> Instant {
        match &self.grant {
            Some(grant) => wake.min(Instant::now() + grant.expires_in()),
            None => wake,
        }
    }

    /// Writes a frame meant for this socket alone (welcome, error, pong…), bounded by the
    /// write timeout; a timeout evicts.
    async fn write_own(&mut self, frame: &[u8]) -> Handled {
        Ok(self.write_frames(&[frame]).await?)
    }

    /// Writes `frames` in order, in full. The socket usually has room: then this is one
    /// `writev`, with no wait and nothing allocated. Otherwise the rest is written by a boxed
    /// future within `--write-timeout`; past it the connection closes as a slow consumer.
    async fn write_frames(&mut self, frames: &[&[u8]]) -> Result<(), End> {
        let written = match write_now(&self.stream, frames) {
            Ok(n) if n == total_len(frames) => return Ok(()),
            Ok(n) => n,
            Err(_) => return Err(End::Gone),
        };
        let timeout = self.cx.limits.write_timeout;
        let mut done = written;
        let rest = tokio::time::timeout(timeout, write_rest(&self.stream, frames, &mut done));
        match Box::pin(rest).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            // Cut in the middle of a frame, the stream has no room for a close frame.
            Err(_) if !at_frame_boundary(frames, done) => Err(End::Gone),
            Err(_) => Err(End::Close(close::POLICY, "slow consumer")),
        }
    }

    /// Sends our close frame and our FIN, then reads (and discards) what the peer still sends
    /// for up to `CLOSE_GRACE`: closing a socket with unread input makes the kernel send a
    /// reset, which can destroy the close frame before the peer reads it.
    async fn close(&mut self, code: u16, reason: &str) {
        let frame = proto::close_frame(code, reason);
        let sent =
            tokio::time::timeout(CLOSE_GRACE, write_rest(&self.stream, &[&frame], &mut 0)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = self.stream.shutdown().await;
        let socket = &self.stream;
        let deadline = Instant::now() + CLOSE_GRACE;
        let mut sink = [0u8; 1024];
        while let Ok(Ok(())) = tokio::time::timeout_at(deadline, socket.readable()).await {
            match socket.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}
