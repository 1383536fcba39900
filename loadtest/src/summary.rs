//! A run in one line: the headline figures of a [`Report`](crate::Report) (no latency buckets, no
//! per-server detail) as one JSON object, appended to `loadtest/results/summary.jsonl`, which
//! stays small enough for version control while full reports go to an ignored folder.
//!
//! A summary is read from the report's JSON, not from the struct, so the reports already on disk
//! (written by older versions of this tool, with fewer fields) convert by the same code:
//! `loadtest summarize FILE…`. A figure a report does not have is left out of its line.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The headline figures of one run. Field names are the JSON keys of a summary line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// When the run started, UTC, `2026-11-23T15:34:54Z`.
    pub date: String,
    /// What the caller called the run (`--label`; for converted reports, the file name without
    /// its date stamp and scenario).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub scenario: String,
    pub route: String,
    pub clients: u64,
    pub rooms: u64,
    pub servers: u64,
    /// Load generator processes.
    pub procs: u64,
    pub publishers: u64,
    /// `--rate`: messages/s per room (`saturate`: the first step's).
    pub rate: f64,
    pub duration: f64,
    pub payload_bytes: u64,
    /// How publishers sent (`--publish-pacing`): `steady` (one message per write, evenly
    /// spaced) or `burst` (several per write); absent for `idle` and in reports older than the
    /// field. Lines written before the flag existed say `steady` for `chat` and `saturate` (one
    /// message per write unless late) and `bursty` for `hot` (what `burst` does now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publishing: Option<String>,
    /// Messages per publisher socket write (1 when steady); absent in older reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_publish_write: Option<f64>,
    /// Steady publishers' messages written over half a period late; absent when none was (and
    /// in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_sends: Option<u64>,
    /// The run passed (no failure).
    pub pass: bool,
    pub connected: u64,
    pub failed_connects: u64,
    pub disconnects: u64,
    pub loss: u64,
    pub dups: u64,
    pub reorders: u64,
    pub count_mismatches: u64,
    pub ramp_secs: f64,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    /// Latency percentiles, µs; absent when nothing was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_us: Option<u64>,
    /// Server RSS growth over the ramp per connection, bytes, over all servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_bytes: Option<f64>,
    /// Server CPU seconds over the steady window (`saturate`: its best step), all servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries_per_cpu_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_per_write: Option<f64>,
    /// The load generator's CPU per delivery, µs, over the same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadtest_cpu_us_per_delivery: Option<f64>,
    /// `saturate`: deliveries/s of the highest sustained step and its msg/s per room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_deliveries_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_rate: Option<f64>,
    pub wall_secs: f64,
    /// Why the run failed (the first three reasons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
    /// The full report's file name, when one was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
}

impl Summary {
    /// The summary of a report given as JSON (`serde_json::to_value(&report)` or a report file).
    /// `report` names the full report file, if any.
    pub fn of(r: &Value, report: Option<&Path>) -> Summary {
        let s = &r["settings"];
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let f = |v: &Value| round(v.as_f64().unwrap_or(0.0));
        let of = |v: &Value| v.as_f64().map(round);
        let text = |v: &Value| v.as_str().unwrap_or("").to_string();
        let latency = &r["latency_us"];
        let delivered = u(&latency["count"]) > 0;
        let pct = |k: &str| delivered.then(|| u(&latency[k]));
        let cost = &r["cost"]["total"];
        let sat = &r["saturation"];
        let failures: Vec<String> = r["failures"]
            .as_array()
            .map(|a| a.iter().take(3).map(text).collect())
            .unwrap_or_default();
        Summary {
            date: iso_utc_secs(u(&r["started_unix_ms"]) / 1000),
            label: s["label"].as_str().map(str::to_string),
            scenario: text(&s["scenario"]),
            route: text(&s["route"]),
            clients: u(&r["clients"]),
            rooms: u(&r["rooms"]),
            servers: u(&r["servers"]),
            procs: u(&r["procs"]),
            publishers: u(&s["publishers"]),
            rate: f(&s["rate"]),
            duration: f(&s["duration"]),
            payload_bytes: u(&s["payload_bytes"]),
            publishing: r["publishing"].as_str().map(str::to_string),
            messages_per_publish_write: of(&r["messages_per_publish_write"]),
            late_sends: r["late_sends"].as_u64().filter(|&n| n > 0),
            pass: failures.is_empty(),
            connected: u(&r["connected"]),
            failed_connects: u(&r["failed_connects"]),
            disconnects: u(&r["disconnects"]),
            loss: u(&r["loss"]),
            dups: u(&r["dups"]),
            reorders: u(&r["reorders"]),
            count_mismatches: r["count_mismatches"]
                .as_array()
                .map_or(0, |a| a.len() as u64),
            ramp_secs: f(&r["ramp_secs"]),
            deliveries: u(&r["deliveries"]),
            deliveries_per_sec: f(&r["deliveries_per_sec"]),
            p50_us: pct("p50"),
            p99_us: pct("p99"),
            p999_us: pct("p999"),
            max_us: pct("max"),
            rss_per_conn_bytes: of(&r["rss_per_conn_bytes"]),
            server_cpu_seconds: of(&cost["cpu_seconds"]),
            deliveries_per_cpu_second: of(&cost["deliveries_per_cpu_second"]),
            frames_per_write: of(&cost["frames_per_write"]),
            // Older reports have no `cost`; their whole-window figure is the nearest there is.
            loadtest_cpu_us_per_delivery: of(&r["cost"]["loadtest_cpu_us_per_delivery"])
                .or_else(|| of(&r["cpu_us_per_delivery"])),
            best_deliveries_per_sec: of(&sat["best_deliveries_per_sec"]),
            best_rate: of(&sat["best_rate"]),
            wall_secs: f(&r["wall_secs"]),
            failures,
            report: report
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned()),
        }
    }

    /// Reads a full report file; the label defaults to the file name without its leading
    /// `YYYYMMDD-HHMMSS-` stamp and trailing `-<scenario>`.
    pub fn of_file(path: &Path) -> anyhow::Result<Summary> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a loadtest report", path.display()))?;
        let mut s = Summary::of(&v, Some(path));
        if s.label.is_none() {
            s.label = path
                .file_stem()
                .map(|n| label_from_name(&n.to_string_lossy(), &s.scenario));
        }
        Ok(s)
    }

    /// The one line: compact JSON, no newline.
    pub fn line(&self) -> String {
        // A struct of plain fields and strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Appends the line (and a newline) to `path`, creating the file and its folder.
    pub fn append(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // One write of the whole line: concurrent appenders do not interleave within it.
        f.write_all(format!("{}\n", self.line()).as_bytes())
            .with_context(|| format!("appending to {}", path.display()))
    }
}

/// Three decimals are more than any headline figure carries; the rest is noise in the file.
fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `20261123-153454-one-server-19000-chat` → `one-server-19000`.
fn label_from_name(stem: &str, scenario: &str) -> String {
    let b = stem.as_bytes();
    let stamped = b.len() > 16
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'-';
    let rest = if stamped { &stem[16..] } else { stem };
    rest.strip_suffix(&format!("-{scenario}"))
        .unwrap_or(rest)
        .to_string()
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn iso_utc_secs(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Latency, Report};

    #[test]
    fn dates() {
        assert_eq!(iso_utc_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc_secs(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_utc_secs(1_795_448_173), "2026-11-23T15:36:13Z");
    }

    #[test]
    fn labels() {
        assert_eq!(
            label_from_name("20261123-153454-one-server-19000-chat", "chat"),
            "one-server-19000"
        );
        assert_eq!(label_from_name("mine-idle", "idle"), "mine");
        assert_eq!(
            label_from_name("20261123-153454", "idle"),
            "20261123-153454"
        );
    }

    #[test]
    fn a_report_becomes_one_line_without_buckets() {
        let r = Report {
            clients: 19_000,
            deliveries: 380_000,
            deliveries_per_sec: 18_998.946_830_430_403,
            latency_us: Latency {
                count: 380_000,
                p50: 1290,
                p99: 2535,
                ..Latency::default()
            },
            latency_buckets: vec![(87, 1); 5000],
            failures: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            publishing: Some("steady".into()),
            ..Report::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        let s = Summary::of(&v, Some(Path::new("x/20261123-153454-a-chat.json")));
        assert_eq!(s.deliveries_per_sec, 18_998.947);
        assert_eq!(s.p99_us, Some(2535));
        assert_eq!(s.failures.len(), 3);
        assert!(!s.pass);
        assert_eq!(s.publishing.as_deref(), Some("steady"));
        assert_eq!(s.report.as_deref(), Some("20261123-153454-a-chat.json"));
        let line = s.line();
        assert!(!line.contains('\n'));
        assert!(line.len() < 1000, "{line}");
        let back: Summary = serde_json::from_str(&line).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn an_idle_run_has_no_latency() {
        let v = serde_json::to_value(Report::default()).unwrap();
        let s = Summary::of(&v, None);
        assert!(s.pass);
        assert_eq!(s.p99_us, None);
        assert!(!s.line().contains("p99_us"));
    }
}
