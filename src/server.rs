//! The accept loop: binds nothing itself (the caller hands it a listener), serves HTTP/1.1 on
//! every accepted socket, and runs the explicit shutdown sequence.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::hub::Hub;
use crate::shutdown::{self, Shutdown};
use crate::stats::Stats;

/// State every task of one server shares.
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
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
pub async fn run(
    listener: TcpListener,
    config: Config,
    signal: impl Future<Output = ()>,
) -> crate::Result<()> {
    let (trigger, shutdown) = shutdown::channel();
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut stats = Stats::new();
    let cluster = match &config.redis {
        Some(url) => Some(Arc::new(Cluster::new(&config, url, stats.registry_mut())?)),
        None => None,
    };
    let stats = Arc::new(stats);
    let hub = Hub::new(
        usize::from(config.shards),
        config.room_buffer as usize,
        stats.clone(),
    );
    let shutdown_timeout = config.shutdown_timeout;
    let shared = Arc::new(Shared {
        config,
        hub,
        stats,
        shutdown: shutdown.clone(),
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
    tracing::info!(addr = %listener.local_addr()?, "roomcast listening");

    tokio::pin!(signal);
    let mut backoff = Duration::from_millis(5);
    loop {
        let stream = tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => { backoff = Duration::from_millis(5); stream }
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
        tokio::spawn(serve_http(shared.clone(), stream));
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
    Ok(())
}

/// Serves HTTP/1.1 on one socket. An upgrade hands the socket to a `connection` task; plain
/// keep-alive connections are told to finish on shutdown.
async fn serve_http(shared: Arc<Shared>, stream: TcpStream) {
    // Chat frames are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let mut shutdown = shared.shutdown.clone();
    let handshake_timeout = shared.config.handshake_timeout;
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        async move { Ok::<_, std::convert::Infallible>(crate::http::handle(shared, req).await) }
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
