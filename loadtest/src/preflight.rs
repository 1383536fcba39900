//! Before the ramp: compares what the run needs with what this machine allows and says what to
//! change. It warns and never changes system settings itself (only its own soft file limit).

use std::net::{Ipv4Addr, SocketAddr};

use serde::Serialize;

use crate::config::{Config, Route, Server};
use crate::sys;

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    pub what: String,
    /// What to change when not ok.
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: String) -> Self {
        Check {
            ok: true,
            what,
            fix: None,
        }
    }
    fn warn(what: String, fix: String) -> Self {
        Check {
            ok: false,
            what,
            fix: Some(fix),
        }
    }
}

/// Runs every check for `procs` worker processes.
pub fn run(config: &Config, servers: &[Server], sources: &[Ipv4Addr], procs: u32) -> Vec<Check> {
    let mut out = Vec::new();
    let clients = u64::from(config.clients);
    let per_proc = clients.div_ceil(u64::from(procs));

    match sys::nofile() {
        Ok((soft, hard)) => {
            let need = per_proc + 200;
            if need > hard {
                let fit = crate::plan::default_procs(config.clients, hard);
                out.push(Check::warn(
                    format!("nofile: {per_proc} sockets per process ({procs} processes) but the hard limit is {hard}"),
                    format!("use --procs {fit} (or leave --procs unset), or raise the hard limit (ulimit -Hn, LimitNOFILE=)"),
                ));
            } else {
                out.push(Check::ok(format!(
                    "nofile: soft {soft}, hard {hard} (soft is raised to hard); {per_proc} sockets per process, {procs} process(es)"
                )));
            }
            let per_server = per_server_clients(config, servers.len() as u64);
            if per_server + 100 > hard {
                out.push(Check::warn(
                    format!("server nofile: a server gets {per_server} sockets but a process started here may open at most {hard}"),
                    format!(
                        "start more server processes (--url with {} or more servers) or raise the hard limit",
                        clients.div_ceil(hard.saturating_sub(100).max(1))
                    ),
                ));
            }
        }
        Err(e) => out.push(Check::warn(
            format!("nofile: getrlimit failed: {e}"),
            "check the process limits".into(),
        )),
    }

    match sys::local_port_range() {
        Some((lo, hi)) => {
            let width = u64::from(hi.saturating_sub(lo) + 1);
            // Bound to (ip, 0) a port is taken per source address; unbound, per destination.
            let (units, unit) = if sources.is_empty() {
                (distinct_destinations(servers), "destination")
            } else {
                (sources.len() as u64, "source address")
            };
            let capacity = width * units;
            let need = if config.scenario == crate::config::Scenario::Churn {
                // Ports of closed connections sit in TIME_WAIT for 60 s.
                clients * 3
            } else {
                clients
            };
            if need > capacity * 9 / 10 {
                out.push(Check::warn(
                    format!("ports: ip_local_port_range {lo}-{hi} ({width} ports) × {units} {unit}(s) = {capacity}, run needs about {need}"),
                    format!(
                        "widen --source-ips to {} addresses (127.0.0.0/8 all route to lo) or sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"",
                        need.div_ceil(width * 9 / 10).max(units + 1)
                    ),
                ));
            } else {
                out.push(Check::ok(format!(
                    "ports: {width} local ports × {units} {unit}(s) = {capacity} for {need} sockets"
                )));
            }
        }
        None => out.push(Check::warn(
            "ports: cannot read /proc/sys/net/ipv4/ip_local_port_range".into(),
            "check it by hand: sysctl net.ipv4.ip_local_port_range".into(),
        )),
    }

    match sys::sysctl("net/core/somaxconn").and_then(|s| s.parse::<u64>().ok()) {
        Some(n) if n < u64::from(config.connect_concurrency) => out.push(Check::warn(
            format!("somaxconn {n} is below --connect-concurrency {}: a full accept queue drops SYNs and connects wait 1-3 s", config.connect_concurrency),
            format!("sysctl -w net.core.somaxconn={} or lower --connect-concurrency", config.connect_concurrency.next_power_of_two().max(4096)),
        )),
        Some(n) => out.push(Check::ok(format!("somaxconn {n} (accept backlog cap)"))),
        None => out.push(Check::warn(
            "somaxconn: cannot read /proc/sys/net/core/somaxconn".into(),
            "check it by hand: sysctl net.core.somaxconn".into(),
        )),
    }

    if let (Some(first), Some(last)) = (sources.first(), sources.last()) {
        for ip in [first, last] {
            if let Err(e) = std::net::TcpListener::bind(SocketAddr::from((*ip, 0))) {
                out.push(Check::warn(
                    format!("source address {ip} cannot be bound: {e}"),
                    format!("sudo ip addr add {ip}/8 dev lo, or narrow --source-ips"),
                ));
            }
        }
    }
    out
}

/// Most clients any one server receives.
fn per_server_clients(config: &Config, servers: u64) -> u64 {
    let clients = u64::from(config.clients);
    match config.route {
        Route::Spread => clients.div_ceil(servers.max(1)),
        Route::Rooms => {
            let rooms = u64::from(config.rooms);
            let per_room = clients.div_ceil(rooms);
            rooms.div_ceil(servers.max(1)) * per_room
        }
    }
}

fn distinct_destinations(servers: &[Server]) -> u64 {
    let mut v: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    v.sort();
    v.dedup();
    v.len() as u64
}

/// Prints the findings on stderr, one line each.
pub fn print(checks: &[Check]) {
    for c in checks {
        if c.ok {
            eprintln!("preflight ok    {}", c.what);
        } else {
            eprintln!("preflight WARN  {}", c.what);
            if let Some(fix) = &c.fix {
                eprintln!("                change: {fix}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_clients_per_process_warns_with_a_fix() {
        let config = Config {
            clients: 10_000_000,
            rooms: 1000,
            ..Config::default()
        };
        let servers = config.servers().expect("servers");
        let sources = config.source_addrs().expect("sources");
        let checks = run(&config, &servers, &sources, 1);
        let nofile = checks
            .iter()
            .find(|c| c.what.starts_with("nofile"))
            .expect("nofile check");
        assert!(!nofile.ok);
        assert!(nofile.fix.as_deref().is_some_and(|f| f.contains("--procs")));
        let ports = checks
            .iter()
            .find(|c| c.what.starts_with("ports"))
            .expect("ports check");
        assert!(!ports.ok, "10M sockets cannot fit 16 source addresses");
    }

    #[test]
    fn small_run_passes_the_file_and_port_checks() {
        let config = Config {
            clients: 100,
            rooms: 10,
            ..Config::default()
        };
        let servers = config.servers().expect("servers");
        let sources = config.source_addrs().expect("sources");
        let checks = run(&config, &servers, &sources, 1);
        for c in checks
            .iter()
            .filter(|c| c.what.starts_with("nofile") || c.what.starts_with("ports"))
        {
            assert!(c.ok, "{c:?}");
        }
    }
}
