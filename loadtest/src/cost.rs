//! What a window of the run cost, on both sides of the socket: server CPU seconds (from each
//! server's `/api/stats` at the window's two ends), deliveries per server CPU-second, frames per
//! socket write (the server's batching), and the load generator's own CPU per delivery. The
//! arithmetic is here, pure; the coordinator takes the two samples.

use serde::Serialize;

use crate::http::Stats;
use crate::units::thousands;

/// One end of a window: what the clients had counted and what every server said.
#[derive(Debug, Clone, Default)]
pub struct Mark {
    /// Deliveries the clients counted, per server index (clients of server i read them).
    pub deliveries_by_server: Vec<u64>,
    /// CPU seconds of the load generator's clients (every worker process).
    pub loadtest_cpu: f64,
    /// `/api/stats` of each server, in `--url` order; `None` where the GET failed.
    pub servers: Vec<Option<Stats>>,
    /// Seconds since some fixed instant (only differences matter).
    pub at_secs: f64,
    /// Bytes the clients read off their sockets so far (every worker process).
    pub wire_bytes_in: u64,
}

/// The cost of one server (or of all of them: `url` is `total`) over a window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ServerCost {
    pub url: String,
    /// Server CPU seconds (user + system) spent in the window; `None` when the server does
    /// not report `cpu_seconds` or a sample is missing.
    pub cpu_seconds: Option<f64>,
    /// Deliveries the clients of this server counted in the window.
    pub deliveries: u64,
    /// `deliveries / cpu_seconds`: how much fan-out one server core-second buys.
    pub deliveries_per_cpu_second: Option<f64>,
    /// Room frames the server wrote (Δ`frames_out`; presence frames included).
    pub frames_out: u64,
    /// Socket writes carrying them (Δ`writes`).
    pub writes: u64,
    /// `frames_out / writes`: frames batched into one write.
    pub frames_per_write: Option<f64>,
}

/// Both sides' cost of a window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Cost {
    pub seconds: f64,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    /// Every server added up; `cpu_seconds` only when every server reported it.
    pub total: ServerCost,
    pub servers: Vec<ServerCost>,
    /// CPU seconds of the load generator's clients in the window.
    pub loadtest_cpu_seconds: f64,
    /// `loadtest_cpu_seconds` per delivery, µs.
    pub loadtest_cpu_us_per_delivery: Option<f64>,
    /// Bytes the clients read in the window per delivery: the wire cost of one delivery
    /// (compressed frames as they came with `--compression`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire_bytes_per_delivery: Option<f64>,
}

/// `num / den` when `den` is positive.
fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| num / den)
}

impl ServerCost {
    /// One server between two samples of its stats.
    pub fn between(url: &str, a: Option<&Stats>, b: Option<&Stats>, deliveries: u64) -> Self {
        let (frames_out, writes, cpu_seconds) = match (a, b) {
            (Some(a), Some(b)) => (
                b.frames_out.saturating_sub(a.frames_out),
                b.writes.saturating_sub(a.writes),
                // A server restarted in between would read negative: no figure then.
                match (a.cpu_seconds, b.cpu_seconds) {
                    (Some(x), Some(y)) if y >= x => Some(y - x),
                    _ => None,
                },
            ),
            _ => (0, 0, None),
        };
        let mut c = ServerCost {
            url: url.to_string(),
            cpu_seconds,
            deliveries,
            frames_out,
            writes,
            ..ServerCost::default()
        };
        c.derive();
        c
    }

    fn derive(&mut self) {
        self.deliveries_per_cpu_second = self
            .cpu_seconds
            .and_then(|cpu| ratio(self.deliveries as f64, cpu));
        self.frames_per_write = ratio(self.frames_out as f64, self.writes as f64);
    }

    /// The sum of several servers.
    fn total(servers: &[ServerCost]) -> Self {
        let mut t = ServerCost {
            url: "total".into(),
            cpu_seconds: Some(0.0),
            ..ServerCost::default()
        };
        for s in servers {
            t.cpu_seconds = t.cpu_seconds.zip(s.cpu_seconds).map(|(x, y)| x + y);
            t.deliveries += s.deliveries;
            t.frames_out += s.frames_out;
            t.writes += s.writes;
        }
        if servers.is_empty() {
            t.cpu_seconds = None;
        }
        t.derive();
        t
    }
}

impl Cost {
    /// The window from `a` to `b`; `urls` names the servers in `--url` order.
    pub fn between(urls: &[String], a: &Mark, b: &Mark) -> Self {
        let delivered = |m: &Mark, i: usize| m.deliveries_by_server.get(i).copied().unwrap_or(0);
        let servers: Vec<ServerCost> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                ServerCost::between(
                    url,
                    a.servers.get(i).and_then(Option::as_ref),
                    b.servers.get(i).and_then(Option::as_ref),
                    delivered(b, i).saturating_sub(delivered(a, i)),
                )
            })
            .collect();
        let total = ServerCost::total(&servers);
        let seconds = (b.at_secs - a.at_secs).max(0.0);
        let loadtest_cpu_seconds = (b.loadtest_cpu - a.loadtest_cpu).max(0.0);
        Cost {
            seconds,
            deliveries: total.deliveries,
            deliveries_per_sec: ratio(total.deliveries as f64, seconds).unwrap_or(0.0),
            loadtest_cpu_us_per_delivery: ratio(
                loadtest_cpu_seconds * 1e6,
                total.deliveries as f64,
            ),
            loadtest_cpu_seconds,
            wire_bytes_per_delivery: ratio(
                b.wire_bytes_in.saturating_sub(a.wire_bytes_in) as f64,
                total.deliveries as f64,
            ),
            total,
            servers,
        }
    }

    /// `2.1 s server CPU = 45,000 deliveries/CPU-s, 3.10 frames/write; loadtest 1.20 µs/delivery`
    pub fn summary(&self) -> String {
        let t = &self.total;
        format!(
            "{} deliveries in {:.1} s; {}; loadtest {}; {} wire bytes per delivery",
            thousands(self.deliveries),
            self.seconds,
            t.summary(),
            self.loadtest_cpu_us_per_delivery
                .map(|u| format!("{u:.2} µs CPU per delivery"))
                .unwrap_or_else(|| "µs CPU per delivery ?".into()),
            self.wire_bytes_per_delivery
                .map(|b| format!("{b:.0}"))
                .unwrap_or_else(|| "?".into()),
        )
    }
}

impl ServerCost {
    /// `2.1 s CPU = 45,000 deliveries per CPU-second, 3.10 frames per write`
    pub fn summary(&self) -> String {
        let cpu = match (self.cpu_seconds, self.deliveries_per_cpu_second) {
            (Some(c), Some(d)) => format!(
                "{c:.2} s server CPU = {} deliveries per CPU-second",
                thousands(d.round() as u64)
            ),
            (Some(c), None) => format!("{c:.2} s server CPU"),
            (None, _) => "server CPU ? (no cpu_seconds in /api/stats)".into(),
        };
        let batching = self
            .frames_per_write
            .map(|f| format!("{f:.2} frames per write"))
            .unwrap_or_else(|| "no writes".into());
        format!("{cpu}, {batching}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(frames_out: u64, writes: u64, cpu: Option<f64>) -> Stats {
        Stats {
            frames_out,
            writes,
            cpu_seconds: cpu,
            ..Stats::default()
        }
    }

    #[test]
    fn one_server_window() {
        let c = ServerCost::between(
            "a",
            Some(&stats(1_000, 500, Some(10.0))),
            Some(&stats(41_000, 10_500, Some(12.5))),
            40_000,
        );
        assert_eq!(c.cpu_seconds, Some(2.5));
        assert_eq!(c.frames_out, 40_000);
        assert_eq!(c.writes, 10_000);
        assert_eq!(c.deliveries_per_cpu_second, Some(16_000.0));
        assert_eq!(c.frames_per_write, Some(4.0));
    }

    #[test]
    fn missing_or_backwards_samples_give_no_figure() {
        let old = ServerCost::between("a", Some(&stats(0, 0, None)), Some(&stats(5, 5, None)), 5);
        assert_eq!(old.cpu_seconds, None);
        assert_eq!(old.deliveries_per_cpu_second, None);
        assert_eq!(old.frames_per_write, Some(1.0));
        let restarted = ServerCost::between(
            "a",
            Some(&stats(9, 9, Some(30.0))),
            Some(&stats(3, 1, Some(1.0))),
            5,
        );
        assert_eq!(restarted.cpu_seconds, None);
        assert_eq!((restarted.frames_out, restarted.writes), (0, 0));
        assert_eq!(restarted.frames_per_write, None, "no writes: no ratio");
        let unreachable = ServerCost::between("a", None, Some(&stats(5, 5, Some(1.0))), 5);
        assert_eq!(unreachable.cpu_seconds, None);
        let idle = ServerCost::between(
            "a",
            Some(&stats(0, 0, Some(1.0))),
            Some(&stats(0, 0, Some(1.0))),
            0,
        );
        assert_eq!(idle.cpu_seconds, Some(0.0));
        assert_eq!(idle.deliveries_per_cpu_second, None, "no CPU: no ratio");
    }

    #[test]
    fn window_adds_servers_and_divides_loadtest_cpu() {
        let urls = vec!["a".to_string(), "b".to_string()];
        let a = Mark {
            deliveries_by_server: vec![100, 200],
            loadtest_cpu: 5.0,
            servers: vec![
                Some(stats(100, 100, Some(1.0))),
                Some(stats(200, 100, Some(2.0))),
            ],
            at_secs: 10.0,
            wire_bytes_in: 1_000,
        };
        let b = Mark {
            deliveries_by_server: vec![30_100, 10_200],
            loadtest_cpu: 5.1,
            servers: vec![
                Some(stats(30_100, 10_100, Some(2.0))),
                Some(stats(10_200, 2_600, Some(2.5))),
            ],
            at_secs: 30.0,
            wire_bytes_in: 8_001_000,
        };
        let c = Cost::between(&urls, &a, &b);
        assert_eq!(c.deliveries, 40_000);
        assert_eq!(c.seconds, 20.0);
        assert_eq!(c.deliveries_per_sec, 2_000.0);
        assert_eq!(c.servers[0].deliveries_per_cpu_second, Some(30_000.0));
        assert_eq!(c.servers[1].deliveries_per_cpu_second, Some(20_000.0));
        assert_eq!(c.servers[1].frames_per_write, Some(4.0));
        assert_eq!(c.total.url, "total");
        assert_eq!(c.total.cpu_seconds, Some(1.5));
        let per_cpu = c.total.deliveries_per_cpu_second.expect("both reported");
        assert!((per_cpu - 40_000.0 / 1.5).abs() < 1e-6, "{per_cpu}");
        // 40,000 frames in 12,500 writes
        assert_eq!(c.total.frames_per_write, Some(3.2));
        let lt = c.loadtest_cpu_us_per_delivery.expect("deliveries > 0");
        assert!((lt - 2.5).abs() < 1e-6, "0.1 s / 40,000 = 2.5 µs, got {lt}");
        assert_eq!(c.wire_bytes_per_delivery, Some(200.0));
        assert!(c.summary().contains("40,000 deliveries"), "{}", c.summary());
        assert!(
            c.summary().contains("200 wire bytes per delivery"),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn total_cpu_needs_every_server() {
        let urls = vec!["a".to_string(), "b".to_string()];
        let a = Mark {
            servers: vec![Some(stats(0, 0, Some(1.0))), Some(stats(0, 0, None))],
            ..Mark::default()
        };
        let b = Mark {
            deliveries_by_server: vec![10, 10],
            servers: vec![Some(stats(10, 5, Some(2.0))), Some(stats(10, 5, None))],
            at_secs: 1.0,
            ..Mark::default()
        };
        let c = Cost::between(&urls, &a, &b);
        assert_eq!(c.servers[0].cpu_seconds, Some(1.0));
        assert_eq!(c.total.cpu_seconds, None);
        assert_eq!(c.total.frames_per_write, Some(2.0));
        assert_eq!(c.loadtest_cpu_us_per_delivery, Some(0.0));
    }
}
