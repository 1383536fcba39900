//! The accept loop: binds nothing itself (the caller hands it a listener), serves HTTP/1.1 on
//! every accepted socket, and runs the explicit shutdown sequence.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::local::Local;
use crate::bus::redis::{Cluster, RedisSettings};
use crate::bus::{Broker, Bus};
use crate::config::rooms::Settings;
use crate::config::{Config, Switch};
use crate::conn::sse::StreamNote;
use crate::conn::{self, Limits};
use crate::core::accounts::{default_hash_slots, Accounts, Hasher, Store};
use crate::core::auth::{Issuer, Verifier};
use crate::core::coalesce::Coalescer;
use crate::core::history::{HistoryService, HistorySettings};
use crate::core::hub::Hub;
use crate::core::limit::PerIpLimit;
use crate::core::lockout::Lockout;
use crate::core::stats::Stats;
use crate::http::accounts::AccountRoutes;
use crate::http::{self, Access, Api, Side};
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::ws::io::TimedStream;

/// Serves `listener` until `signal` completes, then stops accepting, closes the WebSockets with
/// 1012 at `--drain-rate` and returns once every connection task has ended or
/// `--shutdown-timeout` has passed (and the history database is flushed).
/// Fails at once if `--rooms-config` names a file that is unreadable or invalid, or if
/// `--jwt-secret` is shorter than 32 bytes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    signal: impl Future<Output = ()>,
) -> crate::error::Result<()> {
    // Checked first: a weak secret must stop the server before it does anything else.
    let verifier = match &config.jwt_secret {
        Some(secret) => Some(Arc::new(Verifier::new(
            secret,
            config.jwt_audience.as_deref(),
            config.jwt_issuer.as_deref(),
        )?)),
        None => None,
    };
    let accounts = match &config.accounts_db {
        Some(path) => Some(account_routes(&config, path).await?),
        None => None,
    };
    // Bound before anything starts, so a taken port stops the server at once.
    let admin = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on --admin-listen {addr}: {e}"),
            )
        })?),
        None => None,
    };
    let room_buffer = config.room_buffer as usize;
    let settings = match &config.rooms_config {
        Some(path) => Settings::load(path, room_buffer)?,
        None => Settings::from_flags(room_buffer),
    };
    // `shutdown` stops accepting and hands the WebSockets their turns to close; `stop` ends the
    // background work (the bus, the lobby) once they are gone, so the last ones to go are
    // served as fully as the first.
    let (trigger, shutdown) = shutdown::channel();
    let (stop_trigger, stop) = shutdown::channel();
    // The WebSockets' deadlines (and the drain's list of who is waiting), until the end: a
    // socket still waiting for its turn keeps its pings and timeouts.
    tokio::spawn({
        let shutdown = shutdown.clone();
        let mut stop = stop.clone();
        async move { shutdown.run_alarms(stop.recv()).await }
    });
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut stats = Stats::new();
    let broker: Arc<dyn Broker> = match &config.redis {
        Some(url) => {
            let settings = RedisSettings {
                url: url.clone(),
                prefix: config.redis_prefix.clone(),
                timeout: config.redis_timeout,
                node_ttl: config.cluster_node_ttl,
                history_depth: config.history as usize,
                presence_interval: config.presence_interval,
                max_text_bytes: config.max_message_bytes as usize,
            };
            Arc::new(Cluster::new(settings, stats.registry_mut())?)
        }
        None => Arc::new(Local::new(config.presence_interval)),
    };
    let stats = Arc::new(stats);
    let history_settings = HistorySettings {
        capacity: config.history as usize,
        dedupe_window: config.dedupe_window,
        dedupe_max: config.dedupe_max as usize,
        db: config.history_db.clone(),
        retention: config.retention,
        db_queue: config.history_db_queue as usize,
        db_queue_bytes: usize::try_from(config.history_db_queue_bytes).unwrap_or(usize::MAX),
        memory: usize::try_from(config.history_memory).unwrap_or(usize::MAX),
        room_bytes: usize::try_from(config.room_history_bytes).unwrap_or(usize::MAX),
        page_delay: config.fault_page_read_delay,
    };
    let history = Arc::new(HistoryService::new(history_settings, stats.clone())?);
    let coalescer = if config.write_coalesce.is_zero() {
        None
    } else {
        Some(Coalescer::start(
            config.write_coalesce,
            usize::from(config.write_coalesce_frames),
        )?)
    };
    let hub = Arc::new(
        Hub::with_settings(
            usize::from(config.shards),
            settings,
            usize::from(config.lobby_top),
            stats.clone(),
        )
        .with_room_rate(config.room_rate())
        .with_max_rooms(usize::try_from(config.max_rooms).unwrap_or(usize::MAX))
        .with_roster_limit(usize::from(config.roster_limit))
        .with_history(history.clone())
        .with_coalescer(coalescer),
    );
    let bus = Arc::new(Bus::new(hub.clone(), broker, stats.clone()));
    let limits = Limits {
        max_message_bytes: config.max_message_bytes as usize,
        ping_interval: config.ping_interval,
        write_timeout: config.write_timeout,
        lag_policy: config.lag_policy,
        max_rooms: usize::from(config.max_rooms_per_connection),
        rate: config.connection_rate(),
        idle_timeout: config.idle_timeout(),
        message_timeout: config.message_timeout,
        compression: (config.compression == Switch::On)
            .then_some(config.compression_min_bytes as usize),
    };
    let lockout = Arc::new(Lockout::default());
    let cx = Arc::new(conn::Context::new(
        bus.clone(),
        stats.clone(),
        limits,
        shutdown.clone(),
        config.max_connections_per_ip.0.map(PerIpLimit::new),
        (verifier.clone(), lockout.clone()),
        alive_tx,
    ));
    let access = Access::new(
        verifier,
        config.api_key.clone(),
        config.allowed_origins.clone(),
        lockout,
        stats.clone(),
    )
    .with_trusted_proxies(config.trusted_proxies.clone());
    if access.publish_open() {
        tracing::warn!(
            "neither --jwt-secret nor --api-key is set: anyone who can reach this port may \
             publish into any room, as any user, with POST /api/rooms/{{room}}/messages"
        );
    }
    let mut api = Api::new(
        bus.clone(),
        stats.clone(),
        access,
        cx,
        config.max_connections,
        config.max_message_bytes as usize,
        config.echo,
    )
    .with_accept_rate(config.accept_rate())
    .with_body_timeout(config.body_timeout)
    .with_sse_heartbeat(config.sse_heartbeat)
    .with_member_ids_after(bus.member_id_base())
    .with_cors(&config.cors_origins);
    if admin.is_some() {
        api = api.with_admin_listener();
    }
    if let Some(routes) = accounts {
        api = api.with_accounts(routes);
    }
    let api = Arc::new(api);
    let shutdown_timeout = config.shutdown_timeout;
    let drain_rate = config.drain_per_second();
    let handshake_timeout = config.handshake_timeout;
    bus.spawn(stop.clone());
    // The `$lobby` is each process's own (never a broker's room).
    tokio::spawn(lobby_task(hub.clone(), stop.clone()));
    if config.rooms_config.is_some() {
        reload_on_sighup(hub.clone(), stats.clone(), stop);
    }
    drop(bus);
    tracing::info!(addr = %listener.local_addr()?, "roomcast listening");
    if let Some(admin) = admin {
        tracing::info!(addr = %admin.local_addr()?, "admin routes (/metrics, /api/stats) listening");
        tokio::spawn(serve_admin(
            admin,
            api.clone(),
            shutdown.clone(),
            handshake_timeout,
        ));
    }

    tokio::pin!(signal);
    let mut backoff = Duration::from_millis(5);
    loop {
        let stream = tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, peer)) => { backoff = Duration::from_millis(5); (stream, peer) }
                Err(e) => {
                    // Running out of file descriptors or memory is transient: back off, go on.
                    tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let (stream, peer) = stream;
        tokio::spawn(serve_http(
            api.clone(),
            Side::Public,
            shutdown.clone(),
            handshake_timeout,
            stream,
            peer.ip(),
        ));
    }

    let started = Instant::now();
    let open = stats.connections.get().max(0);
    tracing::info!(open, ?drain_rate, "shutting down: draining WebSockets");
    drop(listener);
    trigger.trigger();
    drop(api);
    // The last turns go out one close grace before the deadline, so that their closes can
    // finish within it too.
    let grace = conn::CLOSE_GRACE.min(shutdown_timeout / 4);
    let release_by = started + (shutdown_timeout - grace);
    let planned = drain_rate.map_or(Duration::ZERO, |per_second| {
        Duration::from_secs_f64(open as f64 / per_second).min(shutdown_timeout - grace)
    });
    trigger.set_window(planned.max(MIN_RECONNECT_WINDOW));
    if !drain(&trigger, drain_rate, &mut alive_rx, release_by).await {
        trigger.release_late();
        let ended = tokio::time::timeout_at(started + shutdown_timeout, alive_rx.recv()).await;
        let late = stats.shutdown_late_closes.get();
        if late > 0 {
            tracing::warn!(
                late,
                "{late} connections were still waiting for their turn at the drain deadline \
                 and were closed at once: raise --drain-rate or --shutdown-timeout"
            );
        }
        if ended.is_err() {
            tracing::warn!("some connections did not finish within {shutdown_timeout:?}");
        }
    }
    stop_trigger.trigger();
    // Whatever is still queued for the history database is written before `run` returns.
    let _ = tokio::task::spawn_blocking(move || history.close(shutdown_timeout)).await;
    Ok(())
}

/// The account routes of `--accounts-db`: its file opened (and migrated), the dummy hash made,
/// tokens signed like those the server verifies. Needs `--jwt-secret`.
async fn account_routes(
    config: &Config,
    path: &std::path::Path,
) -> crate::error::Result<AccountRoutes> {
    let Some(secret) = &config.jwt_secret else {
        return Err(crate::error::Error::AccountsWithoutSecret);
    };
    let issuer = Issuer::new(
        secret,
        config.jwt_audience.as_deref(),
        config.jwt_issuer.as_deref(),
    )?;
    let store = Store::open(path)?;
    let slots = match config.accounts_hash_slots {
        0 => default_hash_slots(),
        n => usize::from(n),
    };
    // The dummy hash is a hash: not on the runtime's threads, even at start.
    let hasher = tokio::task::spawn_blocking(Hasher::new)
        .await
        .map_err(|_| crate::core::accounts::AccountError::Worker)??;
    let accounts = Accounts::new(store, hasher, slots)?;
    tracing::info!(
        db = %path.display(),
        register = ?config.accounts_register,
        hash_slots = slots,
        "built-in accounts on"
    );
    Ok(AccountRoutes::new(
        accounts,
        issuer,
        config.accounts_token_ttl,
        config.accounts_rooms.clone(),
        config.accounts_register,
        config.accounts_register_rate.0,
    ))
}

/// Accepts on `--admin-listen` until shutdown.
async fn serve_admin(
    listener: TcpListener,
    api: Arc<Api>,
    mut shutdown: Shutdown,
    handshake_timeout: Duration,
) {
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.recv() => return,
        };
        tokio::spawn(serve_http(
            api.clone(),
            Side::Admin,
            shutdown.clone(),
            handshake_timeout,
            stream,
            peer.ip(),
        ));
    }
}

/// The shortest window that reconnect delays are spread over, even when the drain is shorter
/// (or off): a second's worth of clients then come back spread over a second.
const MIN_RECONNECT_WINDOW: Duration = Duration::from_secs(1);

/// Hands out the WebSockets' turns to close at `per_second` (all at once when `None`) until
/// every connection task has ended (`true`) or `release_by` has passed (`false`).
async fn drain(
    trigger: &ShutdownTrigger,
    per_second: Option<f64>,
    alive: &mut mpsc::Receiver<()>,
    release_by: Instant,
) -> bool {
    let Some(per_second) = per_second else {
        trigger.release_all();
        return tokio::time::timeout_at(release_by, alive.recv())
            .await
            .is_ok();
    };
    // A batch every 10 ms at 100/s and more; one connection per tick below.
    let batch = (per_second / 100.0).ceil().max(1.0);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(batch / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let batch = batch.min(f64::from(u32::MAX)) as u32;
    loop {
        tokio::select! {
            // Nothing is ever sent: `None` once every connection task has ended.
            _ = alive.recv() => return true,
            () = tokio::time::sleep_until(release_by) => return false,
            _ = tick.tick() => trigger.release(batch),
        }
    }
}

/// Serves HTTP/1.1 on one socket. An upgrade hands the socket to a `conn` task; plain
/// keep-alive connections are told to finish on shutdown.
async fn serve_http(
    api: Arc<Api>,
    side: Side,
    mut shutdown: Shutdown,
    handshake_timeout: Duration,
    stream: TcpStream,
    peer: IpAddr,
) {
    // Chat frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    // Responses (and the 101) get `--write-timeout` too: a client that stops reading is dropped.
    let stream = TimedStream::new(stream, api.conn.limits.write_timeout);
    let stats = api.stats.clone();
    // Lets an event stream served on this connection and this loop tell each other how it ends.
    let note = Arc::new(StreamNote::default());
    let service = {
        let note = note.clone();
        service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let api = api.clone();
            req.extensions_mut().insert(note.clone());
            async move { Ok::<_, std::convert::Infallible>(http::handle(api, side, peer, req).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                let timed_out = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
                if timed_out {
                    stats.http_write_timeouts.inc();
                    note.mark_write_timed_out();
                }
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        () = shutdown.recv() => {
            conn.as_mut().graceful_shutdown();
            // An event stream ends at its turn in the drain (bounded by --shutdown-timeout),
            // with a `close` event; anything else gets a second.
            if note.streaming() {
                let _ = conn.await;
            } else {
                let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
            }
        }
    }
}

/// Sends the `$lobby`'s coalesced frames once per `lobby::TICK` until shutdown. With nobody in
/// the lobby a tick is one atomic load.
async fn lobby_task(hub: Arc<Hub>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(crate::core::lobby::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => hub.flush_lobby(),
            () = shutdown.recv() => return,
        }
    }
}

/// Reloads `--rooms-config` on every SIGHUP until shutdown. A bad file is logged (with its line
/// and key) and counted, and the settings and routes in force stay.
#[cfg(unix)]
fn reload_on_sighup(hub: Arc<Hub>, stats: Arc<Stats>, mut shutdown: Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: --rooms-config will not reload");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                () = shutdown.recv() => return,
            }
            match hub.settings().reload() {
                Some(Ok(settings)) => {
                    let routes = settings.routes().len();
                    hub.reload(settings);
                    tracing::info!(routes, "rooms config reloaded");
                }
                Some(Err(e)) => {
                    stats.rooms_config_reloads_refused.inc();
                    tracing::error!("rooms config not reloaded, the previous settings stay: {e}");
                }
                None => {}
            }
        }
    });
}

#[cfg(not(unix))]
fn reload_on_sighup(_hub: Arc<Hub>, _stats: Arc<Stats>, _shutdown: Shutdown) {}
