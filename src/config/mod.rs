//! Configuration: every bound the server enforces, parsed once in `main` and passed down.

pub mod rooms;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::core::limit::{RateLimitArg, RateSpec};

use crate::core::archive::Retention;
use crate::core::history::{HistorySettings, LagPolicy};

/// Server settings. Every field is a bound or a timing; the policy applied past each bound is
/// documented on the field and in docs/PROTOCOL.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "roomcast", version, about = "WebSocket room broadcast server")]
pub struct Config {
    /// Address to listen on. Default: 127.0.0.1:8080.
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Messages a room buffers for its slowest member before that member is evicted
    /// (close 1008 "slow consumer"). Unit: messages. Default: 1024.
    #[arg(long, env = "ROOMCAST_ROOM_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub room_buffer: u32,

    /// A write to one socket that takes longer than this evicts it (close 1008 "slow consumer").
    /// Unit: seconds (fractions allowed). Default: 10.
    #[arg(long, env = "ROOMCAST_WRITE_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub write_timeout: Duration,

    /// Idle sockets are pinged this often; a peer silent for two intervals is dropped
    /// (close 1008 "ping timeout"). Unit: seconds. Default: 30.
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", default_value = "30", value_parser = parse_secs)]
    pub ping_interval: Duration,

    /// Presence events of one room are coalesced into at most one frame per interval.
    /// Unit: milliseconds. Default: 250.
    #[arg(long, env = "ROOMCAST_PRESENCE_INTERVAL", default_value = "250", value_parser = parse_millis)]
    pub presence_interval: Duration,

    /// Largest message a client may send (all fragments together) and largest REST body.
    /// Past it: close 1009 (WebSocket) or 413 (HTTP). Unit: bytes. Default: 65536.
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(16..=(64 << 20)))]
    pub max_message_bytes: u32,

    /// Sockets held at once; an upgrade beyond it gets HTTP 503 before the upgrade.
    /// Unit: connections. Default: 100000.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Rooms one socket may be in at once; a join beyond it gets an error frame.
    /// Unit: rooms. Default: 16.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS_PER_CONNECTION", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_rooms_per_connection: u16,

    /// Runtime worker threads. 1 runs everything on one thread (no work stealing, no cross-thread
    /// wake-ups): the right choice when several server processes share a few cores, as in the
    /// 100k run on a 2-core machine. Default: 0 = one per CPU core.
    #[arg(long, env = "ROOMCAST_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub threads: u16,

    /// Number of shards of the room registry (rounded up to a power of two).
    /// Default: 64.
    #[arg(long, env = "ROOMCAST_SHARDS", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub shards: u16,

    /// A client must send its complete HTTP request head within this time after connecting,
    /// or the socket is dropped (slow-header protection). Unit: seconds. Default: 10.
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub handshake_timeout: Duration,

    /// Adds a `/echo` WebSocket endpoint that echoes every text and binary message exactly, for
    /// conformance testing (Autobahn). Off by default: it is not part of the chat protocol.
    #[arg(long, env = "ROOMCAST_ECHO")]
    pub echo: bool,

    /// Time given to open sockets to receive their close 1001 on shutdown before the process
    /// exits anyway. Unit: seconds. Default: 4.
    #[arg(long, env = "ROOMCAST_SHUTDOWN_TIMEOUT", default_value = "4", value_parser = parse_secs)]
    pub shutdown_timeout: Duration,

    /// Shared secret of HS256 access tokens. When set, every WebSocket upgrade needs a valid
    /// token (401 otherwise) whose `rooms` claim allows the room (403 otherwise). Default: off.
    #[arg(
        long,
        env = "ROOMCAST_JWT_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub jwt_secret: Option<String>,

    /// When set, the write endpoints (REST publish) need `Authorization: Bearer <key>`.
    /// Default: off.
    #[arg(long, env = "ROOMCAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Comma-separated origins (`https://chat.example.com`) whose browser pages may open
    /// WebSockets; other `Origin`s get 403. Requests without `Origin` (non-browsers) pass.
    /// Default: any origin.
    #[arg(long, env = "ROOMCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Messages one socket may send: `RATE[:BURST]` per second, or `off`. Excess messages get
    /// an error frame with `retry_after_ms`; `BURST` refusals in a row close the socket (1008).
    /// Default: 20:40.
    #[arg(long, env = "ROOMCAST_RATE_LIMIT", default_value = "20:40")]
    pub rate_limit: RateLimitArg,

    /// Messages one room accepts: `RATE[:BURST]` per second, or `off`. Excess publishes get an
    /// error frame with `retry_after_ms` (HTTP 429 for REST). Default: off.
    #[arg(long, env = "ROOMCAST_ROOM_RATE_LIMIT", default_value = "off")]
    pub room_rate_limit: RateLimitArg,

    /// WebSocket connections one client IP may hold at once; one more gets HTTP 429.
    /// Default: no limit (deployments behind a proxy see one IP).
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_IP", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: Option<u32>,

    /// Per-room settings file (TOML: `[defaults]` and `[rooms."NAME"]` / `[rooms."PREFIX*"]`
    /// with `password`, `max_members`, `history`, `rate_limit`, `presence`, `room_buffer`).
    /// A bad file stops the server at start; SIGHUP reloads it, keeping the old settings if the
    /// new file is bad. Default: none (every room open, flags' values).
    #[arg(long, env = "ROOMCAST_ROOMS_CONFIG")]
    pub rooms_config: Option<PathBuf>,

    /// Rooms listed, busiest first, in the `$lobby`'s `room_counts` frame (at most one a
    /// second). Unit: rooms. Default: 50.
    #[arg(long, env = "ROOMCAST_LOBBY_TOP", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub lobby_top: u16,

    /// Cluster mode: share rooms with every roomcast process that uses this Redis
    /// (`redis://[:password@]host[:port][/db]`). Unset: this process runs alone.
    /// Default: unset.
    #[arg(long, env = "ROOMCAST_REDIS")]
    pub redis: Option<String>,

    /// Cluster mode: prefix of every Redis key and channel, so that several clusters can share
    /// one Redis (Pub/Sub ignores the database number). Default: roomcast.
    #[arg(long, env = "ROOMCAST_REDIS_PREFIX", default_value = "roomcast", value_parser = parse_prefix)]
    pub redis_prefix: String,

    /// Cluster mode: a Redis command or connection attempt that takes longer fails; a publish
    /// then gets the `cluster_unavailable` error. Unit: seconds. Default: 2.
    #[arg(long, env = "ROOMCAST_REDIS_TIMEOUT", default_value = "2", value_parser = parse_secs)]
    pub redis_timeout: Duration,

    /// Cluster mode: how long the counts of a process that stopped heartbeating (killed,
    /// partitioned) stay in the cluster-wide counts. Heartbeats go every third of it.
    /// Unit: seconds. Default: 15.
    #[arg(long, env = "ROOMCAST_CLUSTER_NODE_TTL", default_value = "15", value_parser = parse_secs)]
    pub cluster_node_ttl: Duration,

    /// Messages each room keeps in memory, as the frames already encoded for the broadcast,
    /// for joins with `history`/`since` and the paging API; 0 turns history off.
    /// Unit: messages per room. Default: 100.
    #[arg(long, env = "ROOMCAST_HISTORY", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub history: u32,

    /// What happens to a member that falls `--room-buffer` messages behind: `evict` closes it
    /// with 1008 "slow consumer"; `resync` sends it a `lagged` frame naming the seqs it missed
    /// and keeps it in the room. Default: evict.
    #[arg(long, env = "ROOMCAST_LAG_POLICY", value_enum, default_value = "evict")]
    pub lag_policy: LagPolicy,

    /// A message whose `id` repeats one published in the same room within this window is
    /// acknowledged but not broadcast again; 0 turns deduplication off.
    /// Unit: seconds. Default: 120.
    #[arg(long, env = "ROOMCAST_DEDUPE_WINDOW", default_value = "120", value_parser = parse_secs_or_zero)]
    pub dedupe_window: Duration,

    /// Most message ids a room remembers for deduplication; past it the oldest is forgotten
    /// before its window ends. Unit: ids per room. Default: 10000.
    #[arg(long, env = "ROOMCAST_DEDUPE_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub dedupe_max: u32,

    /// SQLite file for durable history (created if missing; WAL mode). Messages are written in
    /// batches by a dedicated thread and served across restarts. Default: none (memory only).
    #[arg(long, env = "ROOMCAST_HISTORY_DB")]
    pub history_db: Option<PathBuf>,

    /// What the history database keeps: an age (`90s`, `30m`, `12h`, `7d`) or a bare number of
    /// messages per room (`1000`). Older messages are pruned every minute. Default: 7d.
    #[arg(long, env = "ROOMCAST_RETENTION", default_value = "7d")]
    pub retention: Retention,

    /// Messages waiting for the history database writer; past it new messages are not written
    /// (counted as `history_db_dropped`) and delivery goes on. Unit: messages. Default: 16384.
    #[arg(long, env = "ROOMCAST_HISTORY_DB_QUEUE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub history_db_queue: u32,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands other than serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print an HS256 access token signed with --jwt-secret (for development).
    Token {
        /// The user name (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Rooms the token allows, comma-separated, `prefix*` wildcards (`general,post:*`).
        /// Default: every room.
        #[arg(long)]
        rooms: Option<String>,
        /// Lifetime (`90s`, `15m`, `1h`, `7d`). Default: 1h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

impl Config {
    /// The per-connection limit, if any.
    pub fn connection_rate(&self) -> Option<RateSpec> {
        self.rate_limit.0
    }

    /// The per-room limit, if any.
    pub fn room_rate(&self) -> Option<RateSpec> {
        self.room_rate_limit.0
    }

    /// The history part of the configuration.
    pub fn history_settings(&self) -> HistorySettings {
        HistorySettings {
            capacity: self.history as usize,
            dedupe_window: self.dedupe_window,
            dedupe_max: self.dedupe_max as usize,
            db: self.history_db.clone(),
            retention: self.retention,
            db_queue: self.history_db_queue as usize,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults live in the clap attributes above; parse an empty command line so that
        // the two can never disagree.
        Config::parse_from(["roomcast"])
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("`{s}` must be between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{s}` must be 1-64 printable ASCII characters without spaces"
        ));
    }
    Ok(s.to_owned())
}

fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_secs(s)
}

fn parse_millis(s: &str) -> Result<Duration, String> {
    let ms: u64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of milliseconds"))?;
    if ms == 0 || ms > 60_000 {
        return Err(format!("`{s}` must be between 1 and 60000 milliseconds"));
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.room_buffer, 1024);
        assert_eq!(c.write_timeout, Duration::from_secs(10));
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.presence_interval, Duration::from_millis(250));
        assert_eq!(c.threads, 0);
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.history, 100);
        assert_eq!(c.lag_policy, LagPolicy::Evict);
        assert_eq!(c.dedupe_window, Duration::from_secs(120));
        assert_eq!(c.history_db, None);
        assert_eq!(c.retention, Retention::Age(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.rate_limit.to_string(), "20:40");
        assert!(c.room_rate().is_none());
        assert!(c.jwt_secret.is_none() && c.api_key.is_none() && c.allowed_origins.is_empty());
        assert!(c.max_connections_per_ip.is_none());
        assert_eq!(c.rooms_config, None);
        assert_eq!(c.lobby_top, 50);
    }

    #[test]
    fn history_flags() {
        let c = Config::try_parse_from([
            "roomcast",
            "--history",
            "0",
            "--lag-policy",
            "resync",
            "--dedupe-window",
            "0",
            "--retention",
            "500",
        ])
        .unwrap();
        assert_eq!(c.history, 0);
        assert_eq!(c.lag_policy, LagPolicy::Resync);
        assert_eq!(c.dedupe_window, Duration::ZERO);
        assert_eq!(c.retention, Retention::PerRoom(500));
        assert!(Config::try_parse_from(["roomcast", "--lag-policy", "drop"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--retention", "7w"]).is_err());
    }

    #[test]
    fn token_subcommand_takes_the_global_secret() {
        let c = Config::try_parse_from([
            "roomcast",
            "token",
            "--jwt-secret",
            "k",
            "--sub",
            "alice",
            "--ttl",
            "15m",
        ])
        .unwrap();
        assert_eq!(c.jwt_secret.as_deref(), Some("k"));
        match c.command {
            Some(Command::Token { sub, rooms, ttl }) => {
                assert_eq!(sub, "alice");
                assert!(rooms.is_none());
                assert_eq!(ttl, Duration::from_secs(900));
            }
            None => panic!("expected the token command"),
        }
        let c =
            Config::try_parse_from(["roomcast", "--allowed-origins", "http://a,http://b"]).unwrap();
        assert_eq!(c.allowed_origins, ["http://a", "http://b"]);
    }

    #[test]
    fn rejects_nonsense_durations() {
        assert!(Config::try_parse_from(["roomcast", "--write-timeout", "0"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--ping-interval", "abc"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--ping-interval", "0.5"]).is_ok());
    }
}
