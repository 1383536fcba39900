//! Message history: history on join, gapless recovery, the paging API, idempotent
//! publishing, both lag policies, and the SQLite archive (restart, stalled writer).

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{eventually, Client, TestServer, STEP};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

/// Publishes over REST and returns the seq.
async fn publish(server: &TestServer, room: &str, text: &str) -> u64 {
    let (status, v) = server
        .post(
            &format!("/api/rooms/{room}/messages"),
            &json!({ "text": text }).to_string(),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    v["seq"].as_u64().unwrap()
}

/// Reads a replay announcement and the `count` message frames after it; returns both.
async fn read_replay(c: &mut Client, kind: &str) -> (Value, Vec<Value>) {
    let header = c.recv_non_presence().await;
    assert_eq!(header["type"], kind, "{header}");
    let count = header["count"].as_u64().unwrap();
    let mut frames = Vec::new();
    for _ in 0..count {
        let m = c.recv_non_presence().await;
        assert_eq!(m["type"], "message", "{m}");
        frames.push(m);
    }
    (header, frames)
}

/// Reads live messages until `seen` holds `n` seqs.
async fn read_until(c: &mut Client, n: usize, seen: &mut Vec<u64>) {
    while seen.len() < n {
        let m = c.recv_non_presence().await;
        assert_eq!(m["type"], "message", "{m}");
        seen.push(m["seq"].as_u64().unwrap());
    }
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn history_on_join_in_both_forms() {
    let server = TestServer::start().await;
    let (mut anchor, _) = Client::join(&server.ws_url("/ws/talk?user=anchor")).await;
    for i in 1..=5 {
        publish(&server, "talk", &format!("m{i}")).await;
    }

    // URL form.
    let (mut a, welcome) = Client::join(&server.ws_url("/ws/talk?user=a&history=3")).await;
    assert_eq!(welcome["seq"], 5);
    let (header, frames) = read_replay(&mut a, "history").await;
    assert_eq!(
        header,
        json!({"type": "history", "room": "talk", "count": 3, "epoch": welcome["epoch"]})
    );
    assert_eq!(seqs(&frames), [3, 4, 5]);
    assert_eq!(frames[0]["text"], "m3");

    // Join-frame form, asking for more than is kept.
    let mut b = Client::connect(&server.ws_url("/ws?user=b")).await;
    b.send_json(&json!({"type": "join", "room": "talk", "history": 50}))
        .await;
    assert_eq!(b.recv_type("welcome").await["seq"], 5);
    let (_, frames) = read_replay(&mut b, "history").await;
    assert_eq!(seqs(&frames), [1, 2, 3, 4, 5]);

    // Then live messages, once.
    publish(&server, "talk", "live").await;
    for _ in 1..=5 {
        anchor.recv_type("message").await;
    }
    for c in [&mut a, &mut b, &mut anchor] {
        let m = c.recv_type("message").await;
        assert_eq!(
            (m["seq"].as_u64(), m["text"].as_str()),
            (Some(6), Some("live"))
        );
    }
    a.expect_silence(Duration::from_millis(200)).await;

    // A plain join gets no replay at all.
    let (mut c, _) = Client::join(&server.ws_url("/ws/talk?user=c")).await;
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn history_off_keeps_nothing() {
    let server = TestServer::with(|c| c.history = 0).await;
    let (_anchor, _) = Client::join(&server.ws_url("/ws/r?user=anchor")).await;
    publish(&server, "r", "one").await;
    let (mut a, _) = Client::join(&server.ws_url("/ws/r?history=10")).await;
    let (header, frames) = read_replay(&mut a, "history").await;
    assert_eq!((header["count"].as_u64(), frames.len()), (Some(0), 0));
    let (mut b, _) = Client::join(&server.ws_url("/ws/r?since=0")).await;
    let (header, _) = read_replay(&mut b, "recovery").await;
    assert_eq!(header["complete"], false);
    assert_eq!(header["from"], 2);
}

/// Waits until the server has seen a reader leave room `flow` (only the publishers are left) and
/// at least one message has been published after seq `last`, so that its recovery has a gap to
/// fill.
async fn away_while_others_publish(server: &TestServer, publishers: u64, last: u64) {
    server
        .wait_for(
            "/api/rooms/flow",
            "the reader gone and a message missed",
            |_, v| v["members"] == publishers && v["last_seq"].as_u64().unwrap() > last,
        )
        .await;
}

/// One reader drops its connection twice while three publishers keep going; each time it
/// comes back with `since` (URL form, then join-frame form). It must see every seq exactly
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_disconnect_under_concurrent_publishing_is_gapless() {
    let server = TestServer::with(|c| {
        c.history = 10_000;
        c.rate_limit = roomcast::config::rate::RateLimitArg(None);
    })
    .await;
    const PUBLISHERS: u64 = 3;
    const EACH: u64 = 200;
    const TOTAL: u64 = PUBLISHERS * EACH;
    let (mut reader, _) = Client::join(&server.ws_url("/ws/flow?user=reader")).await;
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/flow?user=p{p}"))).await;
        publishers.spawn(async move {
            for i in 0..EACH {
                c.send_json(&json!({"text": format!("p{p}-{i}"), "echo": false}))
                    .await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            // Stay in the room until the reader is done, so it is never emptied.
            c
        });
    }

    let mut seen: Vec<u64> = Vec::new();
    read_until(&mut reader, 150, &mut seen).await;
    drop(reader); // the phone lost its connection
    let last = *seen.last().unwrap();
    away_while_others_publish(&server, PUBLISHERS, last).await;

    let (mut reader, welcome) =
        Client::join(&server.ws_url(&format!("/ws/flow?user=reader&since={last}"))).await;
    let (header, frames) = read_replay(&mut reader, "recovery").await;
    assert_eq!(header["complete"], true, "{header}");
    assert!(
        welcome["seq"].as_u64().unwrap() < TOTAL,
        "the reader came back while messages were still flowing"
    );
    assert_eq!(header["since"], last);
    assert_eq!(header["from"], last + 1);
    assert!(
        !frames.is_empty(),
        "something was published while it was away"
    );
    assert_eq!(
        frames.len() as u64,
        welcome["seq"].as_u64().unwrap() - last,
        "replay runs up to the welcome's seq"
    );
    seen.extend(seqs(&frames));
    read_until(&mut reader, 350, &mut seen).await;
    drop(reader);
    let last = *seen.last().unwrap();
    away_while_others_publish(&server, PUBLISHERS, last).await;

    let mut reader = Client::connect(&server.ws_url("/ws?user=reader")).await;
    reader
        .send_json(&json!({"type": "join", "room": "flow", "since": last}))
        .await;
    reader.recv_type("welcome").await;
    let (header, frames) = read_replay(&mut reader, "recovery").await;
    assert_eq!(header["complete"], true, "{header}");
    seen.extend(seqs(&frames));
    read_until(&mut reader, TOTAL as usize, &mut seen).await;

    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(seen, expected, "every seq once, in order");
    while let Some(p) = publishers.join_next().await {
        p.unwrap();
    }
    reader.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn recovery_from_too_far_back_says_so_and_sends_what_is_kept() {
    let server = TestServer::with(|c| c.history = 5).await;
    let (_anchor, _) = Client::join(&server.ws_url("/ws/r?user=anchor")).await;
    for i in 1..=20 {
        publish(&server, "r", &format!("m{i}")).await;
    }
    let (mut c, welcome) = Client::join(&server.ws_url("/ws/r?since=3")).await;
    let (header, frames) = read_replay(&mut c, "recovery").await;
    assert_eq!(
        header,
        json!({"type": "recovery", "room": "r", "since": 3, "complete": false, "from": 16, "count": 5,
               "epoch": welcome["epoch"]})
    );
    assert_eq!(seqs(&frames), [16, 17, 18, 19, 20]);

    // Up to date: complete, nothing to send.
    let (mut d, _) = Client::join(&server.ws_url("/ws/r?since=20")).await;
    let (header, frames) = read_replay(&mut d, "recovery").await;
    assert_eq!(
        (header["complete"].as_bool(), frames.len()),
        (Some(true), 0)
    );
    assert_eq!(header["from"], 21);

    // A seq the room never reached (its numbering restarted): everything kept, incomplete.
    let (mut e, _) = Client::join(&server.ws_url("/ws/r?since=999")).await;
    let (header, frames) = read_replay(&mut e, "recovery").await;
    assert_eq!(header["complete"], false);
    assert_eq!(seqs(&frames), [16, 17, 18, 19, 20]);
}

#[tokio::test]
async fn bad_history_parameters_are_refused() {
    let server = TestServer::start().await;
    for (path, code) in [
        ("/ws/r?history=abc", "bad_param"),
        ("/ws/r?history=-1", "bad_param"),
        ("/ws/r?since=x", "bad_param"),
        ("/ws/r?since=1&history=1", "bad_param"),
        ("/ws?user=a&history=5", "bad_param"),
    ] {
        let r = support::http_with(
            server.addr,
            "GET",
            path,
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (400, Some(code)),
            "{path}"
        );
    }
    let mut c = Client::connect(&server.ws_url("/ws?user=a")).await;
    for frame in [
        json!({"type": "join", "room": "r", "history": "ten"}),
        json!({"type": "join", "room": "r", "since": -4}),
        json!({"type": "join", "room": "r", "since": 1, "history": 2}),
    ] {
        c.send_json(&frame).await;
        let e = c.recv_non_presence().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad_message")),
            "{frame}"
        );
    }
}

#[tokio::test]
async fn paging_api_walks_kept_history_newest_first() {
    let server = TestServer::with(|c| c.history = 10).await;
    let (_anchor, _) = Client::join(&server.ws_url("/ws/%23pages?user=anchor")).await;
    for i in 1..=25 {
        publish(&server, "%23pages", &format!("m{i}")).await;
    }
    let mut got = Vec::new();
    let mut path = "/api/rooms/%23pages/messages?limit=4".to_owned();
    loop {
        let (status, v) = server.get(&path).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["room"], "#pages");
        let page = v["messages"].as_array().unwrap();
        assert!(page.len() <= 4);
        for m in page {
            assert_eq!(m["type"], "message");
            assert_eq!(m["text"], format!("m{}", m["seq"]));
            got.push(m["seq"].as_u64().unwrap());
        }
        match v["next_before"].as_u64() {
            Some(before) => path = format!("/api/rooms/%23pages/messages?limit=4&before={before}"),
            None => break,
        }
    }
    assert_eq!(
        got,
        (16..=25).rev().collect::<Vec<u64>>(),
        "the ring keeps the last 10"
    );
    let (_, v) = server.get("/api/rooms/%23pages/messages").await;
    assert_eq!(
        v["messages"].as_array().unwrap().len(),
        10,
        "default limit covers the ring"
    );
    assert_eq!(v["next_before"], Value::Null);

    for (path, status, code) in [
        ("/api/rooms/%23pages/messages?limit=0", 400, "bad_param"),
        ("/api/rooms/%23pages/messages?limit=1001", 400, "bad_param"),
        ("/api/rooms/%23pages/messages?limit=x", 400, "bad_param"),
        ("/api/rooms/%23pages/messages?before=0", 400, "bad_param"),
        ("/api/rooms/%23pages/messages?before=-3", 400, "bad_param"),
        ("/api/rooms/bad%20room/messages", 400, "bad_room"),
        ("/api/rooms/nobody/messages", 404, "no_such_room"),
    ] {
        let (s, v) = server.get(path).await;
        assert_eq!((s, v["error"].as_str()), (status, Some(code)), "{path}");
    }
    let r = support::http(server.addr, "DELETE", "/api/rooms/x/messages", None)
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET, POST");
}

#[tokio::test]
async fn a_repeated_id_is_acknowledged_but_not_broadcast_again() {
    let server = TestServer::start().await;
    let (mut sender, _) = Client::join(&server.ws_url("/ws/d?user=s")).await;
    let (mut other, _) = Client::join(&server.ws_url("/ws/d?user=o")).await;

    sender.send_json(&json!({"text": "once", "id": "k1"})).await;
    let m = sender.recv_type("message").await;
    assert_eq!((m["seq"].as_u64(), m["id"].as_str()), (Some(1), Some("k1")));
    // The retry (e.g. after a lost acknowledgement).
    sender.send_json(&json!({"text": "once", "id": "k1"})).await;
    let ack = sender.recv_non_presence().await;
    assert_eq!(
        ack,
        json!({"type": "ack", "room": "d", "id": "k1", "seq": 1, "duplicate": true})
    );
    // REST has the same window, for ids of its own: the socket's `k1` is another author's.
    let (status, v) = server
        .post("/api/rooms/d/messages", r#"{"text":"twice","id":"k1"}"#)
        .await;
    assert_eq!(
        (status, v["duplicate"].as_bool(), v["seq"].as_u64()),
        (202, Some(false), Some(2))
    );
    let (status, v) = server
        .post("/api/rooms/d/messages", r#"{"text":"twice","id":"k1"}"#)
        .await;
    assert_eq!(
        (status, v),
        (
            202,
            json!({"room": "d", "seq": 2, "id": "k1", "duplicate": true})
        )
    );

    let first = other.recv_type("message").await;
    assert_eq!(
        (first["seq"].as_u64(), first["text"].as_str()),
        (Some(1), Some("once"))
    );
    let second = other.recv_type("message").await;
    assert_eq!(second["seq"], 2, "the duplicates were never broadcast");
    other.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(server.stats().await["duplicates"], 2);

    // Bad ids.
    sender.send_json(&json!({"text": "x", "id": ""})).await;
    assert_eq!(sender.recv_type("error").await["code"], "bad_id");
    let long = "z".repeat(65);
    let (status, v) = server
        .post(
            "/api/rooms/d/messages",
            &json!({"text": "x", "id": long}).to_string(),
        )
        .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_id")));
    let (status, v) = server
        .post("/api/rooms/d/messages", r#"{"text":"x","id":5}"#)
        .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_id")));
}

#[tokio::test]
async fn ids_are_forgotten_after_the_dedupe_window() {
    let server = TestServer::with(|c| c.dedupe_window = Duration::from_millis(300)).await;
    let (_anchor, _) = Client::join(&server.ws_url("/ws/w?user=anchor")).await;
    let post = |id: &str| json!({"text": "t", "id": id}).to_string();
    let started = tokio::time::Instant::now();
    let (_, v) = server.post("/api/rooms/w/messages", &post("a")).await;
    assert_eq!(v["duplicate"], false);
    let (_, v) = server.post("/api/rooms/w/messages", &post("a")).await;
    assert_eq!(v["duplicate"], true);
    // Retries inside the window stay duplicates (they do not publish or extend it); the first
    // one past the window publishes again, as seq 2.
    let v = eventually(
        "the id to be forgotten",
        Duration::from_millis(20),
        || async {
            let (_, v) = server.post("/api/rooms/w/messages", &post("a")).await;
            if v["duplicate"] == false {
                return Some(v);
            }
            assert_eq!(
                (v["duplicate"].as_bool(), v["seq"].as_u64()),
                (Some(true), Some(1))
            );
            None
        },
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "forgotten before the window ended: {:?}",
        started.elapsed()
    );
    assert_eq!(v["seq"], 2, "{v}");
}

/// A member that stops reading while 400 messages of 16 KiB go by, with a tiny receive buffer.
/// Returns it and the publisher (which must stay in the room). The server needs `--rate-limit
/// off`: one socket publishes all 400 at once.
async fn lag_one_member(server: &TestServer) -> (Client, Client) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        server.ws_url("/ws/lag?user=slow"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    let mut slow = Client { ws };
    slow.recv_type("welcome").await;
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/lag?user=pub")).await;
    let text = "y".repeat(16 * 1024);
    for i in 0..400 {
        publisher
            .send_json(&json!({"text": format!("{i}:{text}"), "echo": false}))
            .await;
    }
    // Wait until all 400 are published before the slow member reads again.
    server
        .wait_for("/api/rooms/lag", "400 published", |_, v| {
            v["last_seq"] == 400
        })
        .await;
    (slow, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_policy_evict_closes_the_laggard() {
    let server = TestServer::with(|c| {
        c.room_buffer = 32;
        c.rate_limit = roomcast::config::rate::RateLimitArg(None);
    })
    .await;
    let (mut slow, _publisher) = lag_one_member(&server).await;
    assert_eq!(
        slow.expect_close().await,
        (1008, "slow consumer".to_owned())
    );
    assert_eq!(server.stats().await["lag_resyncs"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_policy_resync_reports_the_gap_and_keeps_the_member() {
    let server = TestServer::with(|c| {
        c.room_buffer = 32;
        c.history = 1000;
        // The slow member's write blocks while the publisher sends; only lag may act here.
        c.write_timeout = Duration::from_secs(60);
        c.lag_policy = roomcast::config::LagPolicy::Resync;
        c.rate_limit = roomcast::config::rate::RateLimitArg(None);
    })
    .await;
    let (mut slow, _publisher) = lag_one_member(&server).await;
    let mut expected_next = 1u64;
    let mut gaps = Vec::new();
    while expected_next <= 400 {
        let msg = tokio::time::timeout(STEP, slow.ws.next())
            .await
            .expect("frames keep coming")
            .expect("stream open")
            .expect("no error");
        let v: Value = match msg {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed instead of resynced: {c:?}"),
            _ => continue,
        };
        match v["type"].as_str() {
            Some("lagged") => {
                assert_eq!(v["room"], "lag");
                let (from, to) = (
                    v["missed_from"].as_u64().unwrap(),
                    v["missed_to"].as_u64().unwrap(),
                );
                assert_eq!(
                    from, expected_next,
                    "the gap starts right after the last seq seen"
                );
                assert!(to >= from);
                gaps.push((from, to));
                expected_next = to + 1;
            }
            Some("message") => {
                assert_eq!(
                    v["seq"], expected_next,
                    "after a notice, messages resume at missed_to + 1"
                );
                expected_next += 1;
            }
            _ => {}
        }
    }
    assert!(!gaps.is_empty(), "the slow member must have lagged");
    let stats = server.stats().await;
    assert_eq!(stats["evictions"], 0);
    assert_eq!(stats["lag_resyncs"], gaps.len());
    // Still a member, still receiving live messages; the gap can be fetched from history.
    publish(&server, "lag", "after").await;
    assert_eq!(slow.recv_type("message").await["seq"], 401);
    let (from, _) = gaps[0];
    let (_, v) = server
        .get(&format!(
            "/api/rooms/lag/messages?before={}&limit=1",
            from + 1
        ))
        .await;
    assert_eq!(
        v["messages"][0]["seq"], from,
        "the missed message is in the history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_history_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("roomcast.sqlite");
    let with_db = |db: std::path::PathBuf| {
        move |c: &mut roomcast::Config| {
            c.history = 20;
            c.history_db = Some(db);
        }
    };

    let mut first = TestServer::with(with_db(db.clone())).await;
    let (anchor, first_welcome) = Client::join(&first.ws_url("/ws/keep?user=anchor")).await;
    let epoch = first_welcome["epoch"].as_str().unwrap().to_owned();
    for i in 1..=30 {
        publish(&first, "keep", &format!("m{i}")).await;
    }
    // The room empties and comes back within the same server: numbering continues.
    drop(anchor);
    first
        .wait_for("/api/rooms/keep", "room emptied", |s, _| s == 404)
        .await;
    let (anchor, welcome) = Client::join(&first.ws_url("/ws/keep?user=anchor")).await;
    assert_eq!(welcome["seq"], 30);
    assert_eq!(welcome["epoch"], epoch.as_str(), "the same incarnation");
    assert_eq!(publish(&first, "keep", "m31").await, 31);
    drop(anchor);
    first.shutdown().await;
    assert!(db.exists());

    let second = TestServer::with(with_db(db.clone())).await;
    let (mut a, welcome) = Client::join(&second.ws_url("/ws/keep?user=a&history=5")).await;
    assert_eq!(welcome["seq"], 31, "seq continues from the database");
    assert_eq!(welcome["epoch"], epoch.as_str(), "and so does the epoch");
    let (_, frames) = read_replay(&mut a, "history").await;
    assert_eq!(seqs(&frames), [27, 28, 29, 30, 31]);
    assert_eq!(frames[4]["text"], "m31");

    let (mut b, _) =
        Client::join(&second.ws_url(&format!("/ws/keep?user=b&since=15&epoch={epoch}"))).await;
    let (header, frames) = read_replay(&mut b, "recovery").await;
    assert_eq!(header["complete"], true, "{header}");
    assert_eq!(header["epoch"], epoch.as_str());
    assert_eq!(seqs(&frames), (16..=31).collect::<Vec<u64>>());
    // The room's past was read from disk on the blocking pool before the registry's lock was
    // taken, not under it.
    assert_eq!(second.stats().await["history_db_locked_reads"], 0);

    assert_eq!(publish(&second, "keep", "new").await, 32);
    // The paging API reaches past the ring (20) into the database.
    let (_, v) = second
        .get("/api/rooms/keep/messages?before=6&limit=10")
        .await;
    assert_eq!(seqs(v["messages"].as_array().unwrap()), [5, 4, 3, 2, 1]);
    assert_eq!(v["next_before"], Value::Null);
    let (_, v) = second.get("/api/rooms/keep/messages?limit=1000").await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 32);
    assert_eq!(v["epoch"], epoch.as_str(), "pages carry the epoch");
    drop((a, b));
    // With no member left the room is served from the database alone.
    second
        .wait_for(
            "/api/rooms/keep/messages?limit=2",
            "served from disk",
            |s, v| s == 200 && v["messages"][0]["seq"] == 32,
        )
        .await;
}

/// With history in memory only, a restart loses the rooms' numbering: a client recovering
/// with its position from before must be told, not sent the new incarnation's messages that
/// happen to carry the seqs it asks for.
#[tokio::test]
async fn a_position_from_before_a_restart_without_a_database_is_refused_not_replayed() {
    let mut first = TestServer::with(|c| c.history = 50).await;
    let (_a, welcome) = Client::join(&first.ws_url("/ws/r?user=a")).await;
    let old = welcome["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        publish(&first, "r", &format!("before {i}")).await;
    }
    first.shutdown().await;

    let second = TestServer::with(|c| c.history = 50).await;
    let (_b, welcome) = Client::join(&second.ws_url("/ws/r?user=b")).await;
    let new = welcome["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new, old, "a restart without a database starts a new epoch");
    for i in 1..=5 {
        publish(&second, "r", &format!("after {i}")).await;
    }
    // The old client comes back with seq 2 of the old epoch: seqs 3..5 exist again, but they
    // are other messages.
    let (mut c, _) =
        Client::join(&second.ws_url(&format!("/ws/r?user=c&since=2&epoch={old}"))).await;
    let header = c.recv_type("recovery").await;
    assert_eq!(
        header,
        json!({"type": "recovery", "room": "r", "since": 2, "complete": false, "from": 6,
               "count": 0, "epoch": new})
    );
    // Nothing of the new incarnation's past follows: the next frame is live.
    publish(&second, "r", "live").await;
    let m = c.recv_type("message").await;
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(6), Some("live"))
    );
    // A join frame carries the epoch the same way; a malformed one is refused.
    c.send_json(&json!({"type": "join", "room": "s", "since": 0, "epoch": "not-an-epoch"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(e["code"], "bad_message", "{e}");
    let (status, body) = refused(&second, "/ws/r?user=d&since=1&epoch=short").await;
    assert_eq!((status, body.as_str()), (400, "bad_param"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_writer_never_stalls_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stall.sqlite");
    let path = db.clone();
    let server = TestServer::with(move |c| {
        c.history_db = Some(path);
        c.history_db_queue = 16;
        c.rate_limit = roomcast::config::rate::RateLimitArg(None);
    })
    .await;
    let (mut reader, _) = Client::join(&server.ws_url("/ws/s?user=reader")).await;
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/s?user=pub")).await;
    publisher
        .send_json(&json!({"text": "before", "echo": false}))
        .await;
    reader.recv_type("message").await;
    server
        .wait_for("/api/stats", "first write", |_, v| {
            v["history_db_written"] == 1
        })
        .await;

    // Another process holds the database's write lock: the writer cannot commit anything.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.busy_timeout(STEP).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();

    const N: u64 = 500;
    for i in 0..N {
        publisher
            .send_json(&json!({"text": format!("m{i}"), "echo": false}))
            .await;
    }
    for i in 0..N {
        let m = reader.recv_type("message").await;
        assert_eq!(m["seq"], i + 2, "every message delivered, in order");
    }
    let stats = server.stats().await;
    assert_eq!(stats["history_db_written"], 1, "nothing could be written");
    assert!(
        stats["history_db_dropped"].as_u64().unwrap() > 0,
        "the full queue dropped and counted: {stats}"
    );
    let metrics = support::http(server.addr, "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&metrics.body).contains("roomcast_history_db_dropped_total"));

    // The lock goes away: the writer catches up with what it still holds.
    lock.execute_batch("ROLLBACK").unwrap();
    server
        .wait_for("/api/stats", "writer caught up", |_, v| {
            v["history_db_written"].as_u64().unwrap() + v["history_db_dropped"].as_u64().unwrap()
                == N + 1
        })
        .await;
}

// ---- History together with per-room settings and security ----

const UPGRADE: [(&str, &str); 4] = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// An upgrade the server refuses before the 101: its status and JSON error code.
async fn refused(server: &TestServer, path: &str) -> (u16, String) {
    let r = support::http_with(server.addr, "GET", path, &UPGRADE, None)
        .await
        .unwrap();
    (
        r.status,
        r.json()["error"].as_str().unwrap_or("").to_owned(),
    )
}

/// GET with headers: status and JSON error code (empty on success).
async fn get_code(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let r = support::http_with(server.addr, "GET", path, headers, None)
        .await
        .unwrap();
    (
        r.status,
        r.json()["error"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn replay_joins_carry_the_password_and_rooms_keep_their_own_depth() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rooms.toml");
    std::fs::write(
        &file,
        "[rooms.\"deep:*\"]\nhistory = 3\n[rooms.off]\nhistory = 0\n[rooms.vip]\npassword = \"pw\"\n",
    )
    .unwrap();
    let server = TestServer::with(|c| {
        c.history = 10;
        c.rooms_config = Some(file);
    })
    .await;

    // Depth: the file's value, 0 from the file, the flag where the file says nothing.
    for (room, kept) in [("deep:1", 3), ("off", 0), ("plain", 10)] {
        let (_anchor, _) = Client::join(&server.ws_url(&format!("/ws/{room}?user=a"))).await;
        for i in 1..=12 {
            publish(&server, room, &format!("m{i}")).await;
        }
        let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/{room}?history=100"))).await;
        let (header, frames) = read_replay(&mut c, "history").await;
        assert_eq!(header["count"], kept, "{room}");
        assert_eq!(frames.len(), kept, "{room}");
    }

    let (_anchor, _) = Client::join(&server.ws_url("/ws/vip?user=a&password=pw")).await;
    for i in 1..=5 {
        // Without the API key, a REST publish into a password room needs the password too.
        let (status, v) = server
            .post(
                "/api/rooms/vip/messages?password=pw",
                &json!({ "text": format!("v{i}") }).to_string(),
            )
            .await;
        assert_eq!(status, 202, "{v}");
    }
    // URL form: no password, no replay; the right one gets both.
    assert_eq!(
        refused(&server, "/ws/vip?since=0").await,
        (403, "bad_password".to_owned())
    );
    assert_eq!(
        refused(&server, "/ws/vip?password=no&history=5").await,
        (403, "bad_password".to_owned())
    );
    let (mut b, welcome) = Client::join(&server.ws_url("/ws/vip?password=pw&since=2")).await;
    assert_eq!(welcome["seq"], 5);
    let (header, frames) = read_replay(&mut b, "recovery").await;
    assert_eq!(header["complete"], true, "{header}");
    assert_eq!(seqs(&frames), [3, 4, 5]);

    // Join-frame form: a wrong password is an error frame and nothing is replayed.
    let mut c = Client::connect(&server.ws_url("/ws?user=c")).await;
    c.send_json(&json!({"type": "join", "room": "vip", "password": "no", "history": 2}))
        .await;
    let e = c.recv_non_presence().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_password"))
    );
    c.expect_silence(Duration::from_millis(200)).await;
    c.send_json(&json!({"type": "join", "room": "vip", "password": "pw", "history": 2}))
        .await;
    assert_eq!(c.recv_non_presence().await["type"], "welcome");
    let (_, frames) = read_replay(&mut c, "history").await;
    assert_eq!(seqs(&frames), [4, 5]);

    // Reading the history over REST needs the password too.
    let path = "/api/rooms/vip/messages";
    assert_eq!(
        get_code(&server, path, &[]).await,
        (403, "bad_password".to_owned())
    );
    assert_eq!(
        get_code(&server, &format!("{path}?password=no"), &[]).await,
        (403, "bad_password".to_owned())
    );
    let (status, v) = server.get(&format!("{path}?password=pw&limit=2")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(seqs(v["messages"].as_array().unwrap()), [5, 4]);
}

#[tokio::test]
async fn replay_and_history_reads_follow_the_access_token() {
    const SECRET: &str = "history-test-secret-of-some-length";
    const KEY: &str = "backend-key";
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_key = Some(KEY.into());
    })
    .await;
    let hour = Duration::from_secs(3600);
    let alice = roomcast::core::auth::issue(SECRET, "alice", Some("open"), hour).unwrap();
    let admin = roomcast::core::auth::issue(SECRET, "admin", None, hour).unwrap();
    let key_header = format!("Bearer {KEY}");
    let auth = [("authorization", key_header.as_str())];
    // Members that keep both rooms alive until the end.
    let mut anchors = Vec::new();
    for room in ["open", "secret"] {
        let (c, _) = Client::join(&server.ws_url(&format!("/ws/{room}?token={admin}"))).await;
        anchors.push(c);
        for i in 1..=3 {
            let r = support::http_with(
                server.addr,
                "POST",
                &format!("/api/rooms/{room}/messages"),
                &auth,
                Some(json!({ "text": format!("{room}{i}") }).to_string()),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 202);
        }
    }

    // The token is checked before the join and its replay.
    assert_eq!(
        refused(&server, &format!("/ws/secret?since=0&token={alice}")).await,
        (403, "forbidden_room".to_owned())
    );
    assert_eq!(
        refused(&server, "/ws/open?since=0").await,
        (401, "unauthorized".to_owned())
    );
    let (mut a, _) = Client::join(&server.ws_url(&format!("/ws/open?since=1&token={alice}"))).await;
    let (_, frames) = read_replay(&mut a, "recovery").await;
    assert_eq!(seqs(&frames), [2, 3]);
    a.send_json(&json!({"type": "join", "room": "secret", "since": 0}))
        .await;
    let e = a.recv_non_presence().await;
    assert_eq!(e["code"], "forbidden_room", "{e}");
    a.expect_silence(Duration::from_millis(200)).await;

    // REST reads: the same rules, or the API key.
    let bearer = format!("Bearer {alice}");
    let as_alice = [("authorization", bearer.as_str())];
    assert_eq!(
        get_code(&server, "/api/rooms/open/messages", &[]).await,
        (401, "unauthorized".to_owned())
    );
    assert_eq!(
        get_code(&server, "/api/rooms/open/messages", &as_alice).await,
        (200, String::new())
    );
    assert_eq!(
        get_code(
            &server,
            &format!("/api/rooms/open/messages?token={alice}"),
            &[]
        )
        .await,
        (200, String::new())
    );
    assert_eq!(
        get_code(&server, "/api/rooms/secret/messages", &as_alice).await,
        (403, "forbidden_room".to_owned())
    );
    let r = support::http_with(
        server.addr,
        "GET",
        "/api/rooms/secret/messages",
        &auth,
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(seqs(r.json()["messages"].as_array().unwrap()), [3, 2, 1]);

    // `/api/stats` keeps both sides' counters.
    let stats = server.stats().await;
    for key in [
        "rate_limited",
        "auth_refused",
        "duplicates",
        "lag_resyncs",
        "history_db_written",
        "history_db_dropped",
        "connections_refused",
    ] {
        assert!(stats[key].is_u64(), "{key} missing: {stats}");
    }
    assert!(stats["auth_refused"].as_u64().unwrap() >= 4);
    drop(anchors);
}

#[tokio::test]
async fn a_retried_id_still_passes_the_rate_limits() {
    let server = TestServer::with(|c| {
        // One message per 200 ms, no burst: the retry hint is at most 200 ms (short, yet far
        // longer than the ack's round trip, so the immediate retry is surely refused).
        c.rate_limit = "5/s burst 1".parse().unwrap();
    })
    .await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r?user=c")).await;
    c.send_json(&json!({"text": "once", "id": "k1"})).await;
    assert_eq!(c.recv_non_presence().await["id"], "k1");
    // An immediate retry is over the socket's budget: refused, not acknowledged.
    c.send_json(&json!({"text": "once", "id": "k1"})).await;
    let e = c.recv_non_presence().await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    // After the wait it hints at (the sleep is the behaviour under test: the hint is enough),
    // the retry is recognised as a duplicate.
    let wait = e["retry_after_ms"].as_u64().unwrap();
    assert!((1..=200).contains(&wait), "one token every 200 ms: {wait}");
    tokio::time::sleep(Duration::from_millis(wait + 20)).await;
    c.send_json(&json!({"text": "once", "id": "k1"})).await;
    let ack = c.recv_non_presence().await;
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["duplicate"].as_bool(),
            ack["seq"].as_u64()
        ),
        (Some("ack"), Some(true), Some(1)),
        "{ack}"
    );
}

/// Escape-heavy messages of the largest size, into many rooms from many sockets: what the
/// rings keep stays within `--history-memory`, and so does the process's memory, give or take
/// a baseline. Without the budget the rings would keep every one of them (about 55 MiB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_history_stays_within_its_memory_budget() {
    const BUDGET: u64 = 4 << 20;
    const SOCKETS: usize = 20;
    const PER_ROOM: usize = 40;
    let budget = BUDGET.to_string();
    let node = support::nodes::Node::standalone(&[
        "--history-memory",
        &budget,
        "--max-message-bytes",
        "12288",
    ])
    .await;
    let (_, before) = node.get("/api/stats").await;
    // Plain text of control characters: each JSON-escapes to six bytes in the broadcast frame,
    // so a 12,000-byte message makes a 72 KiB frame.
    let text = "\u{1}".repeat(12_000);
    let mut sockets = Vec::new();
    for s in 0..SOCKETS {
        let (c, _) = Client::join(&node.ws(&format!("/ws/flood{s}?user=f{s}"))).await;
        sockets.push(c);
    }
    for _ in 0..PER_ROOM {
        for c in sockets.iter_mut() {
            c.send(&text).await;
            assert_eq!(c.recv_type("message").await["text"], text.as_str());
        }
    }
    let total = (SOCKETS * PER_ROOM) as u64;
    let (_, stats) = node.get("/api/stats").await;
    assert_eq!(stats["published"], total);
    let kept = stats["history_bytes"].as_u64().expect("history_bytes");
    assert!(kept <= BUDGET, "{kept} bytes kept over a {BUDGET} budget");
    assert!(kept > BUDGET / 2, "the budget is used, not emptied: {kept}");
    assert!(stats["history_trimmed"].as_u64().unwrap() > 0, "{stats}");
    let grown = stats["rss_bytes"].as_u64().unwrap() - before["rss_bytes"].as_u64().unwrap();
    // The budget, plus a baseline for sockets, buffers and allocator slack.
    assert!(
        grown < BUDGET + (32 << 20),
        "resident memory grew {grown} bytes for a {BUDGET}-byte budget"
    );
}

/// A page stops before 1 MiB of messages, whatever `limit` asks, and `next_before` goes on.
#[tokio::test]
async fn a_page_is_bounded_in_bytes_and_continues() {
    let server = TestServer::with(|c| c.history = 100).await;
    let (_anchor, _) = Client::join(&server.ws_url("/ws/big?user=anchor")).await;
    let text = "x".repeat(60_000);
    for _ in 0..40 {
        publish(&server, "big", &text).await;
    }
    let (status, v) = server.get("/api/rooms/big/messages?limit=1000").await;
    assert_eq!(status, 200);
    let first = v["messages"].as_array().unwrap().len();
    assert!(
        (1..40).contains(&first),
        "{first} messages of 60 KB in one page"
    );
    let body = serde_json::to_vec(&v).unwrap().len();
    assert!(body < (1 << 20) + 4096, "{body} bytes in one page");
    // Walking on reaches every message once.
    let mut seen = first;
    let mut before = v["next_before"].as_u64().expect("more pages");
    loop {
        let (_, v) = server
            .get(&format!(
                "/api/rooms/big/messages?limit=1000&before={before}"
            ))
            .await;
        seen += v["messages"].as_array().unwrap().len();
        match v["next_before"].as_u64() {
            Some(b) => before = b,
            None => break,
        }
    }
    assert_eq!(seen, 40);
}

/// A client that asks for a page and never reads it is dropped after `--write-timeout`, not
/// kept (with its response) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_page_is_dropped_at_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::with(|c| {
        c.history = 100;
        c.write_timeout = Duration::from_millis(500);
    })
    .await;
    let (_anchor, _) = Client::join(&server.ws_url("/ws/big?user=anchor")).await;
    let text = "x".repeat(60_000);
    for _ in 0..17 {
        publish(&server, "big", &text).await;
    }
    // A receive window of a few KiB, and ten pages asked at once (pipelined): more than any
    // socket buffer takes, so the server's writes stall.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let request = "GET /api/rooms/big/messages?limit=1000 HTTP/1.1\r\nhost: x\r\n\r\n".repeat(10);
    stream.write_all(request.as_bytes()).await.unwrap();
    server
        .wait_for("/api/stats", "the write timeout", |_, v| {
            v["http_write_timeouts"] == 1
        })
        .await;
    // What the kernel had taken before the timeout still arrives, then the end: not the page.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut got)).await;
    assert!(got.len() < 10 * 16 * 60_000, "{} bytes arrived", got.len());
}

/// A flood of slow page reads (the archive's disk is made slow on purpose) must hold up
/// neither joins into new rooms, which read their own past from the same database, nor pings
/// on sockets already open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_slow_page_reads_holds_up_no_join_and_no_ping() {
    const SLOW: Duration = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pages.sqlite");
    let server = TestServer::with(move |c| {
        c.history_db = Some(db);
        c.fault_page_read_delay = SLOW;
        c.rate_limit = roomcast::config::rate::RateLimitArg(None);
    })
    .await;
    // An archived room with no member: its pages come from the database.
    {
        let (mut c, _) = Client::join(&server.ws_url("/ws/old?user=a")).await;
        for i in 0..3 {
            c.send_json(&json!({ "text": format!("m{i}") })).await;
            c.recv_type("message").await;
        }
    }
    server
        .wait_for("/api/stats", "archived", |_, v| {
            v["history_db_written"] == 3
        })
        .await;
    let (mut calm, _) = Client::join(&server.ws_url("/ws/calm?user=calm")).await;

    // Three times as many page reads as the server reads at once, each 3 s long.
    let flood_start = tokio::time::Instant::now();
    let addr = server.addr;
    let flood: Vec<_> = (0..12)
        .map(|_| {
            tokio::spawn(async move {
                let r = support::http(addr, "GET", "/api/rooms/old/messages?limit=10", None)
                    .await
                    .unwrap();
                assert_eq!(r.status, 200);
                tokio::time::Instant::now()
            })
        })
        .collect();
    // Let the page reads reach the server and take every reader.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for i in 0..3 {
        let t = tokio::time::Instant::now();
        let (_c, welcome) = Client::join(&server.ws_url(&format!("/ws/new-{i}?user=b"))).await;
        assert_eq!(welcome["type"], "welcome");
        let took = t.elapsed();
        assert!(
            took < SLOW / 3,
            "join {i} waited {took:?} behind page reads"
        );
        let t = tokio::time::Instant::now();
        calm.send_json(&json!({"type": "ping"})).await;
        assert_eq!(calm.recv_type("pong").await["type"], "pong");
        let took = t.elapsed();
        assert!(took < SLOW / 3, "a ping waited {took:?}");
    }
    let joins_done = tokio::time::Instant::now();
    let mut first_page = None::<tokio::time::Instant>;
    for f in flood {
        let done = f.await.unwrap();
        first_page = Some(first_page.map_or(done, |p| p.min(done)));
    }
    let first_page = first_page.unwrap();
    // The joins really ran while the page reads held the readers.
    assert!(first_page >= flood_start + SLOW, "a page read was not slow");
    assert!(joins_done < first_page, "the joins ran after the flood");
}
