//! Deadlines a peer cannot stretch: a socket in no room (`--idle-timeout`), a frame or message
//! that trickles in (`--message-timeout`), a REST body that trickles in (`--body-timeout`), an
//! HTTP head that never ends (`--handshake-timeout`), and control frames and fragments that
//! flood (`--rate-limit`). Each test uses small values through the flags and a raw socket where
//! the client must misbehave in ways a WebSocket library will not.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use roomcast::config::rate::RateLimitArg;
use serde_json::{json, Value};
use support::{Client, TestServer, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket client that writes whatever bytes it is told to.
struct RawWs {
    stream: TcpStream,
    /// Bytes read past the last frame taken.
    buf: Vec<u8>,
}

impl RawWs {
    async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(STEP, stream.read(&mut chunk))
                .await
                .expect("no upgrade answer in time")
                .unwrap();
            assert!(n > 0, "closed before the upgrade answer");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        buf.drain(..head_end);
        RawWs { stream, buf }
    }

    /// A masked frame: `b0` is FIN, RSV and opcode.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        support::masked_frame(b0, payload, [0x37, 0xfa, 0x21, 0x3d])
    }

    /// Writes; `false` once the server has closed the socket.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// The next server frame: `(opcode, payload)`, or `None` at EOF.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, head) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    127 if self.buf.len() >= 10 => {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(n) as usize, 10)
                    }
                    n if n < 126 => (usize::from(n), 2),
                    _ => (usize::MAX, 0),
                };
                if head > 0 && self.buf.len() >= head + len {
                    let opcode = self.buf[0] & 0x0F;
                    let payload = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(STEP, self.stream.read(&mut chunk))
                .await
                .expect("nothing from the server in time")
            {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the server's close frame; answers its code and reason. Text frames before
    /// it are collected as JSON.
    async fn expect_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut texts = Vec::new();
        loop {
            match self.next_frame().await {
                Some((0x8, p)) => {
                    assert!(p.len() >= 2, "close frame without a code");
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    return (code, String::from_utf8_lossy(&p[2..]).into_owned(), texts);
                }
                Some((0x1, p)) => texts.push(serde_json::from_slice(&p).unwrap()),
                Some(_) => {}
                None => panic!("socket ended without a close frame; texts: {texts:?}"),
            }
        }
    }

    /// The next text frame as JSON (control frames skipped).
    async fn next_text(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Some((0x1, p)) => return serde_json::from_slice(&p).unwrap(),
                Some((0x8, p)) => panic!("closed: {p:?}"),
                Some(_) => {}
                None => panic!("socket ended"),
            }
        }
    }
}

async fn stats(server: &TestServer) -> Value {
    server.stats().await
}

// ---------------------------------------------------------------------------------------------
// --idle-timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_socket_in_no_room_is_closed_at_the_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(800);
    let server = TestServer::with(|c| c.idle_timeout = IDLE).await;
    // In a room from the upgrade on, then leaves it: the clock starts at the leave.
    let (mut roomed, _) = Client::join(&server.ws_url("/ws/r?user=roomed")).await;
    // In `$lobby` only: that is a room.
    let mut lobby = Client::connect(&server.ws_url("/ws?user=lobby")).await;
    lobby
        .send_json(&json!({"type": "join", "room": "$lobby"}))
        .await;
    assert_eq!(lobby.recv_type("welcome").await["room"], "$lobby");
    // In no room at all.
    let started = Instant::now();
    let mut bare = Client::connect(&server.ws_url("/ws?user=bare")).await;
    let (code, reason) = bare.expect_close().await;
    assert_eq!((code, reason.as_str()), (4002, "idle timeout"));
    assert!(
        started.elapsed() >= IDLE,
        "closed early: {:?}",
        started.elapsed()
    );

    // The others outlived it: both still answer.
    roomed.send("still here").await;
    assert_eq!(roomed.recv_type("message").await["text"], "still here");
    lobby.send_json(&json!({"type": "ping"})).await;
    assert_eq!(lobby.recv_type("pong").await["type"], "pong");

    // Leaving the last room starts the clock.
    roomed
        .send_json(&json!({"type": "leave", "room": "r"}))
        .await;
    assert_eq!(roomed.recv_type("left").await["room"], "r");
    let left_at = Instant::now();
    let (code, reason) = roomed.expect_close().await;
    assert_eq!((code, reason.as_str()), (4002, "idle timeout"));
    assert!(left_at.elapsed() >= IDLE - Duration::from_millis(50));

    let s = stats(&server).await;
    assert_eq!(s["idle_closes"], 2, "{s}");
    let metrics = support::http(server.addr, "GET", "/metrics", None)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&metrics.body).contains("roomcast_idle_closes_total 2"));
    lobby.send_json(&json!({"type": "ping"})).await;
    assert_eq!(lobby.recv_type("pong").await["type"], "pong");
}

#[tokio::test]
async fn joining_a_room_stops_the_idle_clock() {
    const IDLE: Duration = Duration::from_millis(600);
    let server = TestServer::with(|c| c.idle_timeout = IDLE).await;
    let mut c = Client::connect(&server.ws_url("/ws?user=late")).await;
    c.send_json(&json!({"type": "join", "room": "r"})).await;
    assert_eq!(c.recv_type("welcome").await["room"], "r");
    // Twice the timeout in the room, then still served.
    c.expect_silence(IDLE * 2).await;
    c.send("hello").await;
    assert_eq!(c.recv_type("message").await["text"], "hello");
    assert_eq!(stats(&server).await["idle_closes"], 0);
}

#[tokio::test]
async fn an_idle_timeout_of_zero_is_off() {
    let server = TestServer::with(|c| c.idle_timeout = Duration::ZERO).await;
    let mut c = Client::connect(&server.ws_url("/ws?user=u")).await;
    c.expect_silence(Duration::from_millis(300)).await;
    c.send_json(&json!({"type": "ping"})).await;
    assert_eq!(c.recv_type("pong").await["type"], "pong");
}

// ---------------------------------------------------------------------------------------------
// --message-timeout
// ---------------------------------------------------------------------------------------------

/// One byte every `every` until the server closes; answers the close.
async fn trickle(ws: &mut RawWs, bytes: &[u8], every: Duration) -> (u16, String, Vec<Value>) {
    for b in bytes {
        if !ws.send(&[*b]).await {
            break;
        }
        tokio::time::sleep(every).await;
        // Stop as soon as the close is in: the rest would only meet a closed socket.
        let mut probe = [0u8; 1];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), ws.stream.peek(&mut probe)).await
        {
            if n > 0 {
                break;
            }
        }
    }
    ws.expect_close().await
}

#[tokio::test]
async fn a_frame_that_trickles_in_is_closed_at_the_message_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let server = TestServer::with(|c| c.message_timeout = TIMEOUT).await;
    // Slowloris inside the socket: a header that declares 64 KiB, then a byte at a time.
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=slow").await;
    let frame = RawWs::frame(0x81, &vec![b'a'; 65_536]);
    assert!(ws.send(&frame[..14]).await, "header and mask");
    let started = Instant::now();
    let (code, reason, _) = trickle(&mut ws, &frame[14..], Duration::from_millis(50)).await;
    assert_eq!((code, reason.as_str()), (1008, "message timeout"));
    let took = started.elapsed();
    assert!(took >= TIMEOUT && took < STEP, "{took:?}");

    // Even a ping may not trickle.
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=slowping").await;
    let ping = RawWs::frame(0x89, &[b'p'; 125]);
    let (code, reason, _) = trickle(&mut ws, &ping, Duration::from_millis(50)).await;
    assert_eq!((code, reason.as_str()), (1008, "message timeout"));

    // Every fragment whole and on time, the message never finished: the message is timed too.
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=slowfrag").await;
    assert!(ws.send(&RawWs::frame(0x01, b"{")).await);
    let started = Instant::now();
    let (code, reason) = loop {
        if !ws.send(&RawWs::frame(0x00, b" ")).await {
            let (code, reason, _) = ws.expect_close().await;
            break (code, reason);
        }
        if let Ok(Some((0x8, p))) =
            tokio::time::timeout(Duration::from_millis(100), ws.next_frame()).await
        {
            break (
                u16::from_be_bytes([p[0], p[1]]),
                String::from_utf8_lossy(&p[2..]).into_owned(),
            );
        }
        assert!(started.elapsed() < STEP, "never closed");
    };
    assert_eq!((code, reason.as_str()), (1008, "message timeout"));
    assert!(started.elapsed() >= TIMEOUT - Duration::from_millis(50));

    assert_eq!(stats(&server).await["message_timeouts"], 3);
    // The room still works for everyone else.
    let (mut c, _) = Client::join(&server.ws_url("/ws/r?user=ok")).await;
    c.send("fine").await;
    assert_eq!(c.recv_type("message").await["text"], "fine");
}

#[tokio::test]
async fn the_message_timeout_is_per_message_not_per_connection() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let server = TestServer::with(|c| {
        c.message_timeout = TIMEOUT;
        c.rate_limit = RateLimitArg(None);
    })
    .await;
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=steady").await;
    // Six messages, each in two writes 60 ms apart, 60 ms between messages, and one split
    // across each pair of messages: the socket always holds part of a frame, for far longer
    // than the timeout, but no frame takes longer than it.
    let mut wire = Vec::new();
    for i in 0..6 {
        wire.extend(RawWs::frame(0x81, format!("m{i}").as_bytes()));
    }
    let started = Instant::now();
    for piece in wire.chunks(5) {
        assert!(ws.send(piece).await);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(started.elapsed() > TIMEOUT * 2);
    for i in 0..6 {
        loop {
            let v = ws.next_text().await;
            if v["type"] == "message" {
                assert_eq!(v["text"], format!("m{i}"));
                break;
            }
        }
    }
    assert_eq!(stats(&server).await["message_timeouts"], 0);
}

// ---------------------------------------------------------------------------------------------
// Control frames and fragments against --rate-limit
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_ping_flood_meets_the_rate_limit_like_a_message_flood() {
    let server = TestServer::with(|c| c.rate_limit = "2/s burst 3".parse().unwrap()).await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r?user=pinger")).await;
    let mut sent = 0;
    for i in 0..50u8 {
        if c.ws.send(Message::Ping(vec![i].into())).await.is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 6, "{sent}");
    let mut refused = 0;
    let (code, reason) = loop {
        match c.try_recv(STEP).await {
            Ok(v) if v["type"] == "error" => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1));
                refused += 1;
            }
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("closed"), "{text}");
                assert!(text.contains("Policy"), "{text}");
                assert!(text.contains("rate limit exceeded"), "{text}");
                break (1008, "rate limit exceeded");
            }
        }
    };
    assert_eq!((code, reason), (1008, "rate limit exceeded"));
    assert_eq!(refused, 3, "BURST refusals, then the close");
    assert!(stats(&server).await["rate_limited"].as_u64().unwrap() >= 4);
}

/// With no rate limit, a ping flood costs the server a bounded number of pongs per read, not
/// one per ping: past the first few of a read, only the last ping is answered (RFC 6455,
/// 5.5.3).
#[tokio::test]
async fn a_ping_flood_is_answered_for_the_last_ping_not_every_ping() {
    let server = TestServer::with(|c| c.rate_limit = RateLimitArg(None)).await;
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=pinger").await;
    let welcome = ws.next_frame().await.expect("welcome");
    assert_eq!(welcome.0, 1);
    const PINGS: u32 = 1000;
    let flood: Vec<u8> = (0..PINGS)
        .flat_map(|i| RawWs::frame(0x89, i.to_string().as_bytes()))
        .collect();
    assert!(ws.send(&flood).await);
    let mut pongs = 0;
    loop {
        let (opcode, payload) = ws.next_frame().await.expect("a pong for the last ping");
        if opcode != 0xA {
            continue;
        }
        pongs += 1;
        if payload == (PINGS - 1).to_string().as_bytes() {
            break;
        }
    }
    // The flood is about 9 KiB: a few reads, at most 17 pongs each.
    assert!(pongs <= 120, "{pongs} pongs for {PINGS} pings");
}

#[tokio::test]
async fn pong_and_continuation_floods_meet_the_rate_limit() {
    let server = TestServer::with(|c| c.rate_limit = "2/s burst 3".parse().unwrap()).await;
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=ponger").await;
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.extend(RawWs::frame(0x8A, b"unsolicited"));
    }
    ws.send(&flood).await;
    let (code, reason, texts) = ws.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded"));
    let errors = texts.iter().filter(|v| v["code"] == "rate_limited").count();
    assert_eq!(errors, 3, "{texts:?}");

    // One message in a thousand tiny fragments is a thousand frames to handle.
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=fragger").await;
    let mut flood = RawWs::frame(0x01, b"a");
    for _ in 0..1000 {
        flood.extend(RawWs::frame(0x00, b"a"));
    }
    flood.extend(RawWs::frame(0x80, b"a"));
    ws.send(&flood).await;
    let (code, reason, texts) = ws.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded"));
    assert!(
        texts.iter().all(|v| v["type"] != "message"),
        "the refused message was not published: {texts:?}"
    );
}

#[tokio::test]
async fn a_fragmented_message_within_the_limit_is_published_whole() {
    let server = TestServer::with(|c| c.rate_limit = "10/s burst 10".parse().unwrap()).await;
    let mut ws = RawWs::connect(server.addr, "/ws/r?user=frag").await;
    let mut wire = RawWs::frame(0x01, b"hel");
    wire.extend(RawWs::frame(0x89, b"in between"));
    wire.extend(RawWs::frame(0x80, b"lo"));
    ws.send(&wire).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        match ws.next_frame().await {
            Some((0xA, p)) => got.push(format!("pong {}", String::from_utf8_lossy(&p))),
            Some((0x1, p)) => {
                let v: Value = serde_json::from_slice(&p).unwrap();
                if v["type"] == "message" {
                    got.push(format!("message {}", v["text"].as_str().unwrap()));
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, ["pong in between", "message hello"]);
}

// ---------------------------------------------------------------------------------------------
// HTTP: --body-timeout and --handshake-timeout
// ---------------------------------------------------------------------------------------------

/// Reads a whole HTTP/1.1 answer (the server closes or says its length); `None` if the socket
/// ended without one.
async fn read_answer(s: &mut TcpStream) -> Option<(u16, Value)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                let status = head.get(9..12)?.parse().ok()?;
                let body = serde_json::from_slice(&buf[i + 4..i + 4 + len]).ok()?;
                return Some((status, body));
            }
        }
        let n = tokio::time::timeout(STEP, s.read(&mut chunk))
            .await
            .expect("no answer in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_rest_body_that_trickles_in_gets_408() {
    const TIMEOUT: Duration = Duration::from_millis(400);
    let server = TestServer::with(|c| c.body_timeout = TIMEOUT).await;
    let (_member, _) = Client::join(&server.ws_url("/ws/r?user=m")).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let body = br#"{"text":"slowly, slowly"}"#;
    let head = format!(
        "POST /api/rooms/r/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..5]).await.unwrap();
    let started = Instant::now();
    let (status, v) = read_answer(&mut s)
        .await
        .expect("an answer, not a dropped socket");
    assert_eq!(
        (status, v["error"].as_str()),
        (408, Some("body_timeout")),
        "{v}"
    );
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(started.elapsed() >= TIMEOUT - Duration::from_millis(50));
    // The socket is not kept for another request: what it still sends is not a request.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection was closed after the 408");
    let s = stats(&server).await;
    assert_eq!(s["body_timeouts"], 1, "{s}");
    assert_eq!(s["published"], 0, "{s}");
}

#[tokio::test]
async fn a_request_head_that_stalls_is_dropped_at_the_handshake_timeout() {
    let server = TestServer::with(|c| c.handshake_timeout = Duration::from_millis(400)).await;
    let half_line = TcpStream::connect(server.addr).await;
    let mut half_line = half_line.unwrap();
    half_line.write_all(b"GET /api/sta").await.unwrap();
    let silent = TcpStream::connect(server.addr).await;
    let mut silent = silent.unwrap();
    // A keep-alive connection that never sends its second request.
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut kept).await.map(|a| a.0), Some(200));
    for (what, s) in [
        ("half a request line", &mut half_line),
        ("nothing at all", &mut silent),
        ("no second request", &mut kept),
    ] {
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(STEP, s.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "{what}: never dropped");
    }
}
