//! What a run found: every figure, the settings that produced it, why it failed if it did,
//! and the human table the binary prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{Config, Scenario};
use crate::cost::Cost;
use crate::http::Stats;
use crate::preflight::Check;
use crate::units::{ms, thousands};

/// Latency percentiles, µs, from publisher write to receiver read.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// One server's side of the run, from its `/api/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerReport {
    pub url: String,
    /// Sockets this run opened there.
    pub opened: u64,
    pub before: Option<Stats>,
    pub after_ramp: Option<Stats>,
    pub end: Option<Stats>,
    /// After every client closed (connections should be back to `before`).
    pub after_close: Option<Stats>,
    /// (rss after ramp − rss before) / opened.
    pub rss_per_conn_bytes: Option<f64>,
}

/// One rate step of `saturate`.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Target messages/s per room instance.
    pub rate: f64,
    pub seconds: f64,
    pub sent_per_sec: f64,
    pub target_sent_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub loss: u64,
    pub disconnects: u64,
    pub p99_us: u64,
    pub passed: bool,
    /// Both sides' CPU over this step (servers sampled at its start and end).
    pub cost: Option<Cost>,
}

/// The result of `saturate`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Saturation {
    pub steps: Vec<Step>,
    /// Deliveries/s of the fastest step without loss and under the p99 bound.
    pub best_deliveries_per_sec: f64,
    pub best_rate: f64,
    pub stopped_because: String,
}

/// Everything a run measured. `failures` is empty exactly when the run passed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub settings: Option<Config>,
    pub started_unix_ms: u64,
    pub wall_secs: f64,
    pub procs: u32,
    pub preflight: Vec<Check>,

    pub clients: u32,
    pub rooms: u32,
    pub servers: usize,
    /// How the publishers sent: `--publish-pacing`, `steady` or `burst` (`Config::publishing`);
    /// `None` for `idle`.
    pub publishing: Option<String>,
    /// Sockets that completed the upgrade and got their welcome (churn: every session).
    pub connected: u64,
    pub failed_connects: u64,
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Sockets the server (or the network) closed before the run ended.
    pub disconnects: u64,
    pub disconnects_by_reason: BTreeMap<String, u64>,
    /// Churn: sessions that connected, stayed their lifetime and left cleanly.
    pub sessions: u64,
    pub unclean_closes: u64,
    pub ramp_secs: f64,
    pub ramp_connects_per_sec: f64,

    /// Seconds publishers were publishing.
    pub publish_secs: f64,
    pub sent: u64,
    pub acked: u64,
    /// Socket writes that carried the publishers' messages.
    pub publish_writes: u64,
    /// `sent / publish_writes`: 1 when every message had a write of its own.
    pub messages_per_publish_write: Option<f64>,
    /// Steady publishers' messages written more than half a period late.
    pub late_sends: u64,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    /// Deliveries the server owed: unique deliveries plus losses.
    pub expected_deliveries: u64,
    pub loss: u64,
    pub dups: u64,
    pub reorders: u64,
    pub presence_frames: u64,
    pub server_errors: u64,
    pub other_frames: u64,
    pub unstamped: u64,
    pub latency_us: Latency,
    /// Full latency histogram, `[µs, count]` buckets.
    pub latency_buckets: Vec<(u64, u64)>,

    pub server_stats: Vec<ServerReport>,
    pub rss_per_conn_bytes: Option<f64>,
    pub rooms_checked: u64,
    /// Every disagreement between what was opened/sent and what a server reports.
    pub count_mismatches: Vec<String>,

    /// CPU seconds of the load generator (this process and its workers), whole run.
    pub cpu_seconds: f64,
    /// CPU seconds of the clients from just before publishing to the end of the drain.
    pub cpu_steady_seconds: f64,
    /// `cpu_steady_seconds` per delivery in that window, µs.
    pub cpu_us_per_delivery: Option<f64>,
    /// Server CPU, deliveries per server CPU-second, frames per write and loadtest CPU per
    /// delivery, per server and in total: over the steady window (publishing and drain), or
    /// for `saturate` over its highest sustained step.
    pub cost: Option<Cost>,

    pub saturation: Option<Saturation>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    /// Worth knowing, not a failure.
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// Fills `failures` from the figures. Saturate expects loss at its last step.
    pub fn judge(&mut self, scenario: Scenario) {
        if self.failed_connects > 0 {
            self.failures.push(format!(
                "{} connects failed: {}",
                self.failed_connects,
                reasons(&self.failed_by_reason)
            ));
        }
        if self.disconnects > 0 && scenario != Scenario::Saturate {
            self.failures.push(format!(
                "{} clients were disconnected: {}",
                self.disconnects,
                reasons(&self.disconnects_by_reason)
            ));
        }
        if self.loss > 0 && scenario != Scenario::Saturate {
            self.failures.push(format!("{} messages lost", self.loss));
        }
        if self.dups > 0 {
            self.failures
                .push(format!("{} duplicate deliveries", self.dups));
        }
        if self.reorders > 0 {
            self.failures
                .push(format!("{} deliveries out of seq order", self.reorders));
        }
        if self.server_errors > 0 {
            self.failures.push(format!(
                "{} error frames from the server",
                self.server_errors
            ));
        }
        if !self.count_mismatches.is_empty() {
            self.failures.push(format!(
                "{} count mismatches (first: {})",
                self.count_mismatches.len(),
                self.count_mismatches[0]
            ));
        }
        if matches!(
            scenario,
            Scenario::Chat | Scenario::Hot | Scenario::Saturate
        ) && self.deliveries == 0
        {
            self.failures.push("no message was delivered".into());
        }
    }

    /// The table the binary prints.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        let scenario = self
            .settings
            .as_ref()
            .map(|s| format!("{:?}", s.scenario).to_lowercase())
            .unwrap_or_default();
        row("scenario", scenario);
        row(
            "clients / rooms / servers",
            format!(
                "{} / {} / {} ({} loadtest process(es))",
                self.clients, self.rooms, self.servers, self.procs
            ),
        );
        row("connected", thousands(self.connected));
        row(
            "failed connects",
            if self.failed_connects == 0 {
                "0".into()
            } else {
                format!(
                    "{} ({})",
                    thousands(self.failed_connects),
                    reasons(&self.failed_by_reason)
                )
            },
        );
        if self.disconnects > 0 {
            row(
                "disconnects",
                format!(
                    "{} ({})",
                    thousands(self.disconnects),
                    reasons(&self.disconnects_by_reason)
                ),
            );
        }
        if self.sessions > 0 {
            row("churn sessions", thousands(self.sessions));
        }
        row(
            "ramp",
            format!(
                "{:.1} s ({:.0} connects/s)",
                self.ramp_secs, self.ramp_connects_per_sec
            ),
        );
        // Idle runs publish nothing: no rows of zeros for them.
        if self.sent > 0 || self.deliveries > 0 {
            row(
                "published",
                format!(
                    "{} in {:.1} s ({} echoed)",
                    thousands(self.sent),
                    self.publish_secs,
                    thousands(self.acked)
                ),
            );
            let late = if self.publishing.as_deref() == Some("steady") {
                format!(
                    ", {:.1}% of them over half a period late",
                    100.0 * self.late_sends as f64 / self.sent.max(1) as f64
                )
            } else {
                String::new()
            };
            row(
                "publishing",
                format!(
                    "{}: {} messages per publisher write{late}",
                    self.publishing.as_deref().unwrap_or("?"),
                    opt(self.messages_per_publish_write, 2)
                ),
            );
            row("deliveries", thousands(self.deliveries));
            row(
                "deliveries/s",
                thousands(self.deliveries_per_sec.round() as u64),
            );
        }
        row(
            "loss / dups / reorders",
            format!("{} / {} / {}", self.loss, self.dups, self.reorders),
        );
        let l = &self.latency_us;
        if l.count > 0 {
            row(
                "latency p50/p90/p99/p99.9",
                format!(
                    "{} / {} / {} / {}",
                    ms(l.p50),
                    ms(l.p90),
                    ms(l.p99),
                    ms(l.p999)
                ),
            );
            row("latency max", ms(l.max));
        }
        for s in &self.server_stats {
            let rss = |st: &Option<Stats>| {
                st.as_ref()
                    .map(|s| format!("{:.1} MiB", s.rss_bytes as f64 / 1048576.0))
                    .unwrap_or_else(|| "?".into())
            };
            let source = match s.before.as_ref().and_then(|b| b.measured_pid) {
                Some(pid) => format!("CPU and RSS from /proc/{pid}"),
                None => "CPU and RSS from its /api/stats".into(),
            };
            row(
                &format!("server {}", s.url),
                format!(
                    "{} sockets; RSS idle {} → ramped {} → end {}; {}; {source}",
                    thousands(s.opened),
                    rss(&s.before),
                    rss(&s.after_ramp),
                    rss(&s.end),
                    s.rss_per_conn_bytes
                        .map(|b| format!("{:.2} KiB/conn", b / 1024.0))
                        .unwrap_or_else(|| "KiB/conn ?".into())
                ),
            );
        }
        row(
            "server RSS per connection",
            self.rss_per_conn_bytes
                .map(|b| format!("{:.2} KiB", b / 1024.0))
                .unwrap_or_else(|| "?".into()),
        );
        row(
            "rooms checked",
            format!(
                "{} ({} count mismatches)",
                self.rooms_checked,
                self.count_mismatches.len()
            ),
        );
        row(
            "loadtest CPU",
            format!(
                "{:.1} s in all; {:.1} s while publishing{}",
                self.cpu_seconds,
                self.cpu_steady_seconds,
                self.cpu_us_per_delivery
                    .map(|u| format!(" = {u:.2} µs per delivery"))
                    .unwrap_or_default()
            ),
        );
        if let Some(c) = &self.cost {
            let what = if self.saturation.is_some() {
                "cost, best step"
            } else {
                "cost, steady window"
            };
            row(what, c.summary());
            if c.servers.len() > 1 {
                for s in &c.servers {
                    row(
                        &format!("  {}", s.url),
                        format!("{} deliveries; {}", thousands(s.deliveries), s.summary()),
                    );
                }
            }
        }
        if let Some(s) = &self.saturation {
            for st in &s.steps {
                let cost = st
                    .cost
                    .as_ref()
                    .map(|c| {
                        format!(
                            "; {} deliveries/server CPU-s, {} frames/write, loadtest {} µs/delivery",
                            opt(c.total.deliveries_per_cpu_second, 0),
                            opt(c.total.frames_per_write, 2),
                            opt(c.loadtest_cpu_us_per_delivery, 2)
                        )
                    })
                    .unwrap_or_default();
                row(
                    &format!("  step {} msg/s/room", st.rate),
                    format!(
                        "{} deliveries/s, sent {:.0}/{:.0} per s, loss {}, p99 {} {}{cost}",
                        thousands(st.deliveries_per_sec.round() as u64),
                        st.sent_per_sec,
                        st.target_sent_per_sec,
                        st.loss,
                        ms(st.p99_us),
                        if st.passed { "ok" } else { "STOP" }
                    ),
                );
            }
            row(
                "highest sustained",
                format!(
                    "{} deliveries/s at {} msg/s/room (stopped: {})",
                    thousands(s.best_deliveries_per_sec.round() as u64),
                    s.best_rate,
                    s.stopped_because
                ),
            );
        }
        row("wall time", format!("{:.1} s", self.wall_secs));
        for n in &self.notes {
            row("note", n.clone());
        }
        for m in self.count_mismatches.iter().take(10) {
            row("MISMATCH", m.clone());
        }
        if self.count_mismatches.len() > 10 {
            row(
                "MISMATCH",
                format!("… and {} more", self.count_mismatches.len() - 10),
            );
        }
        if self.ok() {
            row("result", "PASS".into());
        } else {
            for f in &self.failures {
                row("FAIL", f.clone());
            }
        }
        t
    }
}

/// `refused 3, timeout 1`
pub fn reasons(m: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `12,345` or `1.23` (`digits` decimals), `?` when absent.
fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if digits == 0 => thousands(v.round() as u64),
        Some(v) => format!("{v:.digits$}"),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judging() {
        let mut r = Report {
            deliveries: 10,
            ..Report::default()
        };
        r.judge(Scenario::Chat);
        assert!(r.ok());

        let mut r = Report {
            deliveries: 10,
            loss: 2,
            failed_connects: 1,
            failed_by_reason: [("refused".to_string(), 1)].into(),
            ..Report::default()
        };
        r.judge(Scenario::Chat);
        assert_eq!(r.failures.len(), 2);
        assert!(r.failures[0].contains("refused 1"));

        let mut r = Report {
            deliveries: 10,
            loss: 2,
            ..Report::default()
        };
        r.judge(Scenario::Saturate);
        assert!(r.ok(), "saturate stops at the first loss");

        let mut r = Report::default();
        r.judge(Scenario::Chat);
        assert!(!r.ok(), "a chat run with no delivery is a failure");
        let mut r = Report::default();
        r.judge(Scenario::Idle);
        assert!(r.ok());
    }
}
