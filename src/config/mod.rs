//! Configuration: every bound the server enforces, parsed once in `main` and passed down.

pub mod rate;
pub mod rooms;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use rate::{RateLimitArg, RateSpec};

/// Server settings. Every field is a bound or a timing; the policy applied past each bound is
/// documented on the field and in docs/PROTOCOL.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "roomcast", version, about = "WebSocket room broadcast server")]
pub struct Config {
    /// Address to listen on. Default: 127.0.0.1:8080.
    #[arg(long, env = "ROOMCAST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A second address that alone serves `/metrics` and `/api/stats` (and `/healthz`), for a
    /// port only operators can reach; the main listener then answers 404 for those two.
    /// Default: unset (every route on `--listen`).
    #[arg(long, env = "ROOMCAST_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Messages a room buffers for its slowest member before that member is evicted
    /// (close 1008 "slow consumer"). Unit: messages. Default: 1024.
    #[arg(long, env = "ROOMCAST_ROOM_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub room_buffer: u32,

    /// A write to one socket that takes longer than this evicts it (close 1008 "slow consumer").
    /// Syntax: a duration, 1ms to 24h. Default: 10s.
    #[arg(long, env = "ROOMCAST_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub write_timeout: Duration,

    /// Idle sockets are pinged this often; a peer silent for two intervals is dropped
    /// (close 1008 "ping timeout"). Syntax: a duration, 1ms to 24h. Default: 30s.
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", default_value = "30s", value_parser = parse_timeout)]
    pub ping_interval: Duration,

    /// Presence events of one room are coalesced into at most one frame per interval.
    /// Syntax: a duration, 1ms to 60s. Default: 250ms.
    #[arg(long, env = "ROOMCAST_PRESENCE_INTERVAL", default_value = "250ms", value_parser = parse_presence_interval)]
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

    /// Rooms this process holds at once; a join that would create one more is refused (HTTP 503
    /// `max_rooms` before the upgrade, the error frame `max_rooms` after it), counted as
    /// `rooms_refused`. Unit: rooms. Default: 100000.
    #[arg(long, env = "ROOMCAST_MAX_ROOMS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_rooms: u64,

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
    /// or the socket is dropped (slow-header protection). Syntax: a duration, 1ms to 24h.
    /// Default: 10s.
    #[arg(long, env = "ROOMCAST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub handshake_timeout: Duration,

    /// A REST request body (`POST /api/rooms/{room}/messages`) must arrive whole within this
    /// after the request head, or the answer is 408 `body_timeout` (slow-body protection).
    /// Syntax: a duration, 1ms to 24h. Default: 10s.
    #[arg(long, env = "ROOMCAST_BODY_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub body_timeout: Duration,

    /// A WebSocket in no room (connected to `/ws` without one, or after leaving every room;
    /// `$lobby` counts as a room) is closed after this long (close 4002 "idle timeout").
    /// Joining a room stops the clock; leaving the last one starts it again.
    /// Syntax: a duration, 0s (off) to 24h. Default: 60s.
    #[arg(long, env = "ROOMCAST_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_optional_timeout)]
    pub idle_timeout: Duration,

    /// A WebSocket frame, and a fragmented message, must arrive whole within this from its
    /// first byte, or the socket is closed (close 1008 "message timeout": slow-frame
    /// protection). Syntax: a duration, 1ms to 24h. Default: 10s.
    #[arg(long, env = "ROOMCAST_MESSAGE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub message_timeout: Duration,

    /// An event stream (`GET /sse/{room}`) with nothing to send for this long sends a `: ping`
    /// comment, so that proxies do not close it as idle. Syntax: a number and its unit (`15s`,
    /// `500ms`; a bare number is refused), 1ms to 24h. Default: 15s.
    #[arg(long, env = "ROOMCAST_SSE_HEARTBEAT", default_value = "15s", value_parser = parse_sse_heartbeat)]
    pub sse_heartbeat: Duration,

    /// Adds a `/echo` WebSocket endpoint that echoes every text and binary message exactly, for
    /// conformance testing (Autobahn). Off by default: it is not part of the chat protocol.
    #[arg(long, env = "ROOMCAST_ECHO")]
    pub echo: bool,

    /// Time given to open sockets to receive their close 1012 on shutdown (paced by
    /// `--drain-rate`) before the process exits anyway. Syntax: a duration, 1ms to 24h. Default: 4s.
    #[arg(long, env = "ROOMCAST_SHUTDOWN_TIMEOUT", default_value = "4s", value_parser = parse_timeout)]
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

    /// With --jwt-secret: tokens must carry this `aud` claim (401 otherwise, an error frame on
    /// a refresh). Without it, a token that names any audience is refused. Default: off.
    #[arg(long, env = "ROOMCAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// With --jwt-secret: tokens must carry this `iss` claim (401 otherwise, an error frame on
    /// a refresh). Default: off.
    #[arg(long, env = "ROOMCAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, the write endpoints (REST publish) need `Authorization: Bearer <key>`.
    /// Default: off.
    #[arg(long, env = "ROOMCAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Comma-separated origins (`https://chat.example.com`) whose browser pages may open
    /// WebSockets; other `Origin`s get 403. Requests without `Origin` (non-browsers) pass.
    /// Default: any origin.
    #[arg(long, env = "ROOMCAST_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Comma-separated origins whose pages may call the REST API (`/api/...`) from a browser,
    /// with `Authorization`; `*` lets any other origin use the GET routes, without
    /// `Authorization` (never publish). Preflights from other origins get 403. Default: none
    /// (no CORS headers).
    #[arg(long, env = "ROOMCAST_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Messages one socket may send: `N/s` or `N/m`, optionally ` burst B` (B defaults to N), or
    /// `off`. Excess messages get an error frame with `retry_after_ms`; B refusals in a row
    /// close the socket (1008). Default: 20/s burst 40.
    #[arg(long, env = "ROOMCAST_RATE_LIMIT", default_value = "20/s burst 40")]
    pub rate_limit: RateLimitArg,

    /// Messages one room accepts: `N/s` or `N/m`, optionally ` burst B` (B defaults to N), or
    /// `off`. Excess publishes get an error frame with `retry_after_ms` (HTTP 429 for REST).
    /// A room's `rate_limit` in the rooms file overrides it. Default: off.
    #[arg(long, env = "ROOMCAST_ROOM_RATE_LIMIT", default_value = "off")]
    pub room_rate_limit: RateLimitArg,

    /// WebSocket connections one client address may hold at once; one more gets HTTP 429.
    /// Behind a proxy, set `--trusted-proxies` so that the address is the client's, not the
    /// proxy's. Syntax: a count ≥ 1, or `off`. Default: 4096.
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS_PER_IP", default_value = "4096")]
    pub max_connections_per_ip: PerIpCap,

    /// Comma-separated addresses or CIDRs (`10.0.0.0/8,127.0.0.1`) of proxies whose
    /// `Forwarded` / `X-Forwarded-For` headers are believed: a request from one of them is
    /// charged to the client address the headers name (the last one that is not itself a
    /// trusted proxy) for the per-IP cap and the failure lockout. Default: none (the headers
    /// are ignored).
    #[arg(long, env = "ROOMCAST_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Per-room settings file (TOML: `[defaults]` and `[rooms."NAME"]` / `[rooms."PREFIX*"]`
    /// with `password`, `max_members`, `history`, `rate_limit`, `presence`, `room_buffer`,
    /// `compression`; `[routes]` mapping URL path templates to rooms).
    /// A bad file stops the server at start; SIGHUP reloads it, keeping the old settings if the
    /// new file is bad. Default: none (every room open, flags' values).
    #[arg(long, env = "ROOMCAST_ROOMS_CONFIG")]
    pub rooms_config: Option<PathBuf>,

    /// Rooms listed, busiest first, in the `$lobby`'s `room_counts` frame (at most one a
    /// second). Unit: rooms. Default: 50.
    #[arg(long, env = "ROOMCAST_LOBBY_TOP", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub lobby_top: u16,

    /// Members a `welcome` lists, by id (the rest are paged with `GET /api/rooms/{room}`); 0:
    /// welcomes list none. Only rooms whose presence is `events` list names. Unit: members.
    /// Default: 100.
    #[arg(long, env = "ROOMCAST_ROSTER_LIMIT", default_value_t = 100, value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub roster_limit: u16,

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
    /// then gets the `cluster_unavailable` error. Syntax: a duration, 1ms to 24h. Default: 2s.
    #[arg(long, env = "ROOMCAST_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_timeout)]
    pub redis_timeout: Duration,

    /// Cluster mode: how long the counts of a process that stopped heartbeating (killed,
    /// partitioned) stay in the cluster-wide counts. Heartbeats go every third of it.
    /// Syntax: a duration, 1ms to 24h. Default: 15s.
    #[arg(long, env = "ROOMCAST_CLUSTER_NODE_TTL", default_value = "15s", value_parser = parse_timeout)]
    pub cluster_node_ttl: Duration,

    /// Messages each room keeps in memory, as the frames already encoded for the broadcast,
    /// for joins with `history`/`since` and the paging API; 0 turns history off.
    /// Unit: messages per room. Default: 100.
    #[arg(long, env = "ROOMCAST_HISTORY", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub history: u32,

    /// Bytes of kept history (encoded frames) every room together may hold in memory; past it
    /// the room that keeps a new message drops its own oldest ones (counted as
    /// `history_trimmed`). Unit: bytes. Default: 268435456 (256 MiB).
    #[arg(long, env = "ROOMCAST_HISTORY_MEMORY", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
    pub history_memory: u64,

    /// Bytes of kept history one room may hold in memory (the rooms file's `history_bytes`
    /// overrides it per room); past it the room drops its oldest kept messages (counted as
    /// `history_trimmed`). Unit: bytes. Default: 16777216 (16 MiB).
    #[arg(long, env = "ROOMCAST_ROOM_HISTORY_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
    pub room_history_bytes: u64,

    /// What happens to a member that falls `--room-buffer` messages behind: `evict` closes it
    /// with 1008 "slow consumer"; `resync` sends it a `lagged` frame naming the seqs it missed
    /// and keeps it in the room. Default: evict.
    #[arg(long, env = "ROOMCAST_LAG_POLICY", value_enum, default_value = "evict")]
    pub lag_policy: LagPolicy,

    /// A message whose `id` repeats one published in the same room within this window is
    /// acknowledged but not broadcast again; `0s` turns deduplication off.
    /// Syntax: a duration, 0s to 24h. Default: 2m.
    #[arg(long, env = "ROOMCAST_DEDUPE_WINDOW", default_value = "2m", value_parser = parse_dedupe_window)]
    pub dedupe_window: Duration,

    /// Most message ids a room remembers for deduplication; past it the oldest is forgotten
    /// before its window ends. Unit: ids per room. Default: 10000.
    #[arg(long, env = "ROOMCAST_DEDUPE_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub dedupe_max: u32,

    /// SQLite file for durable history (created if missing; WAL mode). Messages are written in
    /// batches by a dedicated thread and served across restarts. Default: none (memory only).
    #[arg(long, env = "ROOMCAST_HISTORY_DB")]
    pub history_db: Option<PathBuf>,

    /// What the history database keeps: an age, as a duration from 1s to 3650d (`90s`, `12h`,
    /// `7d`), or a number of messages per room (`1000 messages`). Older messages are pruned every
    /// minute. Default: 7d.
    #[arg(long, env = "ROOMCAST_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub retention: Retention,

    /// Messages waiting for the history database writer; past it new messages are not written
    /// (counted as `history_db_dropped`) and delivery goes on. Unit: messages. Default: 16384.
    #[arg(long, env = "ROOMCAST_HISTORY_DB_QUEUE", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub history_db_queue: u32,

    /// Frame bytes waiting for the history database writer; past it new messages are not
    /// written (counted as `history_db_dropped`) and delivery goes on. Unit: bytes.
    /// Default: 67108864 (64 MiB).
    #[arg(long, env = "ROOMCAST_HISTORY_DB_QUEUE_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub history_db_queue_bytes: u64,

    /// Not a flag: tests set it in-process to make every page read from `--history-db` sleep
    /// this long first, as on a slow disk.
    #[arg(skip)]
    pub fault_page_read_delay: Duration,

    // Bounded by design: admission and the shutdown drain.
    /// WebSocket upgrades this process accepts: `N/s` or `N/m`, optionally ` burst B`
    /// (B defaults to N), or `off`. An upgrade past it gets HTTP 503 `accept_rate` with
    /// `Retry-After`, before any other work. Default: off.
    #[arg(long, env = "ROOMCAST_ACCEPT_RATE", default_value = "off", value_parser = parse_current_rate)]
    pub accept_rate: RateLimitArg,

    /// On shutdown, WebSockets closed per unit of time (close 1012 with a jittered
    /// `retry_after_ms`), so that clients do not all reconnect at once: `N/s` or `N/m`, or `off`
    /// (or `0`) to close every socket at once. What is still open when `--shutdown-timeout`
    /// nears its end is closed at once. Default: 1000/s.
    #[arg(long, env = "ROOMCAST_DRAIN_RATE", default_value = "1000/s", value_parser = parse_drain_rate)]
    pub drain_rate: RateLimitArg,

    // permessage-deflate (RFC 7692).
    /// permessage-deflate for clients that offer it: `on` or `off`. Each room message is
    /// compressed at most once, and that one frame goes to every member that negotiated it; a
    /// room's `compression = false` in the rooms file turns it off there. Clients that do not
    /// offer it always get plain frames. Default: on.
    #[arg(long, env = "ROOMCAST_COMPRESSION", value_enum, default_value = "on")]
    pub compression: Switch,

    /// Room messages whose JSON payload is shorter than this go uncompressed, even to sockets
    /// that negotiated compression: deflate without a shared dictionary saves little on short
    /// messages and still costs a compressor pass. Unit: bytes. Default: 256.
    #[arg(long, env = "ROOMCAST_COMPRESSION_MIN_BYTES", default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=(64 << 20)))]
    pub compression_min_bytes: u32,

    /// A room that publishes again less than this after its previous message holds its
    /// messages for at most this long and sends them together, so each member writes them in
    /// one vectored write; a room quieter than one message per interval sends each at once.
    /// `0` turns coalescing off. Syntax: a number and its unit (`1ms`, `500us`; a bare number
    /// other than `0` is refused), 0 to 100ms. Default: 1ms.
    #[arg(long, env = "ROOMCAST_WRITE_COALESCE", default_value = "1ms", value_parser = parse_write_coalesce)]
    pub write_coalesce: Duration,

    /// Most messages a busy room holds before it sends them without waiting out
    /// `--write-coalesce`. Unit: messages, 1 to 1024. Default: 16.
    #[arg(long, env = "ROOMCAST_WRITE_COALESCE_FRAMES", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub write_coalesce_frames: u16,

    // Built-in accounts.
    /// SQLite file of built-in accounts (created if missing, readable by this user only, WAL
    /// mode). When set, users register (`POST /register`) and log in (`POST /token`) for an
    /// access token signed with --jwt-secret, which it needs: without it the server refuses
    /// to start. Processes on one machine may share the file. Default: off.
    #[arg(long, env = "ROOMCAST_ACCOUNTS_DB", global = true)]
    pub accounts_db: Option<PathBuf>,

    /// With --accounts-db: who creates accounts. `open`: anyone, with `POST /register`;
    /// `closed`: `POST /register` answers 403 and only `roomcast user add` creates them.
    /// Default: open.
    #[arg(
        long,
        env = "ROOMCAST_ACCOUNTS_REGISTER",
        value_enum,
        default_value = "open"
    )]
    pub accounts_register: Registration,

    /// With --accounts-db: lifetime of the tokens that `POST /token` and `POST /token/refresh`
    /// issue. Syntax: a duration, 10s to 30d. Default: 1h.
    #[arg(long, env = "ROOMCAST_ACCOUNTS_TOKEN_TTL", default_value = "1h", value_parser = parse_accounts_ttl)]
    pub accounts_token_ttl: Duration,

    /// With --accounts-db: the rooms the tokens issued to accounts allow, comma-separated names
    /// and `prefix*` wildcards (`general,post:*,$lobby`); `*` is every room, `$lobby` included.
    /// Direct-message rooms naming the user are always allowed. Default: *.
    #[arg(long, env = "ROOMCAST_ACCOUNTS_ROOMS", default_value = "*", value_parser = parse_rooms_grant)]
    pub accounts_rooms: String,

    /// With --accounts-db: registrations one client address may make: `N/s` or `N/m`,
    /// optionally ` burst B` (B defaults to N), or `off`. Past it: HTTP 429 `rate_limited` with
    /// `Retry-After`. Default: 1/m burst 5.
    #[arg(long, env = "ROOMCAST_ACCOUNTS_REGISTER_RATE", default_value = "1/m burst 5", value_parser = parse_current_rate)]
    pub accounts_register_rate: RateLimitArg,

    /// With --accounts-db: password hashes (Argon2id, 19 MiB and tens of milliseconds of one core
    /// each) computed at once, each on a thread of its own at the lowest CPU priority; requests
    /// beyond them wait, 32 per slot, and past that get HTTP 503 `accounts_busy`. 0: half the
    /// CPU cores, at least 1.
    /// Unit: hashes. Default: 0.
    #[arg(long, env = "ROOMCAST_ACCOUNTS_HASH_SLOTS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub accounts_hash_slots: u16,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Who creates accounts (`--accounts-register`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Registration {
    /// Anyone, with `POST /register`.
    Open,
    /// The operator alone, with `roomcast user add`.
    Closed,
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
        /// Lifetime. Syntax: a duration, 1s to 3650d (`90s`, `15m`, `1h`, `7d`). Default: 1h.
        #[arg(long, default_value = "1h", value_parser = parse_token_ttl)]
        ttl: Duration,
        /// The audience (`aud` claim), for a server run with --jwt-audience. Default: none.
        #[arg(long)]
        aud: Option<String>,
        /// The issuer (`iss` claim), for a server run with --jwt-issuer. Default: none.
        #[arg(long)]
        iss: Option<String>,
    },
    /// Manage the built-in accounts of --accounts-db (the server may be running).
    User {
        #[command(subcommand)]
        action: UserCommand,
    },
}

/// `roomcast user …`.
#[derive(Debug, Clone, Subcommand)]
pub enum UserCommand {
    /// Create an account. The password is read from standard input: asked for, without echo,
    /// on a terminal; the first line otherwise.
    Add {
        /// The user name: 1-32 characters, no control or invisible character, no space at
        /// either end; unique ignoring case.
        name: String,
        /// Read the password from the first line of standard input without asking, even on a
        /// terminal (scripts). Default: off.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete an account. Tokens already issued stay valid until they expire, but cannot be
    /// refreshed.
    Del {
        /// The user name (any case).
        name: String,
    },
    /// List the accounts: name and creation time.
    List,
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

    /// `--accept-rate`, if any.
    pub fn accept_rate(&self) -> Option<RateSpec> {
        self.accept_rate.0
    }

    /// `--drain-rate` in connections per second; `None` closes every socket at once.
    pub fn drain_per_second(&self) -> Option<f64> {
        self.drain_rate
            .0
            .map(|spec| f64::from(spec.count.get()) / spec.unit.duration().as_secs_f64())
    }

    /// `--idle-timeout`, or `None` when it is off (`0s`).
    pub fn idle_timeout(&self) -> Option<Duration> {
        (!self.idle_timeout.is_zero()).then_some(self.idle_timeout)
    }
}

/// A rate in the current syntax only: a new flag never took the old spellings.
fn parse_current_rate(s: &str) -> Result<RateLimitArg, String> {
    RateLimitArg::parse_current(s)
}

/// `--accounts-token-ttl`: 10s to 30d, humantime form only (a new flag never took another).
fn parse_accounts_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s, Duration::from_secs(10), DAY * 30, Duration::from_secs(1))? {
        (d, None) => Ok(d),
        (_, Some(_)) => Err(format!(
            "`{}` has no unit: write it like 15m, 1h, 7d",
            s.trim()
        )),
    }
}

/// `--accounts-rooms`: a `rooms` claim as `roomcast token --rooms` takes it: comma-separated
/// room names and `prefix*` patterns, at least one.
fn parse_rooms_grant(s: &str) -> Result<String, String> {
    let patterns: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if patterns.is_empty() {
        return Err("give at least one room or pattern: `*`, or like `general,post:*`".into());
    }
    for p in &patterns {
        let name = p.strip_suffix('*').unwrap_or(p);
        let ok = *p == crate::proto::names::LOBBY
            || name.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'_' | b'-' | b'.' | b':' | b'#' | b'@' | b'+')
            });
        if !ok {
            return Err(format!(
                "`{p}` is neither a room name nor a `prefix*` pattern (A-Z a-z 0-9 _ - . : # @)"
            ));
        }
    }
    Ok(patterns.join(","))
}

/// `--drain-rate`: `N/s`, `N/m`, `off` or `0`; a burst means nothing here.
fn parse_drain_rate(s: &str) -> Result<RateLimitArg, String> {
    if s.trim() == "0" {
        return Ok(RateLimitArg(None));
    }
    let rate = RateLimitArg::parse_current(s)?;
    match rate.0 {
        Some(spec) if spec.burst != spec.count => Err(format!(
            "`{}`: the drain rate takes no burst: write `N/s`, `N/m` or `off`",
            s.trim()
        )),
        _ => Ok(rate),
    }
}

/// `--max-connections-per-ip`: a count, or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpCap(pub Option<u32>);

impl std::str::FromStr for PerIpCap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(PerIpCap(None)),
            n => match n.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(PerIpCap(Some(n))),
                _ => Err(format!(
                    "`{n}`: expected a count of connections ≥ 1, or `off`"
                )),
            },
        }
    }
}

/// A CIDR (`10.0.0.0/8`) or a single address (`127.0.0.1`, a /32 or /128).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{s}`: expected an address or a CIDR such as 10.0.0.0/8"))
}

/// What a member does when it falls `--room-buffer` frames behind a room.
/// A feature switch (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    Off,
    On,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LagPolicy {
    /// Close it with 1008 "slow consumer".
    Evict,
    /// Tell it which seqs it missed (`lagged` frame) and keep it in the room.
    Resync,
}

/// How much the archive keeps (`--retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Messages younger than this.
    Age(Duration),
    /// The last N messages of each room.
    PerRoom(u64),
}

impl Default for Retention {
    fn default() -> Self {
        Retention::Age(Duration::from_secs(7 * 86_400))
    }
}

impl Default for Config {
    fn default() -> Self {
        // The defaults live in the clap attributes above; parse an empty command line so that
        // the two can never disagree.
        Config::parse_from(["roomcast"])
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{s}` must be 1-64 printable ASCII characters without spaces"
        ));
    }
    Ok(s.to_owned())
}

/// A duration in humantime form (`30s`, `250ms`, `1h 30m`, `7d`; `0` alone is zero) from `min`
/// to `max`. A bare number is the spelling before durations had units: it still reads, as that
/// many `bare_unit`s, for one release; the second value then is the current spelling, for the
/// warning printed at start.
fn parse_duration(
    s: &str,
    min: Duration,
    max: Duration,
    bare_unit: Duration,
) -> Result<(Duration, Option<String>), String> {
    let s = s.trim();
    let (d, deprecated) = match humantime::parse_duration(s) {
        Ok(d) => (d, false),
        Err(e) => {
            let bare = s
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .and_then(|n| Duration::try_from_secs_f64(n * bare_unit.as_secs_f64()).ok());
            match bare {
                Some(d) => (d, true),
                None => {
                    return Err(format!(
                        "`{s}` is not a duration ({e}): write a number and a unit, like 250ms, 30s, 5m, 7d"
                    ))
                }
            }
        }
    };
    if d < min || d > max {
        return Err(format!(
            "`{s}` is out of range: from {} to {}",
            show_bound(min),
            show_bound(max)
        ));
    }
    Ok((
        d,
        deprecated.then(|| humantime::format_duration(d).to_string()),
    ))
}

const DAY: Duration = Duration::from_secs(86_400);

/// A range's end as the documentation writes it: `24h` and `3650d` rather than humantime's
/// `1day` and `9years 11months …`.
fn show_bound(d: Duration) -> String {
    let secs = d.as_secs();
    match (d.subsec_nanos(), secs) {
        (0, 0) => "0s".to_owned(),
        (0, s) if s > DAY.as_secs() && s % DAY.as_secs() == 0 => format!("{}d", s / 86_400),
        (0, s) if s % 3600 == 0 => format!("{}h", s / 3600),
        (0, s) => format!("{s}s"),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// Timeouts and intervals: 1ms to 24h; a bare number is seconds (deprecated).
fn parse_timeout_spelling(s: &str) -> Result<(Duration, Option<String>), String> {
    parse_duration(s, Duration::from_millis(1), DAY, Duration::from_secs(1))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_timeout_spelling(s).map(|(d, _)| d)
}

/// `--write-coalesce`: 0 (off) to 100ms, with its unit (the flag never took a bare number).
fn parse_write_coalesce(s: &str) -> Result<Duration, String> {
    match parse_duration(
        s,
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::ZERO,
    )? {
        (d, None) => Ok(d),
        (_, Some(_)) if s.trim() == "0" => Ok(Duration::ZERO),
        (_, Some(_)) => Err(format!(
            "`{s}` has no unit: write a number and a unit, like 1ms"
        )),
    }
}

/// `--sse-heartbeat`: 1ms to 24h, with its unit (the flag never took a bare number).
fn parse_sse_heartbeat(s: &str) -> Result<Duration, String> {
    match parse_timeout_spelling(s)? {
        (d, None) => Ok(d),
        (_, Some(_)) => Err(format!(
            "`{s}` has no unit: write a number and a unit, like 15s"
        )),
    }
}

/// `--presence-interval`: 1ms to 60s; a bare number is milliseconds (deprecated).
fn parse_presence_interval_spelling(s: &str) -> Result<(Duration, Option<String>), String> {
    parse_duration(
        s,
        Duration::from_millis(1),
        Duration::from_secs(60),
        Duration::from_millis(1),
    )
}

fn parse_presence_interval(s: &str) -> Result<Duration, String> {
    parse_presence_interval_spelling(s).map(|(d, _)| d)
}

/// `--dedupe-window`: 0s (off) to 24h; a bare number is seconds (deprecated).
fn parse_dedupe_window_spelling(s: &str) -> Result<(Duration, Option<String>), String> {
    parse_duration(s, Duration::ZERO, DAY, Duration::from_secs(1))
}

fn parse_dedupe_window(s: &str) -> Result<Duration, String> {
    parse_dedupe_window_spelling(s).map(|(d, _)| d)
}

/// Timeouts that may be off: 0s (off) to 24h; a bare number is seconds (deprecated).
fn parse_optional_timeout_spelling(s: &str) -> Result<(Duration, Option<String>), String> {
    parse_duration(s, Duration::ZERO, DAY, Duration::from_secs(1))
}

fn parse_optional_timeout(s: &str) -> Result<Duration, String> {
    parse_optional_timeout_spelling(s).map(|(d, _)| d)
}

/// `token --ttl`: 1s to 3650d, humantime form only (it never took another).
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(
        s,
        Duration::from_secs(1),
        DAY * 3650,
        Duration::from_secs(1),
    )? {
        (d, None) => Ok(d),
        (_, Some(_)) => Err(format!(
            "`{}` has no unit: write it like 15m, 1h, 7d",
            s.trim()
        )),
    }
}

/// `--retention`: an age (a duration from 1s to 3650d) or `N messages` per room. A bare number
/// of messages is the spelling before this one (deprecated).
fn parse_retention_spelling(s: &str) -> Result<(Retention, Option<String>), String> {
    let s = s.trim();
    let count = |n: &str| n.parse::<u64>().ok().filter(|n| *n > 0);
    let words: Vec<&str> = s.split_whitespace().collect();
    if let [n, "messages" | "message"] = words[..] {
        return count(n)
            .map(|n| (Retention::PerRoom(n), None))
            .ok_or_else(|| format!("`{s}`: the number of messages must be a positive integer"));
    }
    if let Some(n) = count(s) {
        return Ok((Retention::PerRoom(n), Some(format!("{n} messages"))));
    }
    match parse_duration(s, Duration::from_secs(1), DAY * 3650, Duration::from_secs(1)) {
        Ok((age, None)) => Ok((Retention::Age(age), None)),
        _ => Err(format!(
            "`{s}` is neither an age from 1s to 3650d (90s, 12h, 7d) nor `N messages` (1000 messages)"
        )),
    }
}

fn parse_retention(s: &str) -> Result<Retention, String> {
    parse_retention_spelling(s).map(|(r, _)| r)
}

/// How a flag's value is read, for finding the deprecated spellings in [`deprecated_spellings`].
#[derive(Clone, Copy)]
enum Syntax {
    Timeout,
    OptionalTimeout,
    PresenceInterval,
    DedupeWindow,
    Retention,
    Rate,
    /// A rate flag that only ever read the current syntax.
    CurrentRate,
    /// A duration flag that only ever read the current syntax.
    CurrentDuration,
}

impl Syntax {
    /// The current spelling of `s` when `s` is a deprecated one.
    fn current_spelling(self, s: &str) -> Option<String> {
        match self {
            Syntax::Timeout => parse_timeout_spelling(s).ok()?.1,
            Syntax::OptionalTimeout => parse_optional_timeout_spelling(s).ok()?.1,
            Syntax::PresenceInterval => parse_presence_interval_spelling(s).ok()?.1,
            Syntax::DedupeWindow => parse_dedupe_window_spelling(s).ok()?.1,
            Syntax::Retention => parse_retention_spelling(s).ok()?.1,
            Syntax::Rate => RateLimitArg::parse(s).ok()?.1,
            Syntax::CurrentRate | Syntax::CurrentDuration => None,
        }
    }
}

/// The flags that still read a deprecated spelling, by clap id.
const DEPRECATABLE: [(&str, Syntax); 18] = [
    ("write_timeout", Syntax::Timeout),
    ("ping_interval", Syntax::Timeout),
    ("presence_interval", Syntax::PresenceInterval),
    ("handshake_timeout", Syntax::Timeout),
    ("body_timeout", Syntax::Timeout),
    ("idle_timeout", Syntax::OptionalTimeout),
    ("message_timeout", Syntax::Timeout),
    ("shutdown_timeout", Syntax::Timeout),
    ("redis_timeout", Syntax::Timeout),
    ("cluster_node_ttl", Syntax::Timeout),
    ("dedupe_window", Syntax::DedupeWindow),
    ("retention", Syntax::Retention),
    ("rate_limit", Syntax::Rate),
    ("room_rate_limit", Syntax::Rate),
    ("accept_rate", Syntax::CurrentRate),
    ("drain_rate", Syntax::CurrentRate),
    ("accounts_token_ttl", Syntax::CurrentDuration),
    ("accounts_register_rate", Syntax::CurrentRate),
];

/// One warning per flag or environment variable given in a spelling that is going away, naming
/// it and the current spelling (`--ping-interval 30` is deprecated: write `--ping-interval 30s`).
/// `main` prints them once at start; the values themselves were already read by [`Config`].
pub fn deprecated_spellings(matches: &clap::ArgMatches) -> Vec<String> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let command = Config::command();
    let mut warnings = Vec::new();
    for (id, syntax) in DEPRECATABLE {
        let Some(arg) = command.get_arguments().find(|a| a.get_id() == id) else {
            continue;
        };
        let source = matches.value_source(id);
        let Ok(Some(raw)) = matches.try_get_raw(id) else {
            continue;
        };
        for value in raw {
            let value = value.to_string_lossy();
            let Some(current) = syntax.current_spelling(&value) else {
                continue;
            };
            let quote = |v: &str| {
                if v.contains(' ') {
                    format!("\"{v}\"")
                } else {
                    v.to_owned()
                }
            };
            let (old, new) = match (source, arg.get_env()) {
                (Some(ValueSource::EnvVariable), Some(env)) => {
                    let env = env.to_string_lossy();
                    (
                        format!("{env}={}", quote(&value)),
                        format!("{env}={}", quote(&current)),
                    )
                }
                _ => {
                    let long = arg.get_long().unwrap_or(id);
                    (
                        format!("--{long} {}", quote(&value)),
                        format!("--{long} {}", quote(&current)),
                    )
                }
            };
            warnings.push(format!(
                "`{old}` is deprecated and will stop working in the next release: write `{new}`"
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use std::path::Path;

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
        assert_eq!(c.rate_limit.to_string(), "20/s burst 40");
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.body_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout(), Some(Duration::from_secs(60)));
        assert_eq!(c.message_timeout, Duration::from_secs(10));
        assert_eq!(c.sse_heartbeat, Duration::from_secs(15));
        assert!(Config::try_parse_from(["roomcast", "--sse-heartbeat", "15"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--sse-heartbeat", "0s"]).is_err());
        assert_eq!(c.shutdown_timeout, Duration::from_secs(4));
        assert_eq!(c.redis_timeout, Duration::from_secs(2));
        assert_eq!(c.cluster_node_ttl, Duration::from_secs(15));
        assert!(c.room_rate().is_none());
        assert!(c.jwt_secret.is_none() && c.api_key.is_none() && c.allowed_origins.is_empty());
        assert_eq!(c.max_connections_per_ip, PerIpCap(Some(4096)));
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(c.rooms_config, None);
        assert_eq!(c.lobby_top, 50);
        assert_eq!(c.roster_limit, 100);
        assert!(c.accept_rate().is_none());
        assert_eq!(c.drain_per_second(), Some(1000.0));
    }

    #[test]
    fn drain_and_accept_rates() {
        let parse = |args: &[&str]| Config::try_parse_from(["roomcast"].iter().chain(args));
        let c = parse(&["--drain-rate", "120/m", "--accept-rate", "50/s burst 200"]).unwrap();
        assert_eq!(c.drain_per_second(), Some(2.0));
        assert_eq!(c.accept_rate().map(|s| s.burst.get()), Some(200));
        assert_eq!(
            parse(&["--drain-rate", "0"]).unwrap().drain_per_second(),
            None
        );
        assert_eq!(
            parse(&["--drain-rate", "off"]).unwrap().drain_per_second(),
            None
        );
        assert!(parse(&["--drain-rate", "10/s burst 20"]).is_err());
        assert!(
            parse(&["--accept-rate", "5:10"]).is_err(),
            "no old spellings"
        );
        assert!(parse(&["--accept-rate", "0/s"]).is_err());
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
            "0s",
            "--retention",
            "500 messages",
        ])
        .unwrap();
        assert_eq!(c.history, 0);
        assert_eq!(c.lag_policy, LagPolicy::Resync);
        assert_eq!(c.dedupe_window, Duration::ZERO);
        assert_eq!(c.retention, Retention::PerRoom(500));
        assert!(Config::try_parse_from(["roomcast", "--lag-policy", "drop"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--retention", "7x"]).is_err());
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
            "--aud",
            "chat",
        ])
        .unwrap();
        assert_eq!(c.jwt_secret.as_deref(), Some("k"));
        match c.command {
            Some(Command::Token {
                sub,
                rooms,
                ttl,
                aud,
                iss,
            }) => {
                assert_eq!((aud.as_deref(), iss), (Some("chat"), None));
                assert_eq!(sub, "alice");
                assert!(rooms.is_none());
                assert_eq!(ttl, Duration::from_secs(900));
            }
            other => panic!("expected the token command, got {other:?}"),
        }
        let c =
            Config::try_parse_from(["roomcast", "--allowed-origins", "http://a,http://b"]).unwrap();
        assert_eq!(c.allowed_origins, ["http://a", "http://b"]);
    }

    #[test]
    fn account_flags() {
        let c = Config::default();
        assert_eq!(c.accounts_db, None);
        assert_eq!(c.accounts_register, Registration::Open);
        assert_eq!(c.accounts_token_ttl, Duration::from_secs(3600));
        assert_eq!(c.accounts_rooms, "*");
        assert_eq!(c.accounts_register_rate.to_string(), "1/m burst 5");
        assert_eq!(c.accounts_hash_slots, 0);
        let parse = |args: &[&str]| Config::try_parse_from(["roomcast"].iter().chain(args));
        let c = parse(&[
            "--accounts-rooms",
            " general, post:* ,$lobby",
            "--accounts-register",
            "closed",
        ])
        .unwrap();
        assert_eq!(c.accounts_rooms, "general,post:*,$lobby");
        assert_eq!(c.accounts_register, Registration::Closed);
        for bad in [
            &["--accounts-rooms", ","][..],
            &["--accounts-rooms", "a b"],
            &["--accounts-token-ttl", "3600"],
            &["--accounts-token-ttl", "5s"],
            &["--accounts-token-ttl", "31d"],
            &["--accounts-register", "maybe"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // The database is global: `roomcast user add --accounts-db FILE NAME`.
        let c = parse(&["user", "add", "--accounts-db", "/tmp/a.db", "alice"]).unwrap();
        assert_eq!(c.accounts_db.as_deref(), Some(Path::new("/tmp/a.db")));
        match c.command {
            Some(Command::User {
                action:
                    UserCommand::Add {
                        name,
                        password_stdin,
                    },
            }) => assert_eq!((name.as_str(), password_stdin), ("alice", false)),
            other => panic!("expected user add, got {other:?}"),
        }
    }

    #[test]
    fn rejects_nonsense_durations() {
        let parses =
            |args: &[&str]| Config::try_parse_from(["roomcast"].iter().chain(args)).is_ok();
        assert!(!parses(&["--write-timeout", "0s"]));
        assert!(!parses(&["--write-timeout", "0"]));
        assert!(!parses(&["--ping-interval", "abc"]));
        assert!(!parses(&["--ping-interval", "25h"]));
        assert!(!parses(&["--presence-interval", "2m"]));
        assert!(!parses(&["--ping-interval", "-5"]));
        assert!(!parses(&["--ping-interval", "NaN"]));
        assert!(!parses(&["--ping-interval", "1e300"]));
        assert!(parses(&["--ping-interval", "500ms"]));
        assert!(!parses(&["--message-timeout", "0s"]));
        assert!(!parses(&["--body-timeout", "0s"]));
        assert!(!parses(&["--idle-timeout", "25h"]));
        assert!(parses(&["--ping-interval", "1m 30s"]));
        assert!(
            !parses(&["token", "--sub", "a", "--ttl", "3600"]),
            "the ttl never took seconds"
        );
        assert!(!parses(&["token", "--sub", "a", "--ttl", "0s"]));
    }

    #[test]
    fn durations_read_humantime() {
        let ok = |s: &str| parse_timeout_spelling(s).unwrap();
        assert_eq!(ok("30s"), (Duration::from_secs(30), None));
        assert_eq!(ok("250ms"), (Duration::from_millis(250), None));
        assert_eq!(ok("1.5s"), (Duration::from_millis(1500), None));
        assert_eq!(ok("2m"), (Duration::from_secs(120), None));
        assert_eq!(ok("24h"), (DAY, None));
        assert_eq!(
            parse_dedupe_window_spelling("0s").unwrap(),
            (Duration::ZERO, None)
        );
        assert_eq!(
            parse_dedupe_window_spelling("0").unwrap(),
            (Duration::ZERO, None)
        );
        assert_eq!(
            parse_presence_interval_spelling("50ms").unwrap(),
            (Duration::from_millis(50), None)
        );
        let e = parse_timeout_spelling("10x").unwrap_err();
        assert!(e.contains("`10x` is not a duration"), "{e}");
        let e = parse_timeout_spelling("0ms").unwrap_err();
        assert!(e.contains("out of range: from 1ms to 24h"), "{e}");
        let e = parse_presence_interval_spelling("61s").unwrap_err();
        assert!(e.contains("out of range: from 1ms to 60s"), "{e}");
        let e = parse_dedupe_window_spelling("2d").unwrap_err();
        assert!(e.contains("out of range: from 0s to 24h"), "{e}");
        let e = parse_token_ttl("3651d").unwrap_err();
        assert!(e.contains("out of range: from 1s to 3650d"), "{e}");
        assert_eq!(parse_token_ttl("7d").unwrap(), DAY * 7);
    }

    #[test]
    fn bare_numbers_are_deprecated_but_keep_their_unit() {
        assert_eq!(
            parse_timeout_spelling("30").unwrap(),
            (Duration::from_secs(30), Some("30s".into()))
        );
        assert_eq!(
            parse_timeout_spelling("0.5").unwrap(),
            (Duration::from_millis(500), Some("500ms".into()))
        );
        assert_eq!(
            parse_timeout_spelling("90").unwrap(),
            (Duration::from_secs(90), Some("1m 30s".into()))
        );
        // --presence-interval counted milliseconds.
        assert_eq!(
            parse_presence_interval_spelling("250").unwrap(),
            (Duration::from_millis(250), Some("250ms".into()))
        );
        assert_eq!(
            parse_dedupe_window_spelling("120").unwrap(),
            (Duration::from_secs(120), Some("2m".into()))
        );
        // The bounds hold for the old spelling too.
        assert!(parse_timeout_spelling("86401").is_err());
        assert!(parse_presence_interval_spelling("60001").is_err());
    }

    #[test]
    fn retention_is_an_age_or_a_message_count() {
        let r = |s: &str| parse_retention_spelling(s);
        assert_eq!(r("7d"), Ok((Retention::Age(DAY * 7), None)));
        assert_eq!(
            r("90s"),
            Ok((Retention::Age(Duration::from_secs(90)), None))
        );
        assert_eq!(r("2w"), Ok((Retention::Age(DAY * 14), None)));
        assert_eq!(r("1000 messages"), Ok((Retention::PerRoom(1000), None)));
        assert_eq!(r("1 message"), Ok((Retention::PerRoom(1), None)));
        assert_eq!(
            r("1000"),
            Ok((Retention::PerRoom(1000), Some("1000 messages".into())))
        );
        for bad in [
            "",
            "0",
            "0 messages",
            "-3 messages",
            "x messages",
            "500ms",
            "3651d",
            "7x",
            "7 days ago",
        ] {
            assert!(r(bad).is_err(), "{bad:?}");
        }
    }

    fn warnings(args: &[&str]) -> Vec<String> {
        let matches = Config::command()
            .try_get_matches_from(["roomcast"].iter().chain(args))
            .unwrap();
        assert!(Config::from_arg_matches(&matches).is_ok());
        deprecated_spellings(&matches)
    }

    #[test]
    fn deprecated_spellings_are_named_once_each() {
        assert!(warnings(&[]).is_empty(), "the defaults are current");
        assert!(warnings(&[
            "--ping-interval",
            "30s",
            "--rate-limit",
            "5/s burst 10",
            "--retention",
            "10 messages",
            "--dedupe-window",
            "0",
        ])
        .is_empty());
        let w = warnings(&[
            "--ping-interval",
            "30",
            "--presence-interval",
            "50",
            "--rate-limit",
            "20:40",
            "--room-rate-limit",
            "0",
            "--retention",
            "1000",
        ]);
        assert_eq!(
            w,
            [
                "`--ping-interval 30` is deprecated and will stop working in the next release: write `--ping-interval 30s`",
                "`--presence-interval 50` is deprecated and will stop working in the next release: write `--presence-interval 50ms`",
                "`--retention 1000` is deprecated and will stop working in the next release: write `--retention \"1000 messages\"`",
                "`--rate-limit 20:40` is deprecated and will stop working in the next release: write `--rate-limit \"20/s burst 40\"`",
                "`--room-rate-limit 0` is deprecated and will stop working in the next release: write `--room-rate-limit off`",
            ]
        );
    }

    #[test]
    fn every_duration_and_rate_flag_is_checked_for_old_spellings() {
        // A flag whose value is a duration or a rate and is missing from DEPRECATABLE would
        // never warn: catch it by its documented syntax.
        let command = Config::command();
        for arg in command.get_arguments() {
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            let timed = help.contains("Syntax: a duration") || help.contains("`N/s`");
            let listed = DEPRECATABLE.iter().any(|(id, _)| arg.get_id() == *id);
            assert_eq!(
                timed || arg.get_id() == "retention",
                listed,
                "{}",
                arg.get_id()
            );
        }
    }
}
