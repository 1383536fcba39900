//! One WebSocket connection's whole life, owned by one task: completing the upgrade, waiting
//! for input, room frames, pings and shutdown, and closing with a precise code. What happens in
//! between lives beside it: `read` (frames in), `handle` (the chat protocol), `deliver` (room
//! frames out).

mod deliver;
mod end;
mod handle;
mod membership;
mod read;

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
use tokio::time::{sleep_until, Instant};

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
use crate::shutdown::{Shutdown, Turn};
use crate::ws::io::TimedStream;
use crate::ws::write::{total_len, write_now, write_rest};
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
    /// `--rate-limit` on the messages one socket sends.
    pub rate: Option<RateSpec>,
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
    pub(crate) cx: Arc<Context>,
    pub(crate) ip: Option<IpAddr>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.cx.stats.connections.dec();
        if let (Some(ip), Some(per_ip)) = (self.ip, &self.cx.per_ip) {
            per_ip.release(ip);
        }
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
    inbuf: BytesMut,
    shutdown: Shutdown,
    rooms: SmallVec<[Membership; 1]>,
    /// A fragmented message being reassembled, and its first frame's opcode. Boxed (as is
    /// `limiter`) because it is rare and every idle connection would carry its space.
    partial: Option<Box<(OpCode, BytesMut)>>,
    echo: bool,
    grant: Option<Arc<Grant>>,
    /// `--rate-limit` on the messages this socket sends.
    limiter: Option<Box<ConnectionLimiter>>,
    /// Dropped with the connection, whichever way it ends.
    _guard: ConnectionGuard,
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
    conn.leave_all();
    match end {
        End::Close(code, reason) => Box::pin(conn.close(code, reason)).await,
        End::Restart(turn) => {
            if turn == Turn::Late {
                conn.cx.stats.shutdown_late_closes.inc();
            }
            let reason = close::restart_reason(conn.shutdown.retry_after_ms(conn.id));
            Box::pin(conn.close(close::SERVICE_RESTART, &reason)).await;
        }
        End::Gone => {}
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
    let inbuf = BytesMut::from(&parts.read_buf[..]);
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
        shutdown: cx.shutdown.clone(),
        cx,
        stream,
        inbuf,
        rooms: SmallVec::new(),
        partial: None,
        echo,
        grant,
        limiter,
        _guard: guard,
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

impl Connection {
    /// Runs until the connection must end. Reading waits for readiness with no buffer held, so an
    /// idle socket costs no read buffer; `inbuf` holds only a partial frame between reads.
    async fn serve(&mut self) -> End {
        if !self.inbuf.is_empty() {
            if let Err(end) = Box::pin(self.drain_frames()).await {
                return end;
            }
            self.release_inbuf();
        }
        let ping_interval = self.cx.limits.ping_interval;
        let mut last_seen = Instant::now();
        // One timer for both deadlines: the next ping and the token's expiry. A second `Sleep`
        // would add its size to every idle connection's task.
        let ping_timer = sleep_until(self.until_expiry(last_seen + ping_interval));
        tokio::pin!(ping_timer);
        loop {
            // Unbiased on purpose: a client that keeps sending must not starve its own deliveries
            // (its receiver would lag and be evicted), and a busy room must not starve reading
            // (its pongs would go unread and it would be dropped for silence).
            // `select!` drops its futures before a handler runs, so the state of a handler and
            // that of the wait share space: the handlers here stay at most as large as the wait.
            tokio::select! {
                // Not when the flag goes up: when the drain gives this connection its turn.
                turn = self.shutdown.turn() => return End::Restart(turn),
                // `poll_read_ready` keeps its waker in the socket's own state: unlike
                // `readable()`'s 150-byte future, this wait costs the task nothing.
                ready = std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)) => {
                    if ready.is_err() {
                        return End::Gone;
                    }
                    match self.read_available() {
                        Ok(false) => {}
                        Ok(true) => {
                            last_seen = Instant::now();
                            // Boxed: handling messages (parsing, publishing, joining, answering)
                            // needs far more state than waiting does (see `run`).
                            if let Err(end) = Box::pin(self.drain_frames()).await {
                                return end;
                            }
                            self.release_inbuf();
                            // A refresh may have brought the expiry closer than the timer.
                            let wake = self.until_expiry(ping_timer.deadline());
                            if wake < ping_timer.deadline() {
                                ping_timer.as_mut().reset(wake);
                            }
                        }
                        Err(end) => return end,
                    }
                }
                (index, res) = recv_any(&mut self.rooms) => {
                    if let Some(end) = self.on_room_frame(index, res).await {
                        return end;
                    }
                }
                () = &mut ping_timer => {
                    // The timer may have woken for the expiry that a refresh has since pushed
                    // back: then only the ping schedule below goes on.
                    if self.grant.as_ref().is_some_and(|g| g.expired()) {
                        self.cx.stats.auth_refused.inc(AuthReason::SocketExpired);
                        return End::Close(close::TOKEN_EXPIRED, "token expired");
                    }
                    let silent = last_seen.elapsed();
                    if silent >= ping_interval * 2 {
                        return End::Close(close::POLICY, "ping timeout");
                    }
                    if silent >= ping_interval
                        && self.write_frames(&[&proto::ping_frame()]).await.is_err()
                    {
                        return End::Gone;
                    }
                    let next = if silent >= ping_interval { Instant::now() } else { last_seen };
                    ping_timer.as_mut().reset(self.until_expiry(next + ping_interval));
                }
            }
        }
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
        let rest = tokio::time::timeout(timeout, write_rest(&self.stream, frames, written));
        match Box::pin(rest).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(close::POLICY, "slow consumer")),
        }
    }

    /// Sends our close frame and our FIN, then reads (and discards) what the peer still sends
    /// for up to `CLOSE_GRACE`: closing a socket with unread input makes the kernel send a
    /// reset, which can destroy the close frame before the peer reads it.
    async fn close(mut self, code: u16, reason: &str) {
        let frame = proto::close_frame(code, reason);
        let sent = tokio::time::timeout(CLOSE_GRACE, write_rest(&self.stream, &[&frame], 0)).await;
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
