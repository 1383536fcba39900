//! Protocol and HTTP API behaviour, end to end over real sockets.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use support::nodes::Node;
use support::{eventually, http, http_with, Client, TestServer, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_message_and_presence_have_their_documented_shape() {
    let server = TestServer::start().await;
    let (mut alice, w) = Client::join(&server.ws_url("/ws/general?user=alice")).await;
    assert_eq!(
        w,
        json!({"type": "welcome", "room": "general", "user": "alice", "members": 1, "seq": 0,
               "epoch": w["epoch"], "users": [{"id": w["users"][0]["id"], "user": "alice"}]})
    );
    assert_eq!(w["epoch"].as_str().map(str::len), Some(12), "{w}");

    let (mut bob, w) = Client::join(&server.ws_url("/ws/general?user=bob")).await;
    assert_eq!(w["members"], 2);
    assert_eq!(w["user"], "bob");

    // Alice's own join may be announced first; wait for the frame that announces bob.
    let p = loop {
        let p = alice.recv_type("presence").await;
        if p["joined"].as_array().unwrap().contains(&json!("bob")) {
            break p;
        }
    };
    assert_eq!(p["room"], "general");
    assert_eq!(p["members"], 2);
    assert!(
        p["joined"].as_array().unwrap().contains(&json!("bob")),
        "{p}"
    );
    assert!(p["left"].as_array().unwrap().is_empty() || p["left"].is_array());

    bob.send("hello <b>world</b>").await;
    for c in [&mut alice, &mut bob] {
        let m = c.recv_type("message").await;
        assert_eq!(m["room"], "general");
        assert_eq!(m["user"], "bob");
        assert_eq!(m["text"], "hello <b>world</b>");
        assert_eq!(m["seq"], 1);
        let ts = m["ts"].as_u64().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(ts <= now && now - ts < 10_000, "ts {ts} now {now}");
    }

    let bob_id = p["joined_ids"][p["joined"]
        .as_array()
        .unwrap()
        .iter()
        .position(|n| n == "bob")
        .unwrap()]
    .clone();
    assert!(bob_id.is_u64(), "{p}");

    drop(bob);
    let p = alice.recv_type("presence").await;
    assert_eq!(p["members"], 1);
    assert_eq!(p["left"], json!(["bob"]));
    assert_eq!(p["left_ids"], json!([bob_id]), "{p}");
    assert_eq!(p["joined_ids"], json!([]), "{p}");
}

#[tokio::test]
async fn rooms_are_isolated_and_seq_is_gapless_per_room() {
    let server = TestServer::start().await;
    let (mut a1, _) = Client::join(&server.ws_url("/ws/a?user=a1")).await;
    let (mut a2, _) = Client::join(&server.ws_url("/ws/a?user=a2")).await;
    let (mut b1, _) = Client::join(&server.ws_url("/ws?room=b&username=b1")).await;

    for i in 0..20 {
        a1.send_json(&json!({"type": "message", "text": format!("a-{i}")}))
            .await;
        b1.send_json(&json!({"text": format!("b-{i}")})).await;
    }
    for (client, room) in [(&mut a2, "a"), (&mut a1, "a"), (&mut b1, "b")] {
        for i in 0..20u64 {
            let m = client.recv_type("message").await;
            assert_eq!(m["room"], room);
            assert_eq!(m["seq"], i + 1, "gapless, in order");
            assert_eq!(m["text"], format!("{room}-{i}"));
        }
    }
    b1.expect_silence(Duration::from_millis(300)).await;
    a2.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn echo_false_skips_only_the_sender() {
    let server = TestServer::start().await;
    let (mut a, _) = Client::join(&server.ws_url("/ws/r?user=a")).await;
    let (mut b, _) = Client::join(&server.ws_url("/ws/r?user=b")).await;
    a.send_json(&json!({"text": "quiet", "echo": false})).await;
    a.send_json(&json!({"text": "loud"})).await;
    assert_eq!(b.recv_type("message").await["text"], "quiet");
    assert_eq!(b.recv_type("message").await["text"], "loud");
    let m = a.recv_type("message").await;
    assert_eq!(m["text"], "loud");
    assert_eq!(m["seq"], 2, "the skipped message still took seq 1");
}

#[tokio::test]
async fn one_socket_joins_switches_and_leaves_rooms() {
    let server = TestServer::start().await;
    let (mut multi, _) = Client::join(&server.ws_url("/ws/one?user=m")).await;
    let (mut one, _) = Client::join(&server.ws_url("/ws/one?user=o")).await;
    let (mut two, _) = Client::join(&server.ws_url("/ws/two?user=t")).await;

    multi
        .send_json(&json!({"type": "join", "room": "two"}))
        .await;
    let w = multi.recv_type("welcome").await;
    assert_eq!(
        (w["room"].as_str(), w["members"].as_u64()),
        (Some("two"), Some(2))
    );

    // In two rooms a message must name its room.
    multi.send("which room?").await;
    let e = multi.recv_type("error").await;
    assert_eq!(e["code"], "room_required");

    multi
        .send_json(&json!({"type": "message", "room": "two", "text": "to two"}))
        .await;
    multi
        .send_json(&json!({"type": "message", "room": "one", "text": "to one"}))
        .await;
    assert_eq!(two.recv_type("message").await["text"], "to two");
    assert_eq!(one.recv_type("message").await["text"], "to one");
    let mut got = vec![];
    for _ in 0..2 {
        let m = multi.recv_type("message").await;
        got.push((
            m["room"].as_str().unwrap().to_owned(),
            m["text"].as_str().unwrap().to_owned(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("one".into(), "to one".into()),
            ("two".into(), "to two".into())
        ]
    );

    // Switch: leave `one`; messages there no longer arrive, and plain text goes to `two`.
    multi
        .send_json(&json!({"type": "leave", "room": "one"}))
        .await;
    assert_eq!(multi.recv_type("left").await["room"], "one");
    one.send("anyone?").await;
    assert_eq!(one.recv_type("message").await["text"], "anyone?");
    multi.send("now plain text works again").await;
    let m = multi.recv_type("message").await;
    assert_eq!(
        (m["room"].as_str(), m["text"].as_str()),
        (Some("two"), Some("now plain text works again"))
    );
    assert_eq!(two.recv_type("message").await["room"], "two");
    multi.expect_silence(Duration::from_millis(300)).await;

    // Leave the last room: the socket stays open and can join again.
    multi
        .send_json(&json!({"type": "leave", "room": "two"}))
        .await;
    multi.recv_type("left").await;
    multi.send("nobody hears this").await;
    assert_eq!(multi.recv_type("error").await["code"], "not_joined");
    multi
        .send_json(&json!({"type": "join", "room": "one"}))
        .await;
    assert_eq!(multi.recv_type("welcome").await["seq"], 2);
    multi.send_json(&json!({"type": "ping"})).await;
    assert_eq!(multi.recv_type("pong").await, json!({"type": "pong"}));
}

#[tokio::test]
async fn bad_client_frames_get_error_frames_and_the_socket_stays_open() {
    let server = TestServer::with(|c| c.max_rooms_per_connection = 2).await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r?user=u")).await;
    let cases = [
        (json!(null), "{not json", "malformed_json"),
        (json!(null), r#"{"type":"dance"}"#, "unknown_type"),
        (json!(null), r#"{"type":"join"}"#, "bad_message"),
        (json!(null), r#"{"text":42}"#, "bad_message"),
        (
            json!(null),
            r#"{"type":"join","room":"bad room"}"#,
            "bad_room",
        ),
        (
            json!(null),
            r#"{"type":"join","room":"r"}"#,
            "already_joined",
        ),
        (
            json!(null),
            r#"{"type":"leave","room":"elsewhere"}"#,
            "not_joined",
        ),
        (
            json!(null),
            r#"{"type":"message","room":"elsewhere","text":"x"}"#,
            "not_joined",
        ),
    ];
    for (_, frame, code) in cases {
        c.send(frame).await;
        let e = c.recv_type("error").await;
        assert_eq!(e["code"], code, "for {frame}: {e}");
        assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    c.send_json(&json!({"type": "join", "room": "s"})).await;
    c.recv_type("welcome").await;
    c.send_json(&json!({"type": "join", "room": "t"})).await;
    assert_eq!(c.recv_type("error").await["code"], "too_many_rooms");
    // Still open and working.
    c.send_json(&json!({"type": "message", "room": "r", "text": "still here"}))
        .await;
    assert_eq!(c.recv_type("message").await["text"], "still here");
}

#[tokio::test]
async fn binary_frames_close_1003() {
    let server = TestServer::start().await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        c.expect_close().await,
        (1003, "binary frames are not supported".into())
    );
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let server = TestServer::start().await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    let frame = Frame::message(vec![0xffu8, 0xfe, b'a'], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(c.expect_close().await.0, 1007);

    // Split across fragments, the invalid sequence is only visible once reassembled.
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    c.ws.send(Message::Frame(Frame::message(
        vec![b'o', 0xc3],
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    c.ws.send(Message::Frame(Frame::message(
        vec![0x28u8],
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(c.expect_close().await.0, 1007);
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = TestServer::start().await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    // "héllo" with the two bytes of é in different fragments.
    let bytes = "héllo".as_bytes().to_vec();
    c.ws.send(Message::Frame(Frame::message(
        bytes[..2].to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    c.ws.send(Message::Frame(Frame::message(
        bytes[2..].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(c.recv_type("message").await["text"], "héllo");
}

#[tokio::test]
async fn oversized_messages_close_1009() {
    let server = TestServer::with(|c| c.max_message_bytes = 1024).await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    c.send(&"x".repeat(1024)).await;
    assert_eq!(
        c.recv_type("message").await["text"].as_str().unwrap().len(),
        1024,
        "the limit itself is allowed"
    );
    c.send(&"x".repeat(1025)).await;
    assert_eq!(c.expect_close().await, (1009, "message too big".into()));

    // The limit covers all fragments of a message together.
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    c.ws.send(Message::Frame(Frame::message(
        vec![b'a'; 600],
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    c.ws.send(Message::Frame(Frame::message(
        vec![b'a'; 600],
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(c.expect_close().await.0, 1009);
}

#[tokio::test]
async fn bad_upgrade_requests_are_refused_before_the_upgrade() {
    let server = TestServer::with(|c| c.max_connections = 2).await;
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let long_room = format!("/ws/{}", "a".repeat(65));
    let long_user = format!("/ws/r?user={}", "u".repeat(33));
    let cases: Vec<(&str, u16, &str)> = vec![
        ("/ws/bad%20room", 400, "bad_room"),
        ("/ws/a%2Fb", 400, "bad_room"),
        (&long_room, 400, "bad_room"),
        ("/ws?room=", 400, "bad_room"),
        ("/ws/r?user=", 400, "bad_user"),
        (&long_user, 400, "bad_user"),
        ("/ws/r?user=a%0Ab", 400, "bad_user"),
        ("/ws/%ff", 400, "bad_room"),
    ];
    for (path, status, code) in cases {
        let r = http_with(server.addr, "GET", path, &upgrade, None)
            .await
            .unwrap();
        assert_eq!(r.status, status, "{path}");
        assert_eq!(r.headers["content-type"], "application/json", "{path}");
        assert_eq!(r.json()["error"], code, "{path}");
    }
    // Not an upgrade at all.
    let r = http(server.addr, "GET", "/ws/r", None).await.unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("bad_request"))
    );
    // Wrong version.
    let mut v12 = upgrade;
    v12[2] = ("sec-websocket-version", "12");
    let r = http_with(server.addr, "GET", "/ws/r", &v12, None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    // Names that need percent-decoding work, and %23 is '#'.
    let (_c, w) = Client::join(&server.ws_url("/ws/%23general?user=Zo%C3%AB")).await;
    assert_eq!(
        (w["room"].as_str(), w["user"].as_str()),
        (Some("#general"), Some("Zoë"))
    );
    let (_d, w) = Client::join(&server.ws_url("/ws/post:42")).await;
    assert!(w["user"].as_str().unwrap().starts_with("anon-"), "{w}");

    // A third socket is over --max-connections 2.
    let r = http_with(server.addr, "GET", "/ws/r", &upgrade, None)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("too_many_connections"))
    );
    assert_eq!(server.stats().await["connections_refused"], 1);
}

#[tokio::test]
async fn http_api_errors_are_json_with_correct_status() {
    let server = TestServer::with(|c| c.max_message_bytes = 100).await;
    let cases = [
        ("GET", "/nope", None, 404, "not_found"),
        ("POST", "/api/stats", None, 405, "method_not_allowed"),
        ("DELETE", "/api/rooms/x", None, 405, "method_not_allowed"),
        (
            "DELETE",
            "/api/rooms/x/messages",
            None,
            405,
            "method_not_allowed",
        ),
        ("GET", "/api/rooms/x/messages", None, 404, "no_such_room"),
        ("GET", "/api/rooms/missing", None, 404, "no_such_room"),
        ("GET", "/api/rooms/bad%20name", None, 400, "bad_room"),
        ("GET", "/api/rooms?limit=0", None, 400, "bad_param"),
        ("GET", "/api/rooms?limit=abc", None, 400, "bad_param"),
        (
            "POST",
            "/api/rooms/missing/messages",
            Some(r#"{"text":"hi"}"#),
            404,
            "no_such_room",
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            Some("{oops"),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            Some(r#"{"user":"x"}"#),
            400,
            "bad_message",
        ),
        (
            "POST",
            "/api/rooms/r/messages",
            Some(r#"{"text":"hi","user":""}"#),
            400,
            "bad_user",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = http(server.addr, method, path, body.map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(
            r.headers["content-type"], "application/json",
            "{method} {path}"
        );
        assert_eq!(r.json()["error"], code, "{method} {path}");
    }
    let r = http(server.addr, "POST", "/api/stats", None).await.unwrap();
    assert_eq!(r.headers["allow"], "GET");
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(200));
    let r = http(server.addr, "POST", "/api/rooms/r/messages", Some(big))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (413, Some("payload_too_large"))
    );

    let (status, v) = server.get("/healthz").await;
    assert_eq!((status, v), (200, json!({"status": "ok"})));
    let page = http(server.addr, "GET", "/", None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(String::from_utf8_lossy(&page.body).contains("roomcast"));
}

#[tokio::test]
async fn rest_publish_reaches_websocket_members() {
    let server = TestServer::start().await;
    let (mut a, _) = Client::join(&server.ws_url("/ws/news?user=a")).await;
    let (mut b, _) = Client::join(&server.ws_url("/ws/news?user=b")).await;
    let (status, v) = server
        .post(
            "/api/rooms/news/messages",
            r#"{"text":"from the backend","user":"bot"}"#,
        )
        .await;
    assert_eq!((status, v), (202, json!({"room": "news", "seq": 1})));
    let (status, v) = server
        .post("/api/rooms/news/messages", r#"{"text":"anonymous"}"#)
        .await;
    assert_eq!((status, v["seq"].as_u64()), (202, Some(2)));
    for c in [&mut a, &mut b] {
        let m = c.recv_type("message").await;
        assert_eq!(
            (m["user"].as_str(), m["text"].as_str(), m["seq"].as_u64()),
            (Some("bot"), Some("from the backend"), Some(1))
        );
        let m = c.recv_type("message").await;
        assert_eq!(
            (m["user"].as_str(), m["seq"].as_u64()),
            (Some("api"), Some(2))
        );
    }
}

#[tokio::test]
async fn room_info_counts_follow_joins_and_leaves() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(
            Client::join(&server.ws_url(&format!("/ws/count?user=u{i}")))
                .await
                .0,
        );
    }
    let (_other, _) = Client::join(&server.ws_url("/ws/small?user=s")).await;
    let (status, info) = server.get("/api/rooms/count").await;
    assert_eq!(status, 200);
    assert_eq!(info["room"], "count");
    assert_eq!(info["members"], 5);
    let users: Vec<&str> = info["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["u0", "u1", "u2", "u3", "u4"]);
    assert_eq!(info["next_users_after"], serde_json::Value::Null);
    for key in [
        "published",
        "evicted",
        "last_seq",
        "created_at",
        "messages_per_sec",
    ] {
        assert!(info[key].is_number(), "{key} in {info}");
    }
    assert!(info.get("p99_wait_ms").is_some());

    // Paging.
    let (_, page1) = server.get("/api/rooms/count?users_limit=2").await;
    assert_eq!(page1["users"].as_array().unwrap().len(), 2);
    let after = page1["next_users_after"].as_u64().unwrap();
    let (_, page2) = server
        .get(&format!(
            "/api/rooms/count?users_limit=2&users_after={after}"
        ))
        .await;
    assert_eq!(page2["users"][0]["user"], "u2");

    let (_, list) = server.get("/api/rooms").await;
    assert_eq!(list["total"], 2);
    assert_eq!(
        list["rooms"][0],
        json!({"room": "count", "members": 5, "local_members": 5, "password_protected": false}),
        "largest first"
    );
    assert_eq!(
        list["rooms"][1],
        json!({"room": "small", "members": 1, "local_members": 1, "password_protected": false})
    );
    let (_, list) = server.get("/api/rooms?limit=1").await;
    assert_eq!(list["rooms"].as_array().unwrap().len(), 1);

    clients.truncate(2);
    server
        .wait_for("/api/rooms/count", "3 leaves", |s, v| {
            s == 200 && v["members"] == 2
        })
        .await;
    clients.clear();
    server
        .wait_for("/api/rooms/count", "room removal", |s, _| s == 404)
        .await;
    // The totals are at most a second old (see `Bus::counts`): wait for them.
    server
        .wait_for("/api/stats", "one room, one connection", |_, v| {
            v["rooms"] == 1 && v["connections"] == 1
        })
        .await;
}

#[tokio::test]
async fn prometheus_metrics_are_exposed() {
    let server = TestServer::start().await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/m")).await;
    c.send("x").await;
    c.recv_type("message").await;
    // The write is counted once it completed, which can be just after the client read it.
    // The join's presence frame is a room frame too: wait until both are counted.
    server
        .wait_for("/api/stats", "frames_out", |_, v| v["frames_out"] == 2)
        .await;
    let r = http(server.addr, "GET", "/metrics", None).await.unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for line in [
        "roomcast_connections 1",
        "roomcast_rooms 1",
        "roomcast_published_total 1",
        "roomcast_frames_out_total 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
    assert!(text.contains("# EOF"));
}

#[tokio::test]
async fn stats_report_process_cpu_seconds() {
    let server = TestServer::start().await;
    let first = server.stats().await["cpu_seconds"]
        .as_f64()
        .expect("cpu_seconds is a number");
    assert!(first > 0.0, "a started server has used some CPU: {first}");
    let (mut c, _) = Client::join(&server.ws_url("/ws/cpu")).await;
    for i in 0..5 {
        c.send(&format!("m{i}")).await;
    }
    for _ in 0..5 {
        c.recv_type("message").await;
    }
    let second = server.stats().await["cpu_seconds"].as_f64().unwrap();
    assert!(
        second >= first,
        "CPU time never goes back: {first} -> {second}"
    );
    let r = http(server.addr, "GET", "/metrics", None).await.unwrap();
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("roomcast_cpu_seconds ")),
        "missing roomcast_cpu_seconds in\n{text}"
    );
}

#[tokio::test]
async fn echo_endpoint_exists_only_with_the_flag_and_echoes_exactly() {
    let plain = TestServer::start().await;
    let r = http(plain.addr, "GET", "/echo", None).await.unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("not_found"))
    );

    let server = TestServer::with(|c| c.echo = true).await;
    let mut c = Client::connect(&server.ws_url("/echo")).await;
    c.ws.send(Message::text("{not even json")).await.unwrap();
    c.ws.send(Message::binary(vec![0u8, 255, 7])).await.unwrap();
    use futures_util::StreamExt;
    let first = c.ws.next().await.unwrap().unwrap();
    assert_eq!(first, Message::text("{not even json"));
    let second = c.ws.next().await.unwrap().unwrap();
    assert_eq!(second, Message::binary(vec![0u8, 255, 7]));
    assert_eq!(
        server.stats().await["rooms"],
        0,
        "echo sockets join no room"
    );
}

/// Reads a 1012 close's reason as docs/PROTOCOL.md describes it: its `retry_after_ms`.
fn retry_after_of(reason: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(reason)
        .unwrap_or_else(|e| panic!("close reason {reason:?} is not JSON: {e}"));
    v["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retry_after_ms in {reason:?}"))
}

/// Connects `n` sockets spread over four rooms; each returns (code, reason, time since `t0`)
/// once the server closes it.
async fn sockets_closing(
    node: &Node,
    n: usize,
) -> (
    tokio::sync::oneshot::Sender<tokio::time::Instant>,
    Vec<tokio::task::JoinHandle<(u16, String, Duration)>>,
) {
    support::raise_nofile();
    let (t0_tx, t0_rx) = tokio::sync::oneshot::channel::<tokio::time::Instant>();
    let t0 = futures_util::FutureExt::shared(async move { t0_rx.await.unwrap() });
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = Client::connect(&node.ws(&format!("/ws/drain{}?user=u{i}", i % 4))).await;
        c.recv_type("welcome").await;
        let t0 = t0.clone();
        tasks.push(tokio::spawn(async move {
            let (code, reason) = c.expect_close().await;
            let at = tokio::time::Instant::now();
            (code, reason, at.saturating_duration_since(t0.await))
        }));
    }
    (t0_tx, tasks)
}

#[tokio::test]
async fn sigterm_drains_sockets_at_the_drain_rate_with_1012_and_a_reconnect_delay() {
    let mut node = Node::standalone(&["--drain-rate", "100/s", "--shutdown-timeout", "10s"]).await;
    // An upgrade whose request is half in when the signal comes (a connection with nothing in
    // yet is closed at once): it finds the server shutting down.
    let mut late = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!("GET /ws/drain0 HTTP/1.1\r\nHost: {}\r\n", node.addr);
    late.write_all(head.as_bytes()).await.unwrap();
    let (t0, tasks) = sockets_closing(&node, 200).await;
    node.wait_for("/api/stats", "200 sockets", STEP, |_, v| {
        v["connections"] == 200
    })
    .await;

    node.sigterm();
    let _ = t0.send(tokio::time::Instant::now());
    // The listener goes at once.
    eventually(
        "the listener to close",
        Duration::from_millis(10),
        || async {
            tokio::net::TcpStream::connect(node.addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let rest = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    late.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(STEP, late.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""error":"shutting_down""#), "{answer}");

    let mut closes = Vec::new();
    for t in tasks {
        closes.push(t.await.unwrap());
    }
    let mut delays = std::collections::HashSet::new();
    for (code, reason, _) in &closes {
        assert_eq!(*code, 1012, "Service Restart: {reason}");
        let ms = retry_after_of(reason);
        // 200 sockets at 100/s: a 2 s drain, and the delays are drawn from a 2 s window.
        assert!(ms < 2000, "retry_after_ms {ms} past the drain's window");
        delays.insert(ms);
    }
    assert!(delays.len() > 100, "the delays are spread: {delays:?}");
    let mut times: Vec<Duration> = closes.iter().map(|(_, _, at)| *at).collect();
    times.sort();
    let spread = times[199] - times[0];
    assert!(
        spread >= Duration::from_millis(1500),
        "200 closes at 100/s take about 2 s, not {spread:?}"
    );
    let early = times
        .iter()
        .filter(|t| **t < times[0] + Duration::from_millis(500))
        .count();
    assert!(
        early <= 80,
        "{early} closes in the first half second (100/s)"
    );
    let status = node.wait_exit(STEP).await;
    assert!(status.success(), "exit status {status}");
    assert!(!node.log().contains("closed at once"), "{}", node.log());
}

#[tokio::test]
async fn sockets_still_waiting_at_the_drain_deadline_are_closed_at_once_and_counted() {
    // 100 sockets at 20/s need 5 s; the turns stop at 1.5 s (2 s less the close grace).
    let mut node = Node::standalone(&["--drain-rate", "20/s", "--shutdown-timeout", "2s"]).await;
    let (t0, tasks) = sockets_closing(&node, 100).await;
    node.wait_for("/api/stats", "100 sockets", STEP, |_, v| {
        v["connections"] == 100
    })
    .await;
    node.sigterm();
    let _ = t0.send(tokio::time::Instant::now());
    let mut times = Vec::new();
    for t in tasks {
        let (code, reason, at) = t.await.unwrap();
        assert_eq!(code, 1012, "{reason}");
        retry_after_of(&reason);
        times.push(at);
    }
    times.sort();
    assert!(
        times[99] < Duration::from_secs(3),
        "closed by {:?}",
        times[99]
    );
    let status = node.wait_exit(STEP).await;
    assert!(status.success(), "exit status {status}");
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.contains("were still waiting for their turn at the drain deadline"))
        .unwrap_or_else(|| panic!("no late-close line in\n{log}"));
    let late: u64 = line
        .split("late=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    assert!((40..=90).contains(&late), "{late} late closes: {line}");
}
