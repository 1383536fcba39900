//! Process-wide counters (served as `/api/stats` and Prometheus `/metrics`) and the small
//! lock-free windows behind the per-room live figures.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters shared by every task of one server. Cheap to update: each is one relaxed atomic.
pub struct Stats {
    pub connections: Gauge,
    pub rooms: Gauge,
    /// Text frames received from clients (every kind, not just chat messages).
    pub messages_in: Counter,
    /// Messages published into rooms (WebSocket and REST).
    pub published: Counter,
    /// Room frames written to sockets (one per member per message).
    pub frames_out: Counter,
    /// Socket writes that carried room frames; `frames_out / writes` is the batching factor.
    pub writes: Counter,
    /// Room frames serialised; with fan-out working this equals the published count plus
    /// presence frames, independent of the number of members.
    pub frames_encoded: Counter,
    /// Batches a busy room held and sent together (`--write-coalesce`), and the messages in
    /// them: `coalesced_frames / coalesced_batches` is how many frames a wake carried.
    pub coalesced_batches: Counter,
    pub coalesced_frames: Counter,
    /// Room rings replaced by a larger one because a member fell half a ring behind.
    pub rings_grown: Counter,
    pub evictions: Counter,
    pub connections_refused: Counter,
    /// Messages dropped by `--rate-limit` or `--room-rate-limit` (including flood closes).
    pub rate_limited: Counter,
    /// Requests and joins refused by the access rules, by reason.
    pub auth_refused: AuthRefused,
    /// Messages not broadcast because their `id` repeated one inside the dedupe window.
    pub duplicates: Counter,
    /// `lagged` notices sent instead of evictions (`--lag-policy resync`).
    pub lag_resyncs: Counter,
    /// Messages committed to the history database.
    pub history_db_written: Counter,
    /// HTTP connections dropped because the client took no bytes of a response within
    /// `--write-timeout`.
    pub http_write_timeouts: Counter,
    /// Joins refused because the process holds `--max-rooms` rooms.
    pub rooms_refused: Counter,
    /// Kept messages dropped from rooms' rings by `--history-memory` or a room's byte bound.
    pub history_trimmed: Counter,
    /// Room seeds read from the history database under the registry's lock, because the read
    /// made beforehand went stale (the room closed or its note changed meanwhile).
    pub history_db_locked_reads: Counter,
    /// Messages the history database never got: its writer queue was full, or they were not
    /// written by the shutdown deadline. Delivery is never affected.
    pub history_db_dropped: Counter,
    // Bounded by design: admission, the shutdown drain, presence names.
    /// Upgrades refused by `--accept-rate`.
    pub accept_rate_refused: Counter,
    /// Connections still waiting for their turn when the shutdown drain's deadline passed,
    /// closed at once.
    pub shutdown_late_closes: Counter,
    /// User names left out of presence frames (past the per-frame cap); the frame says
    /// `truncated`.
    pub presence_names_dropped: Counter,
    /// SIGHUP reloads of the rooms file refused (it did not read or check): the settings and
    /// routes in force stay.
    pub rooms_config_reloads_refused: Counter,
    /// Deadlines that closed a peer and hostile input dropped (one block, see [`Dropped`]).
    pub dropped: Dropped,
    /// Server-Sent Events (one block, see [`SseStats`]).
    pub sse: SseStats,
    /// permessage-deflate: work done and compressed input refused (one block, see
    /// [`Deflate`]).
    pub deflate: Deflate,
    /// Built-in accounts: registrations, logins, and what was refused (one block, see
    /// [`AccountStats`]).
    pub accounts: AccountStats,
    rss: Gauge,
    /// CPU seconds this process has used (user + system), refreshed when scraped: divided into
    /// the deliveries of a load test window it gives the server's cost per delivery.
    cpu: Gauge<f64, AtomicU64>,
    registry: Registry,
    started: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("roomcast");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let messages_in = counter("messages_in", "Text frames received from clients");
        let published = counter("published", "Messages published into rooms");
        let frames_out = counter("frames_out", "Room frames written to sockets");
        let writes = counter("writes", "Socket writes carrying room frames");
        let frames_encoded = counter("frames_encoded", "Room frames serialised (once each)");
        let coalesced_batches = counter(
            "coalesced_batches",
            "Batches of messages a busy room held and sent together (--write-coalesce)",
        );
        let coalesced_frames = counter(
            "coalesced_frames",
            "Messages sent in held batches (--write-coalesce)",
        );
        let rings_grown = counter(
            "rings_grown",
            "Room broadcast rings replaced by a larger one (a member fell half a ring behind)",
        );
        let evictions = counter("evictions", "Members evicted as slow consumers");
        let connections_refused = counter(
            "connections_refused",
            "Upgrades refused by --max-connections or --max-connections-per-ip",
        );
        let rate_limited = counter(
            "rate_limited",
            "Messages dropped by --rate-limit or --room-rate-limit",
        );
        let duplicates = counter("duplicates", "Messages not broadcast: repeated id");
        let lag_resyncs = counter(
            "lag_resyncs",
            "Lagged notices sent instead of evictions (--lag-policy resync)",
        );
        let history_db_written = counter(
            "history_db_written",
            "Messages committed to the history database",
        );
        let history_db_dropped = counter(
            "history_db_dropped",
            "Messages dropped from the history database (writer queue full, or unwritten at shutdown)",
        );
        // Bounded by design: admission, the shutdown drain, presence names.
        let accept_rate_refused =
            counter("accept_rate_refused", "Upgrades refused by --accept-rate");
        let shutdown_late_closes = counter(
            "shutdown_late_closes",
            "Connections closed at once when the shutdown drain's deadline passed",
        );
        let presence_names_dropped = counter(
            "presence_names_dropped",
            "User names left out of presence frames past the per-frame cap",
        );
        let rooms_config_reloads_refused = counter(
            "rooms_config_reloads_refused",
            "SIGHUP reloads of --rooms-config refused (a bad file): the settings in force stay",
        );
        let http_write_timeouts = counter(
            "http_write_timeouts",
            "HTTP connections dropped: the client took no bytes of a response within --write-timeout",
        );
        let rooms_refused = counter(
            "rooms_refused",
            "Joins refused because the process holds --max-rooms rooms",
        );
        let history_trimmed = counter(
            "history_trimmed",
            "Kept messages dropped from rooms' rings by --history-memory or a room's byte bound",
        );
        let history_db_locked_reads = counter(
            "history_db_locked_reads",
            "Room seeds read from the history database under the registry lock (the reads made beforehand went stale four times)",
        );
        let auth_refused = AuthRefused::default();
        registry.register(
            "auth_refused",
            "Requests, joins and sockets refused by the access rules (tokens, passwords, the API key, the failure lockout), by reason",
            auth_refused.by_reason.clone(),
        );
        let dropped = Dropped::register(&mut registry);
        let sse = SseStats::register(&mut registry);
        let deflate = Deflate::register(&mut registry);
        let accounts = AccountStats::register(&mut registry);
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let rooms = Gauge::default();
        registry.register("rooms", "Rooms with at least one member", rooms.clone());
        let rss = Gauge::default();
        registry.register(
            "resident_memory_bytes",
            "Resident set size of the process",
            rss.clone(),
        );
        let cpu = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cpu_seconds",
            "CPU time the process has used, user + system, seconds",
            cpu.clone(),
        );
        Stats {
            connections,
            rooms,
            messages_in,
            published,
            frames_out,
            writes,
            frames_encoded,
            coalesced_batches,
            coalesced_frames,
            rings_grown,
            evictions,
            connections_refused,
            rate_limited,
            auth_refused,
            duplicates,
            lag_resyncs,
            history_db_written,
            history_db_dropped,
            history_db_locked_reads,
            history_trimmed,
            rooms_refused,
            http_write_timeouts,
            accept_rate_refused,
            shutdown_late_closes,
            presence_names_dropped,
            rooms_config_reloads_refused,
            dropped,
            sse,
            deflate,
            accounts,
            rss,
            cpu,
            registry,
            started: Instant::now(),
        }
    }

    /// The Prometheus registry, for a module with metrics of its own (cluster mode) to register
    /// them before the `Stats` is shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The Prometheus text exposition of every metric.
    pub fn prometheus_text(&self) -> String {
        self.rss.set(rss_bytes() as i64);
        self.cpu.set(cpu_seconds());
        let mut out = String::with_capacity(2048);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Why the access rules refused something: the `reason` label of `auth_refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthReason {
    /// No access token where one is needed.
    MissingToken,
    /// A token that does not verify (signature, audience, issuer, subject, format).
    BadToken,
    /// A token past its `exp`, at the upgrade or on a refresh.
    TokenExpired,
    /// A token before its `nbf`.
    TokenNotYetValid,
    /// An open socket closed because its token expired without a refresh.
    SocketExpired,
    /// A refresh with another `sub`.
    RefreshRefused,
    /// A token whose grant does not cover the room.
    ForbiddenRoom,
    /// A user name other than the token's `sub`.
    ForbiddenUser,
    /// A missing or wrong room password.
    BadPassword,
    /// A request that needs the API key without it.
    BadApiKey,
    /// Refused unseen: too many failures from this address for this room.
    TooManyFailures,
}

impl AuthReason {
    pub const ALL: [AuthReason; 11] = [
        AuthReason::MissingToken,
        AuthReason::BadToken,
        AuthReason::TokenExpired,
        AuthReason::TokenNotYetValid,
        AuthReason::SocketExpired,
        AuthReason::RefreshRefused,
        AuthReason::ForbiddenRoom,
        AuthReason::ForbiddenUser,
        AuthReason::BadPassword,
        AuthReason::BadApiKey,
        AuthReason::TooManyFailures,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthReason::MissingToken => "missing_token",
            AuthReason::BadToken => "bad_token",
            AuthReason::TokenExpired => "token_expired",
            AuthReason::TokenNotYetValid => "token_not_yet_valid",
            AuthReason::SocketExpired => "socket_expired",
            AuthReason::RefreshRefused => "refresh_refused",
            AuthReason::ForbiddenRoom => "forbidden_room",
            AuthReason::ForbiddenUser => "forbidden_user",
            AuthReason::BadPassword => "bad_password",
            AuthReason::BadApiKey => "bad_api_key",
            AuthReason::TooManyFailures => "too_many_failures",
        }
    }
}

/// `auth_refused`: one counter per reason. Refusals are rare, so the label lookup
/// (`Family`'s read lock) costs nothing that matters.
#[derive(Debug, Default)]
pub struct AuthRefused {
    by_reason: Family<[(&'static str, &'static str); 1], Counter>,
}

impl AuthRefused {
    pub fn inc(&self, reason: AuthReason) {
        self.by_reason
            .get_or_create(&[("reason", reason.label())])
            .inc();
    }

    pub fn get(&self, reason: AuthReason) -> u64 {
        self.by_reason
            .get_or_create(&[("reason", reason.label())])
            .get()
    }

    /// Every refusal, whatever the reason.
    pub fn total(&self) -> u64 {
        AuthReason::ALL.iter().map(|r| self.get(*r)).sum()
    }

    /// `{reason: count}` for the reasons seen so far.
    pub fn json(&self) -> serde_json::Map<String, serde_json::Value> {
        AuthReason::ALL
            .iter()
            .map(|r| (r.label(), self.get(*r)))
            .filter(|(_, n)| *n > 0)
            .map(|(l, n)| (l.to_owned(), n.into()))
            .collect()
    }
}

/// What the server's deadlines closed and what hostile input it dropped: each is a peer or a
/// payload that broke a bound, counted where it is refused.
#[derive(Default)]
pub struct Dropped {
    /// WebSockets closed after `--idle-timeout` in no room (4002 `idle timeout`).
    pub idle_closes: Counter,
    /// WebSockets closed because a message did not arrive whole within `--message-timeout`
    /// (1008 `message timeout`).
    pub message_timeouts: Counter,
    /// REST requests answered 408 because the body did not arrive within `--body-timeout`.
    pub body_timeouts: Counter,
    /// Payloads from Redis (room channels and kept history) that did not parse or broke a rule
    /// a local publication obeys; never delivered.
    pub redis_payloads_dropped: Counter,
    /// CORS preflights refused: an origin not in `--cors-origins`, or one covered by `*` that
    /// asked to publish or to send `Authorization`.
    pub cors_refused: Counter,
}

impl Dropped {
    fn register(registry: &mut Registry) -> Self {
        let d = Dropped::default();
        let counters: [(&str, &str, &Counter); 5] = [
            (
                "idle_closes",
                "WebSockets closed after --idle-timeout in no room",
                &d.idle_closes,
            ),
            (
                "message_timeouts",
                "WebSockets closed because a message did not arrive within --message-timeout",
                &d.message_timeouts,
            ),
            (
                "body_timeouts",
                "REST requests answered 408: body not read within --body-timeout",
                &d.body_timeouts,
            ),
            (
                "redis_payloads_dropped",
                "Payloads from Redis dropped because they did not parse or validate",
                &d.redis_payloads_dropped,
            ),
            (
                "cors_refused",
                "CORS preflights refused by --cors-origins",
                &d.cors_refused,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        d
    }

    /// The `/api/stats` fields, by name.
    pub fn fields(&self) -> [(&'static str, u64); 5] {
        [
            ("idle_closes", self.idle_closes.get()),
            ("message_timeouts", self.message_timeouts.get()),
            ("body_timeouts", self.body_timeouts.get()),
            ("redis_payloads_dropped", self.redis_payloads_dropped.get()),
            ("cors_refused", self.cors_refused.get()),
        ]
    }
}

/// Server-Sent Events streams. They are counted in `connections`, `frames_out` and `evictions`
/// like WebSockets; these say how many of them are streams and what their encoding costs.
#[derive(Default)]
pub struct SseStats {
    /// Open SSE streams (also in `connections`).
    pub streams: Gauge,
    /// Room frames encoded as events: once per frame whatever the number of SSE members, so
    /// with fan-out working this stays at most `frames_encoded`.
    pub events_encoded: Counter,
    /// Streams evicted as slow consumers (also in `evictions`): behind a room's ring, or no
    /// byte taken within `--write-timeout`.
    pub evictions: Counter,
}

impl SseStats {
    fn register(registry: &mut Registry) -> Self {
        let s = SseStats::default();
        registry.register(
            "sse_streams",
            "Open Server-Sent Events streams (also in connections)",
            s.streams.clone(),
        );
        registry.register(
            "sse_events_encoded",
            "Room frames encoded as Server-Sent Events (once each)",
            s.events_encoded.clone(),
        );
        registry.register(
            "sse_evictions",
            "Server-Sent Events streams evicted as slow consumers (also in evictions)",
            s.evictions.clone(),
        );
        s
    }

    /// The `/api/stats` fields, by name.
    pub fn fields(&self) -> [(&'static str, u64); 3] {
        [
            ("sse_streams", self.streams.get().max(0) as u64),
            ("sse_events_encoded", self.events_encoded.get()),
            ("sse_evictions", self.evictions.get()),
        ]
    }
}

/// permessage-deflate counters.
#[derive(Debug, Default)]
pub struct Deflate {
    /// Frames compressed: once per room message however many members receive it compressed
    /// (compare with `frames_encoded`), plus each echo reply on `/echo`.
    pub frames_compressed: Counter,
    /// Compressed client messages inflated.
    pub messages_inflated: Counter,
    /// Compressed client messages refused: inflating past `--max-message-bytes` (close 1009)
    /// or not a valid deflate stream (close 1007).
    pub inflate_refused: Counter,
}

impl Deflate {
    fn register(registry: &mut Registry) -> Self {
        let d = Deflate::default();
        let counters: [(&str, &str, &Counter); 3] = [
            (
                "frames_compressed",
                "Frames compressed with permessage-deflate (once per room message)",
                &d.frames_compressed,
            ),
            (
                "messages_inflated",
                "Compressed client messages inflated",
                &d.messages_inflated,
            ),
            (
                "inflate_refused",
                "Compressed client messages refused: too big once inflated, or corrupt",
                &d.inflate_refused,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        d
    }

    /// The `/api/stats` fields, by name.
    pub fn fields(&self) -> [(&'static str, u64); 3] {
        [
            ("frames_compressed", self.frames_compressed.get()),
            ("messages_inflated", self.messages_inflated.get()),
            ("inflate_refused", self.inflate_refused.get()),
        ]
    }
}

/// Built-in accounts (`--accounts-db`). Every refusal of `POST /register`, `POST /token` and
/// `POST /token/refresh` is in one of them.
#[derive(Debug, Default)]
pub struct AccountStats {
    /// Accounts created over HTTP.
    pub registered: Counter,
    /// Registrations refused: a name or password against the rules (400), a taken name (409),
    /// registration closed (403).
    pub register_refused: Counter,
    /// Registrations refused by `--accounts-register-rate` (429).
    pub register_limited: Counter,
    /// Tokens issued for a name and password.
    pub logins: Counter,
    /// Logins refused for a wrong name or password (401).
    pub login_failures: Counter,
    /// Logins refused unseen by the failure lockout, per address or per account (429).
    pub login_limited: Counter,
    /// Tokens issued for a token (`POST /token/refresh`).
    pub refreshed: Counter,
    /// Requests refused because every hash slot was busy and the queue before them full (503).
    pub busy: Counter,
    /// Account requests whose body did not parse or arrive: not a form or JSON object with a
    /// `username` and a `password`, another `grant_type`, too large, too slow (400, 408, 413,
    /// 415).
    pub malformed: Counter,
}

impl AccountStats {
    fn register(registry: &mut Registry) -> Self {
        let a = AccountStats::default();
        let counters: [(&str, &str, &Counter); 9] = [
            (
                "accounts_registered",
                "Accounts created over HTTP",
                &a.registered,
            ),
            (
                "accounts_register_refused",
                "Registrations refused: bad name or password, name taken, registration closed",
                &a.register_refused,
            ),
            (
                "accounts_register_limited",
                "Registrations refused by --accounts-register-rate",
                &a.register_limited,
            ),
            (
                "accounts_logins",
                "Tokens issued for a name and password",
                &a.logins,
            ),
            (
                "accounts_login_failures",
                "Logins refused for a wrong name or password",
                &a.login_failures,
            ),
            (
                "accounts_login_limited",
                "Logins refused unseen by the failure lockout (per address or per account)",
                &a.login_limited,
            ),
            (
                "accounts_refreshed",
                "Tokens issued for a valid token (POST /token/refresh)",
                &a.refreshed,
            ),
            (
                "accounts_busy",
                "Account requests refused: every hash slot busy and the queue full",
                &a.busy,
            ),
            (
                "accounts_malformed",
                "Account requests refused: a body that did not parse or arrive whole",
                &a.malformed,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        a
    }

    /// The `/api/stats` fields, by name.
    pub fn fields(&self) -> [(&'static str, u64); 9] {
        [
            ("accounts_registered", self.registered.get()),
            ("accounts_register_refused", self.register_refused.get()),
            ("accounts_register_limited", self.register_limited.get()),
            ("accounts_logins", self.logins.get()),
            ("accounts_login_failures", self.login_failures.get()),
            ("accounts_login_limited", self.login_limited.get()),
            ("accounts_refreshed", self.refreshed.get()),
            ("accounts_busy", self.busy.get()),
            ("accounts_malformed", self.malformed.get()),
        ]
    }
}

/// Resident set size of this process in bytes, from /proc (0 where /proc is absent).
pub fn rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time this process has used so far, user + system, in seconds (0 where unavailable).
/// getrusage rather than /proc/self/stat: microseconds instead of clock ticks (10 ms), and it
/// counts every thread, exited ones included.
pub fn cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain old data (integers and timevals), so all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct behind the pointer, which is a live,
    // exclusively borrowed local for the whole call; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Messages per second over the last 60 seconds: one counter per second in a ring.
/// Lives inside the room's lock (publishing already holds it), so it needs no atomics.
#[derive(Debug)]
pub struct RateWindow {
    /// `(second, count)` per slot; a slot whose second is stale counts as zero.
    slots: [(u64, u32); 60],
}

impl Default for RateWindow {
    fn default() -> Self {
        RateWindow {
            slots: [(0, 0); 60],
        }
    }
}

impl RateWindow {
    pub fn record(&mut self, now_sec: u64) {
        let slot = &mut self.slots[(now_sec % 60) as usize];
        if slot.0 != now_sec {
            *slot = (now_sec, 0);
        }
        slot.1 = slot.1.saturating_add(1);
    }

    /// Average rate over the 60 seconds before `now_sec` (the current, partial second excluded).
    pub fn per_second(&self, now_sec: u64) -> f64 {
        let total: u64 = self
            .slots
            .iter()
            .filter(|(sec, _)| *sec < now_sec && now_sec - sec <= 60)
            .map(|(_, n)| u64::from(*n))
            .sum();
        total as f64 / 60.0
    }
}

/// Histogram of waits (µs) in two alternating one-minute windows, recorded without a lock by
/// every writer of a room. Buckets are log-linear: 4 sub-buckets per power of two, so a
/// percentile is exact to within 25 %.
pub struct WaitHistogram {
    windows: [Window; 2],
}

struct Window {
    minute: AtomicU64,
    buckets: [AtomicU32; BUCKETS],
}

const SUB: usize = 4;
const BUCKETS: usize = 38 * SUB;

impl Default for WaitHistogram {
    fn default() -> Self {
        let window = || Window {
            minute: AtomicU64::new(u64::MAX),
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
        };
        WaitHistogram {
            windows: [window(), window()],
        }
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros < SUB as u64 {
        return micros as usize;
    }
    let exp = 63 - micros.leading_zeros() as usize; // floor(log2), ≥ 2
    let sub = ((micros >> (exp - 2)) & (SUB as u64 - 1)) as usize;
    ((exp - 1) * SUB + sub).min(BUCKETS - 1)
}

/// Upper bound (µs) of a bucket, inverse of `bucket_of`.
fn bucket_upper(bucket: usize) -> u64 {
    if bucket < SUB {
        return bucket as u64 + 1;
    }
    let exp = bucket / SUB + 1;
    let sub = (bucket % SUB) as u64;
    (SUB as u64 + sub + 1) << (exp - 2)
}

impl WaitHistogram {
    pub fn record(&self, wait: Duration, now_minute: u64) {
        let w = &self.windows[(now_minute % 2) as usize];
        let seen = w.minute.load(Ordering::Relaxed);
        if seen != now_minute
            && w.minute
                .compare_exchange(seen, now_minute, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // This thread won the rollover: clear the window it now owns. A few concurrent
            // records may land on either side of the clear; that is noise, not corruption.
            for b in &w.buckets {
                b.store(0, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        w.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..1) over the current and previous minute, in milliseconds;
    /// `None` when nothing was recorded.
    pub fn quantile_ms(&self, q: f64, now_minute: u64) -> Option<f64> {
        let mut counts = [0u64; BUCKETS];
        for w in &self.windows {
            let m = w.minute.load(Ordering::Relaxed);
            if m == now_minute || m.wrapping_add(1) == now_minute {
                for (c, b) in counts.iter_mut().zip(&w.buckets) {
                    *c += u64::from(b.load(Ordering::Relaxed));
                }
            }
        }
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper(i) as f64 / 1000.0);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for v in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 12_345, 1 << 30, u64::MAX] {
            let b = bucket_of(v);
            assert!(b >= last, "{v}");
            last = b;
            if v < (1 << 38) {
                assert!(
                    bucket_upper(b) > v,
                    "{v} -> bucket {b} upper {}",
                    bucket_upper(b)
                );
                assert!(
                    bucket_upper(b) as f64 <= (v.max(1) as f64) * 1.25 + 1.0,
                    "{v}"
                );
            }
        }
    }

    #[test]
    fn quantiles_over_two_windows() {
        let h = WaitHistogram::default();
        assert_eq!(h.quantile_ms(0.99, 10), None);
        for _ in 0..99 {
            h.record(Duration::from_micros(100), 10);
        }
        h.record(Duration::from_millis(40), 11);
        let p50 = h.quantile_ms(0.5, 11).unwrap();
        assert!((0.1..0.13).contains(&p50), "{p50}");
        let p100 = h.quantile_ms(1.0, 11).unwrap();
        assert!((40.0..50.0).contains(&p100), "{p100}");
        // Two minutes later the old windows no longer count.
        assert_eq!(h.quantile_ms(0.5, 13), None);
        // Minute 12 reuses window 0 and clears it first.
        h.record(Duration::from_millis(2), 12);
        let p50 = h.quantile_ms(0.5, 12).unwrap();
        assert!(
            (2.0..2.6).contains(&p50),
            "minute 10's samples are gone: {p50}"
        );
        let p100 = h.quantile_ms(1.0, 12).unwrap();
        assert!(p100 >= 40.0, "minute 11 is still in: {p100}");
    }

    #[test]
    fn rate_window_averages_the_last_minute() {
        let mut r = RateWindow::default();
        for s in 100..160 {
            for _ in 0..3 {
                r.record(s);
            }
        }
        assert_eq!(r.per_second(160), 3.0);
        assert_eq!(r.per_second(250), 0.0);
    }

    #[test]
    fn rss_is_readable() {
        assert!(rss_bytes() > 0);
    }

    #[test]
    fn stats_cpu_seconds_move_with_work() {
        let before = cpu_seconds();
        let start = Instant::now();
        let mut x = 0u64;
        // Busy for 50 ms of wall time: at least some of it is this thread's CPU time.
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = cpu_seconds();
        assert!(after > before, "{before} -> {after}");
        assert!(after - before < 60.0, "{before} -> {after}");
    }

    #[test]
    fn stats_prometheus_text_has_cpu_seconds() {
        let text = Stats::new().prometheus_text();
        let line = text
            .lines()
            .find(|l| l.starts_with("roomcast_cpu_seconds "))
            .unwrap_or_else(|| panic!("no roomcast_cpu_seconds in\n{text}"));
        let v: f64 = line["roomcast_cpu_seconds ".len()..]
            .parse()
            .expect("a number");
        assert!(v > 0.0, "{line}");
    }
}
