//! The `minimal` baseline server under the real load generator: the scenarios the comparison
//! scripts run pass against it, publishers pace as asked, and its CPU time and RSS come from
//! /proc (it reports no `cpu_seconds` of its own).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use loadtest::{Config, Pacing, Scenario};

/// A `minimal` process, killed when dropped.
struct Minimal {
    child: Child,
    addr: SocketAddr,
}

impl Minimal {
    fn start() -> Minimal {
        Minimal::start_with(&[])
    }

    fn start_with(flags: &[&str]) -> Minimal {
        let mut child = Command::new(env!("CARGO_BIN_EXE_minimal"))
            .args(["--listen", "127.0.0.1:0", "--threads", "2"])
            .args(flags)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start minimal");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let first = lines.next().expect("a first line").expect("readable");
        let addr = first
            .strip_prefix("minimal: listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"));
        // Keep draining: a full pipe would block the server.
        std::thread::spawn(move || lines.for_each(drop));
        Minimal { child, addr }
    }

    fn config(&self, scenario: Scenario) -> Config {
        Config {
            url: vec![format!("ws://{}", self.addr)],
            scenario,
            clients: 200,
            rooms: 4,
            duration: 2.0,
            max_seconds: Some(60.0),
            quiet: true,
            ..Config::default()
        }
    }
}

impl Drop for Minimal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn chat_with_steady_publishers_writes_one_frame_per_write() {
    let server = Minimal::start();
    let report = loadtest::run(Config {
        rate: Some(20.0),
        ..server.config(Scenario::Chat)
    })
    .await
    .expect("the load test runs");
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(report.loss, 0);
    assert!(report.deliveries >= 200 * 20, "{}", report.deliveries);
    assert_eq!(report.publishing.as_deref(), Some("steady"));
    assert_eq!(report.messages_per_publish_write, Some(1.0));
    let pid = server.child.id();
    let before = report.server_stats[0].before.as_ref().expect("stats");
    assert_eq!(
        before.measured_pid,
        Some(pid),
        "found by its listening port"
    );
    let cost = report.cost.as_ref().expect("a chat run has a cost");
    assert!(cost.total.cpu_seconds.is_some_and(|c| c > 0.0), "{cost:?}");
    // One write_frame per message per member.
    assert_eq!(cost.total.frames_per_write, Some(1.0), "{cost:?}");
}

/// `--direct`: the publisher's task writes every member's socket; nothing may be lost, doubled
/// or reordered, and the welcome still comes before the first message.
#[tokio::test]
async fn direct_writes_deliver_every_message_once_in_order() {
    let server = Minimal::start_with(&["--direct"]);
    for scenario in [Scenario::Chat, Scenario::Hot] {
        let report = loadtest::run(Config {
            rate: Some(if scenario == Scenario::Hot {
                500.0
            } else {
                20.0
            }),
            ..server.config(scenario)
        })
        .await
        .expect("the load test runs");
        assert!(report.ok(), "{scenario:?}: {:?}", report.failures);
        assert_eq!(
            (report.loss, report.dups, report.reorders),
            (0, 0, 0),
            "{scenario:?}"
        );
        assert!(report.deliveries > 0, "{scenario:?}");
        let cost = report.cost.as_ref().expect("a cost");
        assert_eq!(
            cost.total.frames_per_write,
            Some(1.0),
            "{scenario:?}: {cost:?}"
        );
    }
}

#[tokio::test]
async fn burst_publishing_writes_several_messages_at_once() {
    let server = Minimal::start();
    let report = loadtest::run(Config {
        rate: Some(40.0),
        publish_pacing: Pacing::Burst,
        burst_size: 8,
        ..server.config(Scenario::Chat)
    })
    .await
    .expect("the load test runs");
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(report.publishing.as_deref(), Some("burst"));
    // Groups of 8; a late publisher may send a little more in one write.
    assert!(
        report.messages_per_publish_write.is_some_and(|m| m >= 8.0),
        "{:?}",
        report.messages_per_publish_write
    );
}

#[tokio::test]
async fn hot_with_steady_publishing_keeps_its_rate() {
    let server = Minimal::start();
    let report = loadtest::run(Config {
        clients: 20,
        rate: Some(200.0),
        ..server.config(Scenario::Hot)
    })
    .await
    .expect("the load test runs");
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(report.messages_per_publish_write, Some(1.0));
    // 200 msg/s for 2 s: not hot's default 1,500/s, nor the window's bursts. (Less when a
    // busy machine kept the publisher from catching up before the stop.)
    assert!((300..=410).contains(&report.sent), "{}", report.sent);
}

#[tokio::test]
async fn idle_measures_memory_from_proc() {
    let server = Minimal::start();
    let report = loadtest::run(server.config(Scenario::Idle))
        .await
        .expect("the load test runs");
    assert!(report.ok(), "{:?}", report.failures);
    assert_eq!(report.publishing, None);
    assert!(report.rss_per_conn_bytes.is_some());
    let before = report.server_stats[0].before.as_ref().expect("stats");
    assert_eq!(before.measured_pid, Some(server.child.id()));
}
