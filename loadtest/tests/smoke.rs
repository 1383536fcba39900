//! CI smoke run: the real load generator against a real in-process roomcast server.
//! Asserts correctness (no failed connect, no loss, exact counts), never timing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_in_twenty_rooms_lose_nothing() {
    loadtest::sys::raise_nofile().expect("raise the open-file soft limit");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = roomcast::Config {
        listen: addr,
        ..roomcast::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(roomcast::run(listener, config, async {
        let _ = stopped.await;
    }));

    let report = loadtest::run(loadtest::Config {
        url: vec![format!("ws://{addr}")],
        clients: 2000,
        rooms: 20,
        rate: Some(5.0),
        duration: 5.0,
        max_seconds: Some(120.0),
        quiet: true,
        ..loadtest::Config::default()
    })
    .await
    .expect("the load test runs");

    assert_eq!(report.failed_connects, 0, "{:?}", report.failed_by_reason);
    assert_eq!(report.loss, 0);
    assert_eq!(report.dups, 0);
    assert_eq!(report.reorders, 0);
    assert!(
        report.count_mismatches.is_empty(),
        "{:?}",
        report.count_mismatches
    );
    assert!(
        report.deliveries >= 2000 * 5 * 4,
        "deliveries: {}",
        report.deliveries
    );
    assert!(report.ok(), "{:?}", report.failures);
    // Steady pacing by default: every message its own write.
    assert_eq!(report.publishing.as_deref(), Some("steady"));
    assert_eq!(report.messages_per_publish_write, Some(1.0));

    // The server's side of the window: read from its /api/stats at both ends.
    let cost = report.cost.as_ref().expect("a chat run reports its cost");
    assert_eq!(
        cost.deliveries, report.deliveries,
        "every delivery is in the window"
    );
    assert!(cost.total.cpu_seconds.is_some_and(|c| c > 0.0), "{cost:?}");
    assert!(cost.total.deliveries_per_cpu_second.is_some(), "{cost:?}");
    // Every delivery is a frame the server wrote, in at most one write each.
    assert!(cost.total.frames_out >= report.deliveries, "{cost:?}");
    assert!(
        cost.total.frames_per_write.is_some_and(|f| f >= 1.0),
        "{cost:?}"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
