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

use crate::bus::local::Local;
use crate::bus::redis::{Cluster, RedisSettings};
use crate::bus::{Broker, Bus};
use crate::config::rooms::Settings;
use crate::config::Config;
use crate::conn::{self, Limits};
use crate::core::auth::Verifier;
use crate::core::history::{HistoryService, HistorySettings};
use crate::core::hub::Hub;
use crate::core::limit::PerIpLimit;
use crate::core::stats::Stats;
use crate::http::{self, Access, Api};
use crate::shutdown::{self, Shutdown};

/// Serves `listener` until `signal` completes, then closes every WebSocket with 1001 and
/// returns once every connection task has ended or `--shutdown-timeout` has passed.
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
    let room_buffer = config.room_buffer as usize;
    let settings = match &config.rooms_config {
        Some(path) => Settings::load(path, room_buffer)?,
        None => Settings::from_flags(room_buffer),
    };
    let (trigger, shutdown) = shutdown::channel();
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
    };
    let history = Arc::new(HistoryService::new(history_settings, stats.clone())?);
    let hub = Arc::new(
        Hub::with_settings(
            usize::from(config.shards),
            settings,
            usize::from(config.lobby_top),
            stats.clone(),
        )
        .with_room_rate(config.room_rate())
        .with_history(history.clone()),
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
    };
    let cx = Arc::new(conn::Context::new(
        bus.clone(),
        stats.clone(),
        limits,
        shutdown.clone(),
        config.max_connections_per_ip.map(PerIpLimit::new),
        verifier.clone(),
        alive_tx,
    ));
    let access = Access::new(
        verifier,
        config.api_key.clone(),
        config.allowed_origins.clone(),
    );
    if access.publish_open() {
        tracing::warn!(
            "neither --jwt-secret nor --api-key is set: anyone who can reach this port may \
             publish into any room, as any user, with POST /api/rooms/{{room}}/messages"
        );
    }
    let api = Arc::new(
        Api::new(
            bus.clone(),
            stats.clone(),
            access,
            cx,
            config.max_connections,
            config.max_message_bytes as usize,
            config.echo,
        )
        .with_body_timeout(config.body_timeout),
    );
    let shutdown_timeout = config.shutdown_timeout;
    let handshake_timeout = config.handshake_timeout;
    bus.spawn(shutdown.clone());
    // The `$lobby` is each process's own (never a broker's room).
    tokio::spawn(lobby_task(hub.clone(), shutdown.clone()));
    if config.rooms_config.is_some() {
        reload_on_sighup(hub.clone(), shutdown.clone());
    }
    drop(bus);
    tracing::info!(addr = %listener.local_addr()?, "roomcast listening");

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
            shutdown.clone(),
            handshake_timeout,
            stream,
            peer.ip(),
        ));
    }

    tracing::info!("shutting down: closing every socket with 1001");
    drop(listener);
    trigger.trigger();
    drop(api);
    if tokio::time::timeout(shutdown_timeout, alive_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within {shutdown_timeout:?}");
    }
    // Whatever is still queued for the history database is written before `run` returns.
    let _ = tokio::task::spawn_blocking(move || history.close(shutdown_timeout)).await;
    Ok(())
}

/// Serves HTTP/1.1 on one socket. An upgrade hands the socket to a `conn` task; plain
/// keep-alive connections are told to finish on shutdown.
async fn serve_http(
    api: Arc<Api>,
    mut shutdown: Shutdown,
    handshake_timeout: Duration,
    stream: TcpStream,
    peer: IpAddr,
) {
    // Chat frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let api = api.clone();
        async move { Ok::<_, std::convert::Infallible>(http::handle(api, peer, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        () = shutdown.recv() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
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
/// and key) and the settings in force stay.
#[cfg(unix)]
fn reload_on_sighup(hub: Arc<Hub>, mut shutdown: Shutdown) {
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
                    hub.reload(settings);
                    tracing::info!("rooms config reloaded");
                }
                Some(Err(e)) => {
                    tracing::error!("rooms config not reloaded, the previous settings stay: {e}");
                }
                None => {}
            }
        }
    });
}

#[cfg(not(unix))]
fn reload_on_sighup(_hub: Arc<Hub>, _shutdown: Shutdown) {}
