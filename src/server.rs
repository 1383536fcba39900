//! The accept loop: binds nothing itself (the caller hands it a listener), serves HTTP/1.1 on
//! every accepted socket, and runs the explicit shutdown sequence.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::auth::Verifier;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::history::HistoryService;
use crate::hub::Hub;
use crate::limit::PerIpLimit;
use crate::settings::Settings;
use crate::shutdown::{self, Shutdown};
use crate::stats::Stats;

/// State every task of one server shares.
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    /// Token verification, when `--jwt-secret` is set.
    pub auth: Option<Verifier>,
    /// Connections per client IP, when `--max-connections-per-ip` is set.
    pub per_ip: Option<PerIpLimit>,
    /// Cluster mode (`--redis`); `None` runs this process alone.
    pub cluster: Option<Arc<Cluster>>,
    next_id: AtomicU64,
    /// Never sent on: the shutdown sequence waits until every copy of `Shared` (one per live
    /// task) has been dropped, which closes this channel.
    _alive: mpsc::Sender<()>,
}

impl Shared {
    /// A fresh connection id (also the member id in every room). Never 0.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Serves `listener` until `signal` completes, then closes every WebSocket with 1001 and
/// returns once every connection task has ended or `--shutdown-timeout` has passed.
/// Fails at once if `--rooms-config` names a file that is unreadable or invalid.
pub async fn run(
    listener: TcpListener,
    config: Config,
    signal: impl Future<Output = ()>,
) -> crate::Result<()> {
    let room_buffer = config.room_buffer as usize;
    let settings = match &config.rooms_config {
        Some(path) => Settings::load(path, room_buffer)?,
        None => Settings::from_flags(room_buffer),
    };
    let (trigger, shutdown) = shutdown::channel();
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut stats = Stats::new();
    let cluster = match &config.redis {
        Some(url) => Some(Arc::new(Cluster::new(&config, url, stats.registry_mut())?)),
        None => None,
    };
    let stats = Arc::new(stats);
    let history = Arc::new(HistoryService::new(
        config.history_settings(),
        stats.clone(),
    )?);
    let hub = Hub::with_settings(
        usize::from(config.shards),
        settings,
        usize::from(config.lobby_top),
        stats.clone(),
    )
    .with_room_rate(config.room_rate())
    .with_history(history.clone());
    let shutdown_timeout = config.shutdown_timeout;
    let auth = config.jwt_secret.as_deref().map(Verifier::new);
    let per_ip = config.max_connections_per_ip.map(PerIpLimit::new);
    let shared = Arc::new(Shared {
        config,
        hub,
        stats,
        shutdown: shutdown.clone(),
        auth,
        per_ip,
        cluster: cluster.clone(),
        next_id: AtomicU64::new(1),
        _alive: alive_tx,
    });
    match cluster {
        // The cluster link carries presence between processes (and flushes it locally while
        // Redis is unreachable).
        Some(cluster) => tokio::spawn(crate::cluster::run(shared.clone(), cluster)),
        None => tokio::spawn(presence_task(shared.clone())),
    };
    // The `$lobby` is local to each process (never a Redis channel).
    tokio::spawn(lobby_task(shared.clone()));
    if shared.config.rooms_config.is_some() {
        reload_on_sighup(shared.clone());
    }
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
        tokio::spawn(serve_http(shared.clone(), stream, peer.ip()));
    }

    tracing::info!("shutting down: closing every socket with 1001");
    drop(listener);
    trigger.trigger();
    drop(shared);
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

/// Serves HTTP/1.1 on one socket. An upgrade hands the socket to a `connection` task; plain
/// keep-alive connections are told to finish on shutdown.
async fn serve_http(shared: Arc<Shared>, stream: TcpStream, peer: IpAddr) {
    // Chat frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let mut shutdown = shared.shutdown.clone();
    let handshake_timeout = shared.config.handshake_timeout;
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        async move { Ok::<_, std::convert::Infallible>(crate::http::handle(shared, peer, req).await) }
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

/// Flushes coalesced presence events every `--presence-interval` until shutdown.
async fn presence_task(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(shared.config.presence_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.hub.flush_presence(),
            () = shutdown.recv() => return,
        }
    }
}

/// Sends the `$lobby`'s coalesced frames once per `lobby::TICK` until shutdown. With nobody in
/// the lobby a tick is one atomic load.
async fn lobby_task(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut tick = tokio::time::interval(crate::lobby::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.hub.flush_lobby(),
            () = shutdown.recv() => return,
        }
    }
}

/// Reloads `--rooms-config` on every SIGHUP until shutdown. A bad file is logged (with its line
/// and key) and the settings in force stay.
#[cfg(unix)]
fn reload_on_sighup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: --rooms-config will not reload");
            return;
        }
    };
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.clone();
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                () = shutdown.recv() => return,
            }
            match shared.hub.settings().reload() {
                Some(Ok(settings)) => {
                    shared.hub.reload(settings);
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
fn reload_on_sighup(_shared: Arc<Shared>) {}
