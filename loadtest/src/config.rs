//! Settings of one run: parsed once by the binary (or built by a test with `Config::default()`),
//! checked by `validate`, and handed unchanged to every worker.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::payload::PayloadKind;

/// What the clients do once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connect, hold `--duration` seconds without traffic, measure server memory.
    Idle,
    /// Every room gets `--rate` messages/s for `--duration` seconds.
    Chat,
    /// Start at `--rate`, double every `--step-seconds` until loss or p99 > `--max-p99-ms`.
    Saturate,
    /// One room holding every client, one publisher as fast as a `--window` of unacknowledged
    /// messages allows.
    Hot,
    /// Clients connect, stay about `--churn-lifetime` seconds, leave and come back in another room.
    Churn,
}

/// How the clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket (`/ws/{room}`).
    #[default]
    Ws,
    /// Server-Sent Events (`/sse/{room}`), receive only: `idle` scenario only.
    Sse,
}

impl Scenario {
    /// `--rate` when none is given: 1 message/s per room, or 1,500/s for `hot`'s one publisher.
    pub fn default_rate(self) -> f64 {
        match self {
            Scenario::Hot => 1500.0,
            _ => 1.0,
        }
    }
}

/// How publishers put their messages on the wire (`--publish-pacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pacing {
    /// One message per socket write, flushed, at evenly spaced times (publishers' phases
    /// staggered over the period). A publisher that falls behind catches up one write per
    /// message. `hot`: `--rate` messages/s, never more than `--window` unacknowledged.
    #[default]
    Steady,
    /// Several messages in one write: `hot` writes everything its `--window` allows at once (no
    /// rate); with a rate, each publisher writes `--burst-size` messages at once, every
    /// `--burst-size` periods.
    Burst,
}

impl Pacing {
    /// The name reports and summary lines give it (the flag's value).
    pub fn name(self) -> &'static str {
        match self {
            Pacing::Steady => "steady",
            Pacing::Burst => "burst",
        }
    }
}

/// Which server a client connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Every client of room i goes to server i % servers: one room lives on one server.
    Rooms,
    /// A room's clients (its publishers too) alternate over all servers. In cluster mode
    /// (`roomcast --redis`) the servers' copies are one room with one `seq`; standalone servers
    /// do not talk to each other, so each copy has its own `seq` and only the publishers that
    /// landed on that server.
    Spread,
}

/// In which order the ramp opens the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RampOrder {
    /// Room by room: a room's members join within a few milliseconds, so the server's
    /// presence frames for them coalesce (its 250 ms window) into one or two per member.
    Rooms,
    /// Client 0, 1, 2…: every room grows at once, one join at a time, so each join is its
    /// own presence frame to every member so far (~n/2 frames per member of an n-member room):
    /// the presence storm, a stress of its own.
    Interleaved,
}

/// Settings of a load test run. Field docs are the `--help` text.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct Config {
    /// Servers to load: comma-separated WebSocket URLs, loopback addresses only.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8080")]
    pub url: Vec<String>,

    /// Process id of each server, in `--url` order: its CPU time and RSS are read from /proc,
    /// the same way for any server. Default: the process listening on the URL's port when it
    /// runs on this machine as this user; otherwise the server's own `/api/stats` figures.
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub server_pid: Vec<u32>,

    /// How clients map to servers when there are several.
    #[arg(long, value_enum, default_value_t = Route::Rooms)]
    pub route: Route,

    /// What the clients do.
    #[arg(long, value_enum, default_value_t = Scenario::Chat)]
    pub scenario: Scenario,

    /// How clients connect: `sse` opens event streams instead of WebSockets (`idle` only: an
    /// event stream cannot publish).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    #[serde(default)]
    pub transport: Transport,

    /// Number of WebSocket clients in all.
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,

    /// Number of rooms (`lt-0` … `lt-<rooms-1>`); clients spread evenly over them.
    /// `hot` always uses one room.
    #[arg(long, default_value_t = 10)]
    pub rooms: u32,

    /// Publishing clients per room, in every route (`spread` puts them on different servers).
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,

    /// Messages per second per room, in every route (`chat`, `hot` with steady pacing, and the
    /// starting rate of `saturate`); each publisher sends rate / publishers.
    /// Default: 1, `hot` 1500.
    #[arg(long)]
    pub rate: Option<f64>,

    /// How publishers write: `steady` (one message per write, evenly spaced) or `burst`
    /// (several messages per write).
    #[arg(long, value_enum, default_value_t = Pacing::Steady)]
    #[serde(default)]
    pub publish_pacing: Pacing,

    /// `--publish-pacing burst` with a rate (`chat`, `saturate`, `churn`): messages a publisher
    /// writes at once.
    #[arg(long, default_value_t = 16)]
    #[serde(default = "default_burst_size")]
    pub burst_size: u32,

    /// Seconds of steady state after the ramp (`saturate`: the most it may run).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Length of the `text` each publisher sends, in bytes (at least the stamp, ~30 bytes).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,

    /// What fills each message's text after the stamp: `x` (compresses to nothing), `prose`
    /// (chat-like English) or `json` (a JSON document, escaped).
    #[arg(long, value_enum, default_value_t = PayloadKind::X)]
    #[serde(default)]
    pub payload_kind: PayloadKind,

    /// Every client offers permessage-deflate and inflates what comes compressed (the report's
    /// wire bytes per delivery then count the compressed frames).
    #[arg(long)]
    #[serde(default)]
    pub compression: bool,

    /// With `--compression`, who inflates a message: `shared` (default), the first client of a
    /// worker thread to read it, the thread's other clients finding the plain frame under the
    /// same compressed bytes, or `each` client itself. Shared keeps the clients, on the
    /// server's machine, from spending more per delivery than the server, which compresses a
    /// message once for all its members.
    #[arg(long, value_enum, default_value_t = InflateBy::Shared)]
    #[serde(default)]
    pub inflate: InflateBy,

    /// An access token for a server run with `--jwt-secret` (`roomcast token --sub loadtest`):
    /// sent as `Authorization: Bearer` on every upgrade, event stream and API read; the clients
    /// then give no `user` (the server names them by the token's `sub`). Default: none.
    #[arg(long)]
    #[serde(default)]
    pub token: Option<String>,

    /// Worker processes. Default: ceil(clients / (hard nofile limit - 200)); 1 runs the clients
    /// inside this process.
    #[arg(long)]
    pub procs: Option<u32>,

    /// Source addresses to bind client sockets to: `A-B` ranges and single addresses, comma
    /// separated, or `none` to let the kernel choose. Each address gives one
    /// `ip_local_port_range` of ports.
    #[arg(long, default_value = "127.0.0.1-127.0.0.16")]
    pub source_ips: String,

    /// Connects in flight at once, over all workers.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: u32,

    /// Connects started per second, over all workers.
    #[arg(long, default_value_t = 5000.0)]
    pub ramp_rate: f64,

    /// Order of the ramp's connects.
    #[arg(long, value_enum, default_value_t = RampOrder::Rooms)]
    #[serde(default = "default_ramp_order")]
    pub ramp_order: RampOrder,

    /// Seconds one connect (TCP, upgrade and welcome) may take before it counts as `timeout`.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// `saturate`: seconds each rate is held.
    #[arg(long, default_value_t = 5.0)]
    pub step_seconds: f64,

    /// `saturate`: a step whose p99 latency is above this many milliseconds ends the climb.
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,

    /// `hot`: messages the publisher may have sent without having received their echo.
    #[arg(long, default_value_t = 64)]
    pub window: u32,

    /// `churn`: mean seconds a client stays connected before it leaves and reconnects.
    #[arg(long, default_value_t = 5.0)]
    pub churn_lifetime: f64,

    /// Seconds to wait after the last publication for deliveries to stop.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,

    /// Rooms whose member count is checked over HTTP after the ramp (all when there are fewer).
    #[arg(long, default_value_t = 1000)]
    pub check_rooms: u32,

    /// Hard bound on the whole run in seconds; past it the run stops and fails.
    /// Default: 60 + duration + 3 × clients / ramp-rate (plus the steps of `saturate`).
    #[arg(long)]
    pub max_seconds: Option<f64>,

    /// Write every figure and the settings to this JSON file (the folder is created).
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Append the run's headline figures, one JSON line, to this file (the folder is created),
    /// e.g. `loadtest/results/summary.jsonl`.
    #[arg(long)]
    #[serde(default)]
    pub summary: Option<PathBuf>,

    /// A name for the run, kept in its summary line (e.g. `one-server-19000`, `compare-A`).
    #[arg(long)]
    #[serde(default)]
    pub label: Option<String>,

    /// No live lines, no progress bar, no preflight text (the library's callers usually want
    /// this).
    #[arg(long)]
    pub quiet: bool,

    /// Program to start as worker process (`<exe> worker`). Default: this executable. Needed
    /// only by library callers that run with procs > 1.
    #[arg(skip)]
    pub worker_exe: Option<PathBuf>,
}

fn default_ramp_order() -> RampOrder {
    RampOrder::Rooms
}

fn default_burst_size() -> u32 {
    16
}

impl Default for Config {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            config: Config,
        }
        // The defaults above are constants; a unit test proves this parse succeeds.
        match Wrap::try_parse_from(["loadtest"]) {
            Ok(w) => w.config,
            Err(e) => panic!("loadtest Config defaults do not parse: {e}"),
        }
    }
}

/// One server as the clients and the HTTP checks reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Server {
    /// The URL as given.
    pub url: String,
    /// Resolved address: WebSocket and HTTP API share it.
    pub addr: SocketAddr,
    /// `Host` header value (`host:port` from the URL).
    pub host: String,
    /// `--compression`: offer permessage-deflate in the upgrade.
    pub compression: bool,
    /// `--inflate`: who inflates what comes compressed.
    #[serde(default)]
    pub inflate: InflateBy,
    /// The server's process (`--server-pid`, or found by its listening socket): CPU time and
    /// RSS come from its /proc entries instead of `/api/stats`.
    #[serde(default)]
    pub pid: Option<u32>,
    /// `--token`: `Authorization: Bearer` on every request.
    #[serde(default)]
    pub token: Option<String>,
}

impl Config {
    /// Rejects settings that cannot produce a meaningful run; adjusts the ones a scenario fixes.
    pub fn validate(&mut self) -> anyhow::Result<()> {
        if self.scenario == Scenario::Hot {
            self.rooms = 1;
            self.publishers = 1;
        }
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if self.transport == Transport::Sse && self.scenario != Scenario::Idle {
            bail!("--transport sse runs the idle scenario only (an event stream cannot publish)");
        }
        if self.rooms == 0 || self.rooms > self.clients {
            bail!("--rooms must be between 1 and --clients ({})", self.clients);
        }
        let servers = self.url.len() as u32;
        if servers == 0 {
            bail!("--url needs at least one server");
        }
        if !self.server_pid.is_empty() && self.server_pid.len() != self.url.len() {
            bail!(
                "--server-pid needs one process id per --url ({} given for {} servers)",
                self.server_pid.len(),
                servers
            );
        }
        let smallest_room = self.clients / self.rooms;
        if self.publishers == 0 || self.publishers > smallest_room {
            bail!(
                "--publishers {} needs at least as many clients per room; the smallest room has {}",
                self.publishers,
                smallest_room
            );
        }
        let rate = *self.rate.get_or_insert(self.scenario.default_rate());
        if !positive(rate) {
            bail!("--rate must be a positive number");
        }
        if self.burst_size == 0 || u64::from(self.burst_size) > BURST_MAX {
            bail!("--burst-size must be between 1 and {BURST_MAX}");
        }
        if !(self.duration >= 0.0 && self.duration.is_finite()) {
            bail!("--duration must be zero or more seconds");
        }
        if !positive(self.ramp_rate) || self.connect_concurrency == 0 {
            bail!("--ramp-rate and --connect-concurrency must be positive");
        }
        if !positive(self.connect_timeout) || !positive(self.step_seconds) {
            bail!("--connect-timeout and --step-seconds must be positive");
        }
        if self.window == 0 {
            bail!("--window must be at least 1");
        }
        if !positive(self.churn_lifetime) {
            bail!("--churn-lifetime must be positive");
        }
        if self.payload_bytes > 60_000 {
            bail!("--payload-bytes is capped at 60000");
        }
        if self.procs == Some(0) {
            bail!("--procs must be at least 1");
        }
        self.servers()?;
        self.source_addrs()?;
        Ok(())
    }

    /// `--rate` in force: the flag's, or the scenario's default.
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(self.scenario.default_rate())
    }

    /// How this run's publishers send, as reports and summary lines name it; `None` when
    /// nobody publishes (`idle`).
    pub fn publishing(&self) -> Option<&'static str> {
        (self.scenario != Scenario::Idle).then(|| self.publish_pacing.name())
    }

    /// `--url`, resolved. Only loopback targets are accepted: this tool floods what it points at.
    /// `pid` is `--server-pid`'s (see `find_pids` for the default).
    pub fn servers(&self) -> anyhow::Result<Vec<Server>> {
        self.url
            .iter()
            .enumerate()
            .map(|(i, u)| {
                parse_server(u).map(|s| Server {
                    compression: self.compression,
                    inflate: self.inflate,
                    pid: self.server_pid.get(i).copied(),
                    token: self.token.clone(),
                    ..s
                })
            })
            .collect()
    }

    /// `--source-ips`, expanded; empty means "do not bind".
    pub fn source_addrs(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        parse_source_ips(&self.source_ips)
    }

    /// The `--max-seconds` in force (explicit or derived).
    pub fn max_seconds(&self) -> f64 {
        if let Some(s) = self.max_seconds {
            return s;
        }
        let ramp = self.clients as f64 / self.ramp_rate;
        let steps = if self.scenario == Scenario::Saturate {
            // The climb is bounded by `duration`; this leaves room for drain and checks.
            self.step_seconds * 2.0
        } else {
            0.0
        };
        60.0 + self.duration + 3.0 * ramp + steps + self.drain_timeout
    }
}

/// Most messages a publisher puts in one write (`--burst-size`, and a late burst publisher's
/// catch-up).
pub const BURST_MAX: u64 = 64;

/// A finite number above zero (NaN is not).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn parse_server(url: &str) -> anyhow::Result<Server> {
    let rest = url
        .trim()
        .strip_prefix("ws://")
        .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !(path.is_empty() || path == "/") {
        bail!("{url}: give the server's root (ws://host:port); the tool picks the paths");
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {with_port}"))?
        .collect();
    let addr = addrs
        .iter()
        .copied()
        .find(SocketAddr::is_ipv4)
        .or_else(|| addrs.first().copied())
        .with_context(|| format!("{url}: {with_port} resolves to nothing"))?;
    if !addr.ip().is_loopback() {
        bail!("{url}: {} is not a loopback address; this load generator only targets 127.0.0.0/8 or ::1", addr.ip());
    }
    Ok(Server {
        url: url.to_string(),
        addr,
        host: with_port,
        compression: false,
        inflate: InflateBy::default(),
        pid: None,
        token: None,
    })
}

/// `--inflate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InflateBy {
    Each,
    #[default]
    Shared,
}

impl Server {
    /// What its clients do with compressed frames.
    pub fn inflate(&self) -> crate::wire::Inflate {
        use crate::wire::Inflate;
        match (self.compression, self.inflate) {
            (false, _) => Inflate::Off,
            (true, InflateBy::Each) => Inflate::Each,
            (true, InflateBy::Shared) => Inflate::Shared,
        }
    }
}

/// Parses `127.0.0.1-127.0.0.16,127.0.1.1` into addresses; `none` (or empty) gives none.
pub fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let spec = spec.trim();
    if spec.is_empty() || spec.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: Ipv4Addr = a
            .parse()
            .with_context(|| format!("--source-ips: bad address {a:?}"))?;
        let b: Ipv4Addr = b
            .parse()
            .with_context(|| format!("--source-ips: bad address {b:?}"))?;
        let (lo, hi) = (u32::from(a), u32::from(b));
        if hi < lo {
            bail!("--source-ips: range {part} runs backwards");
        }
        if hi - lo >= 1 << 16 || out.len() + ((hi - lo) as usize) >= 1 << 16 {
            bail!("--source-ips: more than 65536 addresses");
        }
        for ip in lo..=hi {
            let ip = Ipv4Addr::from(ip);
            if !IpAddr::V4(ip).is_loopback() {
                bail!("--source-ips: {ip} is not a loopback address");
            }
            out.push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let mut c = Config::default();
        assert_eq!(c.url, vec!["ws://127.0.0.1:8080".to_string()]);
        assert_eq!(c.connect_concurrency, 256);
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn comma_list_of_servers() {
        let c = Config {
            url: vec!["ws://127.0.0.1:9001".into(), "ws://localhost:9002/".into()],
            ..Config::default()
        };
        let s = c.servers().expect("parses");
        assert_eq!(s[0].addr, "127.0.0.1:9001".parse().expect("addr"));
        assert_eq!(s[1].addr.port(), 9002);
        assert_eq!(s[1].host, "localhost:9002");
    }

    #[test]
    fn refuses_non_loopback_and_paths() {
        assert!(parse_server("ws://10.0.0.1:80").is_err());
        assert!(parse_server("ws://127.0.0.1:80/ws/general").is_err());
        assert!(parse_server("http://127.0.0.1:80").is_err());
    }

    #[test]
    fn source_ip_ranges() {
        let v = parse_source_ips("127.0.0.1-127.0.0.16").expect("parses");
        assert_eq!(v.len(), 16);
        assert_eq!(v[15], Ipv4Addr::new(127, 0, 0, 16));
        let v = parse_source_ips("127.0.0.9, 127.0.1.1-127.0.1.2").expect("parses");
        assert_eq!(v.len(), 3);
        assert!(parse_source_ips("none").expect("parses").is_empty());
        assert!(parse_source_ips("127.0.0.5-127.0.0.1").is_err());
        assert!(parse_source_ips("192.168.0.1").is_err());
    }

    #[test]
    fn hot_forces_one_room_and_publisher() {
        let mut c = Config {
            scenario: Scenario::Hot,
            rooms: 50,
            publishers: 3,
            ..Config::default()
        };
        c.validate().expect("valid");
        assert_eq!((c.rooms, c.publishers), (1, 1));
    }

    #[test]
    fn rate_defaults_by_scenario_and_pacing_is_named() {
        let mut c = Config::default();
        assert_eq!(c.rate, None);
        c.validate().expect("valid");
        assert_eq!(c.rate, Some(1.0));
        assert_eq!(c.publishing(), Some("steady"));
        let mut hot = Config {
            scenario: Scenario::Hot,
            publish_pacing: Pacing::Burst,
            ..Config::default()
        };
        hot.validate().expect("valid");
        assert_eq!(hot.rate(), 1500.0);
        assert_eq!(hot.publishing(), Some("burst"));
        let idle = Config {
            scenario: Scenario::Idle,
            ..Config::default()
        };
        assert_eq!(idle.publishing(), None);
        let mut given = Config {
            scenario: Scenario::Hot,
            rate: Some(10.0),
            ..Config::default()
        };
        given.validate().expect("valid");
        assert_eq!(given.rate(), 10.0);
        let mut zero = Config {
            burst_size: 0,
            ..Config::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn too_many_publishers_is_an_error() {
        let mut c = Config {
            clients: 20,
            rooms: 10,
            publishers: 3,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
