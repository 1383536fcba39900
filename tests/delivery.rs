//! Fan-out under pressure: slow consumers, many clients, encode-once, pings, shutdown.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use roomcast::config::rate::RateLimitArg;
use serde_json::json;
use support::{raise_nofile, Client, TestServer, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Connects with a tiny receive buffer, so that a client that stops reading blocks the
/// server's writes quickly instead of after megabytes of kernel buffering.
async fn connect_small_buffer(server: &TestServer, path: &str) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(path), stream)
        .await
        .unwrap();
    Client { ws }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_is_evicted_and_nobody_else_loses_anything() {
    // This test floods on purpose: no per-socket rate limit.
    let server = TestServer::with(|c| {
        c.room_buffer = 64;
        c.rate_limit = RateLimitArg(None);
    })
    .await;
    let (mut fast, _) = Client::join(&server.ws_url("/ws/busy?user=fast")).await;
    let mut slow = connect_small_buffer(&server, "/ws/busy?user=slow").await;
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/busy?user=pub")).await;

    // `slow` reads nothing while 400 messages of 16 KiB go by; `fast` reads as they come. The
    // publisher never runs more than 16 messages ahead of `fast` (the ring holds 64), so only a
    // reader that stopped reading can fall behind.
    const N: u64 = 400;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let fast_reader = tokio::spawn(async move {
        for i in 0..N {
            let m = fast.recv_type("message").await;
            assert_eq!(m["seq"], i + 1, "fast member gets every message, in order");
            assert!(m["text"].as_str().unwrap().starts_with(&format!("{i}:")));
            progress_tx.send_replace(i + 1);
        }
        fast
    });
    let text = "y".repeat(16 * 1024);
    for i in 0..N {
        progress.wait_for(|done| done + 16 >= i).await.unwrap();
        publisher
            .send_json(&json!({"text": format!("{i}:{text}"), "echo": false}))
            .await;
    }
    let mut fast = fast_reader.await.unwrap();

    // Once `slow` reads again, the server finds it far behind its ring and evicts it.
    let mut seen = 0u64;
    let close = loop {
        let msg = tokio::time::timeout(STEP, slow.ws.next())
            .await
            .expect("slow got no close")
            .unwrap()
            .unwrap();
        match msg {
            Message::Text(t) if t.as_str().contains("\"message\"") => seen += 1,
            Message::Close(c) => break c.expect("close code"),
            _ => {}
        }
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, "slow consumer")
    );
    assert!(
        seen < N,
        "the slow member cannot have received everything ({seen})"
    );

    let info = server
        .wait_for("/api/rooms/busy", "eviction", |_, v| v["members"] == 2)
        .await;
    assert_eq!(info["evicted"], 1);
    assert_eq!(server.stats().await["evictions"], 1);
    fast.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_write_that_never_completes_evicts_after_the_write_timeout() {
    let server = TestServer::with(|c| {
        c.write_timeout = Duration::from_millis(300);
        c.rate_limit = RateLimitArg(None);
    })
    .await;
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/w?user=pub")).await;
    let _stuck = connect_small_buffer(&server, "/ws/w?user=stuck").await;
    let text = "z".repeat(16 * 1024);
    // Enough to fill the stuck socket's buffers on both sides.
    for _ in 0..200 {
        publisher
            .send_json(&json!({"text": text, "echo": false}))
            .await;
    }
    let info = server
        .wait_for("/api/rooms/w", "write-timeout eviction", |_, v| {
            v["evicted"] == 1
        })
        .await;
    assert_eq!(info["members"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_in_ten_rooms_receive_every_message_in_order() {
    raise_nofile();
    let server = TestServer::start().await;
    const ROOMS: usize = 10;
    const PER_ROOM: usize = 100;
    const MESSAGES: u64 = 20;
    let mut joins = tokio::task::JoinSet::new();
    for r in 0..ROOMS {
        for u in 0..PER_ROOM {
            let url = server.ws_url(&format!("/ws/room-{r}?user=u{u}"));
            joins.spawn(async move { (r, Client::join(&url).await.0) });
        }
    }
    let mut clients: Vec<(usize, Client)> = Vec::new();
    while let Some(res) = joins.join_next().await {
        clients.push(res.unwrap());
    }
    let (_, list) = server.get("/api/rooms").await;
    assert_eq!(list["total"], ROOMS);
    for r in list["rooms"].as_array().unwrap() {
        assert_eq!(r["members"], PER_ROOM, "{r}");
    }

    // Every room gets MESSAGES messages over REST, interleaved across rooms.
    for i in 0..MESSAGES {
        for r in 0..ROOMS {
            let (status, v) = server
                .post(
                    &format!("/api/rooms/room-{r}/messages"),
                    &format!(r#"{{"text":"{r}/{i}"}}"#),
                )
                .await;
            assert_eq!((status, v["seq"].as_u64()), (202, Some(i + 1)));
        }
    }
    let mut readers = tokio::task::JoinSet::new();
    for (r, mut c) in clients {
        readers.spawn(async move {
            for i in 0..MESSAGES {
                let m = c.recv_type("message").await;
                assert_eq!(m["room"], format!("room-{r}"), "no frame from another room");
                assert_eq!(m["seq"], i + 1, "no loss, per-room order");
                assert_eq!(m["text"], format!("{r}/{i}"));
            }
        });
    }
    while let Some(res) = readers.join_next().await {
        res.unwrap();
    }
    let stats = server
        .wait_for("/api/stats", "all frames counted", |_, v| {
            v["frames_out"].as_u64().unwrap() >= ROOMS as u64 * PER_ROOM as u64 * MESSAGES
        })
        .await;
    assert_eq!(stats["published"], ROOMS as u64 * MESSAGES);
}

#[tokio::test]
async fn each_message_is_encoded_once_whatever_the_member_count() {
    // Presence off, so that the only room frames are the messages: the counters then move by
    // exact amounts, with no join presence still in flight to wait for.
    let dir = tempfile::tempdir().unwrap();
    let rooms = dir.path().join("rooms.toml");
    std::fs::write(&rooms, "[rooms.once]\npresence = \"off\"\n").unwrap();
    let server = TestServer::with(|c| c.rooms_config = Some(rooms)).await;
    let mut members = Vec::new();
    for i in 0..50 {
        members.push(
            Client::join(&server.ws_url(&format!("/ws/once?user=m{i}")))
                .await
                .0,
        );
    }
    let before = server.stats().await;
    for i in 0..10 {
        server
            .post("/api/rooms/once/messages", &format!(r#"{{"text":"m{i}"}}"#))
            .await;
    }
    for m in &mut members {
        for _ in 0..10 {
            m.recv_type("message").await;
        }
    }
    let after = server
        .wait_for("/api/stats", "frames out", |_, v| {
            v["frames_out"].as_u64().unwrap() >= before["frames_out"].as_u64().unwrap() + 500
        })
        .await;
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("frames_out"), 500, "50 members × 10 messages written");
    assert_eq!(delta("frames_encoded"), 10, "but each message encoded once");
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_two_ping_intervals_and_a_live_one_is_not() {
    let server = TestServer::with(|c| c.ping_interval = Duration::from_millis(200)).await;
    // A raw client that completes the handshake and then never answers anything.
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(
        b"GET /ws/p?user=mute HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    // tungstenite answers pings whenever it reads: this one reads all along, so it stays alive.
    let (mut live, _) = Client::join(&server.ws_url("/ws/p?user=live")).await;
    let live = tokio::spawn(async move {
        live.expect_silence(Duration::from_millis(1000)).await;
        live
    });
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(STEP, raw.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "server never dropped the silent peer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "dropped too early: {waited:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        buf.windows(2).any(|w| w == [0x89, 0x00]),
        "a ping was sent before the drop"
    );
    let tail = &buf[buf.len() - 2 - "ping timeout".len()..];
    assert_eq!(
        &tail[2..],
        b"ping timeout",
        "closed with the documented reason"
    );

    let mut live = live.await.unwrap();
    live.send("still here").await;
    assert_eq!(live.recv_type("message").await["text"], "still here");
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1012_promptly() {
    let mut server = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(
            Client::join(&server.ws_url(&format!("/ws/s{}?user=u{i}", i % 3)))
                .await
                .0,
        );
    }
    let (mut multi, _) = Client::join(&server.ws_url("/ws/s0?user=multi")).await;
    multi
        .send_json(&json!({"type": "join", "room": "s1"}))
        .await;
    multi.recv_type("welcome").await;
    clients.push(multi);

    let stopping = tokio::spawn(async move {
        let took = server.shutdown().await;
        (server, took)
    });
    for c in &mut clients {
        let (code, reason) = c.expect_close().await;
        assert_eq!(code, 1012, "{reason}");
        // 21 sockets at the default 1000/s: the delays come from the shortest window, 1 s.
        let v: serde_json::Value = serde_json::from_str(&reason).unwrap();
        assert_eq!(v["reason"], "server restarting");
        assert!(v["retry_after_ms"].as_u64().unwrap() < 1000, "{reason}");
    }
    let (server, took) = stopping.await.unwrap();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener is closed"
    );
}

/// A room whose only room frames are messages (presence off), so write counters move only for
/// them.
fn quiet_presence_rooms(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rooms = dir.path().join("rooms.toml");
    std::fs::write(&rooms, format!("[rooms.{name}]\npresence = \"off\"\n")).unwrap();
    (dir, rooms)
}

// One runtime thread: a batch sent while a member's task runs on another thread can be split
// across two of its writes (it takes what is in the ring when it looks), which in an unoptimised
// build on a busy machine makes the count of writes a matter of luck.
#[tokio::test]
async fn a_steady_publisher_s_messages_leave_a_busy_room_in_batches() {
    let (_dir, rooms) = quiet_presence_rooms("busy");
    let server = TestServer::with(|c| {
        c.rooms_config = Some(rooms);
        c.rate_limit = RateLimitArg(None);
        c.write_coalesce = Duration::from_millis(50);
        c.write_coalesce_frames = 8;
    })
    .await;
    let mut members = Vec::new();
    for i in 0..5 {
        members.push(
            Client::join(&server.ws_url(&format!("/ws/busy?user=m{i}")))
                .await
                .0,
        );
    }
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/busy?user=pub")).await;
    let before = server.stats().await;
    // One message per client frame, each sent (and flushed) on its own a little apart: what a
    // room fed by independent clients looks like, not a burst.
    const N: u64 = 40;
    for i in 0..N {
        publisher
            .send_json(&json!({"text": format!("m{i}"), "echo": false}))
            .await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for m in &mut members {
        for i in 0..N {
            let msg = m.recv_type("message").await;
            assert_eq!(msg["seq"], i + 1, "every message, in order");
        }
    }
    let after = server
        .wait_for("/api/stats", "frames out", |_, v| {
            v["frames_out"].as_u64().unwrap() >= before["frames_out"].as_u64().unwrap() + 5 * N
        })
        .await;
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("frames_out"), 5 * N);
    // Sent one by one, each message would wake each member for a write of its own (40 writes
    // each); held for up to 50 ms or 8 messages, the 40 go out in a handful of batches.
    assert!(
        delta("writes") * 4 <= delta("frames_out"),
        "at least 4 frames per write: {} frames in {} writes",
        delta("frames_out"),
        delta("writes")
    );
    assert!(delta("coalesced_batches") >= 1);
}

#[tokio::test]
async fn a_joiner_during_a_held_batch_gets_neither_a_gap_nor_a_duplicate() {
    let (_dir, rooms) = quiet_presence_rooms("held");
    let server = TestServer::with(|c| {
        c.rooms_config = Some(rooms);
        c.rate_limit = RateLimitArg(None);
        // Far longer than the test: only the join can send the held messages.
        c.write_coalesce = Duration::from_secs(30);
        c.write_coalesce_frames = 1024;
    })
    .await;
    let (mut early, _) = Client::join(&server.ws_url("/ws/held?user=early")).await;
    for i in 1..=3 {
        server
            .post("/api/rooms/held/messages", &format!(r#"{{"text":"m{i}"}}"#))
            .await;
    }
    // The first goes out at once (the room was quiet); 2 and 3 came within the window: held.
    assert_eq!(early.recv_type("message").await["seq"], 1);
    early.expect_silence(Duration::from_millis(100)).await;

    let (mut late, welcome) = Client::join(&server.ws_url("/ws/held?user=late&since=1")).await;
    assert_eq!(welcome["seq"], 3, "held messages are already numbered");
    // The join sent the batch: the early member gets it now, the late one through its replay.
    assert_eq!(early.recv_type("message").await["seq"], 2);
    assert_eq!(early.recv_type("message").await["seq"], 3);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let v = late.recv().await;
        if v["type"] == "message" {
            seen.push(v["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(seen, [2, 3], "replayed once each");
    server
        .post("/api/rooms/held/messages", r#"{"text":"m4"}"#)
        .await;
    // 4 is held (within the window of 3)... until the next join or the window: ask for it by
    // joining a third member, which sends it.
    let (_third, _) = Client::join(&server.ws_url("/ws/held?user=third")).await;
    assert_eq!(
        late.recv_type("message").await["seq"],
        4,
        "no duplicate of 2 or 3"
    );
}

#[tokio::test]
async fn a_quiet_room_sends_each_message_at_once() {
    let (_dir, rooms) = quiet_presence_rooms("calm");
    let server = TestServer::with(|c| {
        c.rooms_config = Some(rooms);
        c.write_coalesce = Duration::from_millis(5);
    })
    .await;
    let (mut member, _) = Client::join(&server.ws_url("/ws/calm?user=m")).await;
    for i in 1..=5u64 {
        server
            .post("/api/rooms/calm/messages", &format!(r#"{{"text":"m{i}"}}"#))
            .await;
        assert_eq!(member.recv_type("message").await["seq"], i);
        // Well past the window before the next one.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.stats().await["coalesced_batches"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_far_behind_but_within_the_room_buffer_moves_to_larger_rings_and_loses_nothing() {
    // Rings start small and grow: a member that stops reading for 600 messages (under the
    // default `--room-buffer` of 1,024) must get all of them, in order, across every move.
    let (_dir, rooms) = quiet_presence_rooms("deep");
    let server = TestServer::with(|c| {
        c.rooms_config = Some(rooms);
        c.rate_limit = RateLimitArg(None);
        c.write_timeout = Duration::from_secs(60);
    })
    .await;
    let mut slow = connect_small_buffer(&server, "/ws/deep?user=slow").await;
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/deep?user=pub")).await;
    const N: u64 = 600;
    let text = "z".repeat(4096);
    for i in 0..N {
        publisher
            .send_json(&json!({"text": format!("{i}:{text}"), "echo": false}))
            .await;
    }
    // Every message is numbered before `slow` reads anything; its socket filled long ago.
    server
        .wait_for("/api/stats", "all published", |_, v| v["published"] == N)
        .await;
    let mut next = 1u64;
    while next <= N {
        let msg = tokio::time::timeout(STEP, slow.ws.next())
            .await
            .expect("slow member stalled")
            .expect("slow member's socket ended")
            .expect("slow member's socket failed");
        let Message::Text(t) = msg else {
            panic!("unexpected frame {msg:?}");
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        if v["type"] == "message" {
            assert_eq!(v["seq"], next, "in order, none missing");
            next += 1;
        }
    }
    let stats = server.stats().await;
    assert_eq!(stats["evictions"], 0);
    assert!(stats["rings_grown"].as_u64().unwrap() >= 2, "{stats}");
}

/// The frames in `raw` (server frames: unmasked), and what is left after the last whole one.
fn split_frames(mut raw: &[u8]) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
    let mut frames = Vec::new();
    loop {
        if raw.len() < 2 {
            break;
        }
        let (len, head) = match raw[1] & 0x7f {
            126 if raw.len() >= 4 => (u16::from_be_bytes([raw[2], raw[3]]) as usize, 4),
            127 if raw.len() >= 10 => (
                u64::from_be_bytes(raw[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if raw.len() < head + len {
            break;
        }
        frames.push((raw[0] & 0x0f, raw[head..head + len].to_vec()));
        raw = &raw[head + len..];
    }
    (frames, raw.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_inside_a_frame_ends_the_socket_without_a_close_frame_after_it() {
    // A member whose socket stops taking bytes in the middle of a large frame is evicted when
    // `--write-timeout` passes. A close frame written then would land inside the half-sent
    // frame's payload: the peer would read it as payload (or garbage). The stream must end.
    let server = TestServer::with(|c| {
        c.rate_limit = RateLimitArg(None);
        c.write_timeout = Duration::from_millis(300);
    })
    .await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let req = format!(
        "GET /ws/cut?user=slow HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/cut?user=pub")).await;
    // Odd-sized frames, so that a full socket almost never stops exactly between two; enough
    // of them to fill the stuck socket's buffers on both sides.
    let text = "x".repeat(48_001);
    for i in 0..80 {
        publisher
            .send_json(&json!({"text": format!("{i}:{text}"), "echo": false}))
            .await;
    }
    server
        .wait_for("/api/stats", "the eviction", |_, v| {
            v["evictions"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut raw))
        .await
        .expect("the socket did not end")
        .ok();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let (frames, rest) = split_frames(&raw[head_end..]);
    for (opcode, payload) in &frames {
        match opcode {
            0x1 => {
                serde_json::from_slice::<serde_json::Value>(payload).expect("whole text frames");
            }
            0x8 => assert!(rest.is_empty(), "a close frame only after whole frames"),
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert!(
        !rest.windows(13).any(|w| w == b"slow consumer"),
        "a close frame was written inside a half-sent frame ({} bytes left over)",
        rest.len()
    );
}
