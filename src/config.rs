//! Configuration: every bound the server enforces, parsed once in `main` and passed down.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

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
        assert_eq!(c.max_message_bytes, 65536);
    }

    #[test]
    fn rejects_nonsense_durations() {
        assert!(Config::try_parse_from(["roomcast", "--write-timeout", "0"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--ping-interval", "abc"]).is_err());
        assert!(Config::try_parse_from(["roomcast", "--ping-interval", "0.5"]).is_ok());
    }
}
