//! permessage-deflate (RFC 7692) from the outside: what the 101 agrees to, which frames come
//! compressed, what compressed input the server refuses and how, and an independent client
//! (Python `websockets`) that decompresses every message itself.
//!
//! The Python check needs `python3` with `websockets` (`#[ignore = "needs python3 websockets"]`);
//! scripts/test.sh installs it into `target/py-websockets` and runs it.

mod support;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::deflate::{deflate, DeflateClient, Incoming};
use support::nodes::Node;
use support::{Client, TestServer};

const OFFER: Option<&str> = Some("permessage-deflate; client_max_window_bits");
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn long_text(tag: &str) -> String {
    format!(
        "{tag}: {}",
        "all work and no play makes jack a dull boy ".repeat(10)
    )
}

/// The close a raw client gets after sending `frames` (first byte, payload) on a socket that
/// offered `offer`.
async fn close_after(server: &TestServer, offer: Option<&str>, frames: &[(u8, &[u8])]) -> u16 {
    let mut c = DeflateClient::connect(server.addr, "/ws/r?user=u", offer)
        .await
        .unwrap();
    c.recv_type("welcome").await.unwrap();
    for (b0, payload) in frames {
        c.send_frame(*b0, payload).await.unwrap();
    }
    c.expect_close().await.unwrap().0
}

#[tokio::test]
async fn rsv1_where_it_may_not_be_is_a_protocol_error() {
    let server = TestServer::start().await;
    let zipped = deflate(b"hello");
    // Compressed without having agreed to it.
    assert_eq!(close_after(&server, None, &[(0xC1, &zipped)]).await, 1002);
    // RSV1 on a continuation frame, and on control frames.
    let cases: [&[(u8, &[u8])]; 4] = [
        &[(0x41, &zipped), (0xC0, b"")],
        &[(0xC9, b"")],
        &[(0xCA, b"")],
        // RSV2 and RSV3 belong to no extension here.
        &[(0xA1, b"hi")],
    ];
    for frames in cases {
        assert_eq!(
            close_after(&server, OFFER, frames).await,
            1002,
            "{frames:02x?}"
        );
    }
    assert_eq!(close_after(&server, OFFER, &[(0x91, b"hi")]).await, 1002);
}

#[tokio::test]
async fn corrupt_compressed_data_closes_1007_and_is_counted() {
    let server = TestServer::start().await;
    // Deflate block type 3 is reserved: no valid stream starts with it.
    assert_eq!(
        close_after(&server, OFFER, &[(0xC1, &[0xFF, 0xFF, 0xFF])]).await,
        1007
    );
    assert_eq!(server.stats().await["inflate_refused"], 1);
}

#[tokio::test]
async fn a_deflate_bomb_closes_1009_without_costing_its_size() {
    // A process of its own, so that its resident memory is the server's alone.
    let node = Node::standalone(&["--max-message-bytes", "65536"]).await;
    let bomb = deflate(&vec![0u8; 10 << 20]);
    assert!(
        bomb.len() < 16 << 10,
        "10 MiB of zeros in {} bytes",
        bomb.len()
    );
    // Warm up: the allocator's arenas and the worker threads' codec state, with compressed
    // messages that inflate to just under the limit.
    for _ in 0..4 {
        let mut c = DeflateClient::connect(node.addr, "/ws/warm?user=u", OFFER)
            .await
            .unwrap();
        c.recv_type("welcome").await.unwrap();
        c.send_compressed(&"y".repeat(60_000)).await.unwrap();
        c.recv_type("message").await.unwrap();
    }
    let before = node.peak_rss();
    for _ in 0..3 {
        let mut c = DeflateClient::connect(node.addr, "/ws/r?user=u", OFFER)
            .await
            .unwrap();
        c.recv_type("welcome").await.unwrap();
        c.send_frame(0xC1, &bomb).await.unwrap();
        assert_eq!(c.expect_close().await.unwrap().0, 1009);
    }
    // Fragmented: the compressed bytes arrive in pieces, the first with RSV1.
    let mut c = DeflateClient::connect(node.addr, "/ws/r?user=u", OFFER)
        .await
        .unwrap();
    c.recv_type("welcome").await.unwrap();
    let (first, rest) = bomb.split_at(bomb.len() / 2);
    c.send_frame(0x41, first).await.unwrap();
    c.send_frame(0x80, rest).await.unwrap();
    assert_eq!(c.expect_close().await.unwrap().0, 1009);
    let (_, stats) = node.get("/api/stats").await;
    assert_eq!(stats["inflate_refused"], 4, "{stats}");
    // Peak, not current: memory taken and given back during a bomb shows here too. Inflating
    // one bomb whole would take 10 MiB.
    let grew = node.peak_rss().saturating_sub(before);
    assert!(
        grew < 4 << 20,
        "peak RSS grew by {grew} bytes for 40 MiB of bombs"
    );
}

#[tokio::test]
async fn a_compressed_message_is_inflated_and_published() {
    let server = TestServer::with(|c| c.max_message_bytes = 4096).await;
    let (mut plain, _) = Client::join(&server.ws_url("/ws/r?user=plain")).await;
    let mut z = DeflateClient::connect(server.addr, "/ws/r?user=z", OFFER)
        .await
        .unwrap();
    assert_eq!(z.extensions.as_deref(), Some(AGREED));
    z.recv_type("welcome").await.unwrap();
    let text = long_text("in");
    z.send_compressed(&json!({"type": "message", "text": text}).to_string())
        .await
        .unwrap();
    assert_eq!(plain.recv_type("message").await["text"], text.as_str());
    let (echo, compressed) = z.recv_type("message").await.unwrap();
    assert_eq!(echo["text"], text.as_str());
    assert!(compressed);
    // A compressed message just over the limit once inflated: 1009, though it is small on the
    // wire.
    let big = "x".repeat(5000);
    z.send_compressed(&big).await.unwrap();
    assert_eq!(z.expect_close().await.unwrap().0, 1009);
    let stats = server.stats().await;
    assert_eq!(stats["messages_inflated"], 1, "{stats}");
    assert_eq!(stats["inflate_refused"], 1, "{stats}");
}

#[tokio::test]
async fn offers_the_server_declines_leave_the_socket_plain() {
    let server = TestServer::start().await;
    for offer in [
        None,
        Some("permessage-deflate; unknown_param"),
        Some("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
        Some("permessage-deflate; server_max_window_bits"),
        Some("permessage-deflate; server_max_window_bits=16"),
        Some("x-webkit-deflate-frame"),
    ] {
        let mut c = DeflateClient::connect(server.addr, "/ws/r?user=u", offer)
            .await
            .unwrap();
        assert_eq!(c.extensions, None, "{offer:?}");
        c.recv_type("welcome").await.unwrap();
        let (_, compressed) = publish_and_receive(&server, &mut c, &long_text("x")).await;
        assert!(!compressed, "{offer:?}");
    }
    // The first acceptable offer wins; its window is repeated in the answer.
    let c = DeflateClient::connect(
        server.addr,
        "/ws/r?user=u",
        Some("permessage-deflate; bogus, permessage-deflate; server_max_window_bits=12"),
    )
    .await
    .unwrap();
    assert_eq!(
        c.extensions.unwrap(),
        format!("{AGREED}; server_max_window_bits=12")
    );
    // --compression off: never agreed.
    let off = TestServer::with(|c| c.compression = roomcast::config::Switch::Off).await;
    let c = DeflateClient::connect(off.addr, "/ws/r?user=u", OFFER)
        .await
        .unwrap();
    assert_eq!(c.extensions, None);
}

/// Publishes `text` over REST into room `r` and returns what `c` receives of it.
async fn publish_and_receive(
    server: &TestServer,
    c: &mut DeflateClient,
    text: &str,
) -> (serde_json::Value, bool) {
    let (status, _) = server
        .post("/api/rooms/r/messages", &json!({"text": text}).to_string())
        .await;
    assert_eq!(status, 202);
    let (m, compressed) = c.recv_type("message").await.unwrap();
    assert_eq!(m["text"], text);
    (m, compressed)
}

#[tokio::test]
async fn short_messages_small_windows_and_rooms_with_compression_off_go_plain() {
    let dir = tempfile::tempdir().unwrap();
    let rooms = dir.path().join("rooms.toml");
    std::fs::File::create(&rooms)
        .unwrap()
        .write_all(b"[rooms.\"raw*\"]\ncompression = false\n")
        .unwrap();
    let server = TestServer::with(|c| c.rooms_config = Some(rooms)).await;
    let mut c = DeflateClient::connect(server.addr, "/ws/r?user=u", OFFER)
        .await
        .unwrap();
    c.recv_type("welcome").await.unwrap();
    // Under --compression-min-bytes (256 by default, the whole JSON payload): plain.
    assert!(!publish_and_receive(&server, &mut c, "short").await.1);
    assert!(
        publish_and_receive(&server, &mut c, &long_text("long"))
            .await
            .1
    );

    // A client that asked for a 1 KiB window gets compressed only what fits in it.
    let mut small = DeflateClient::connect(
        server.addr,
        "/ws/r?user=w",
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await
    .unwrap();
    small.recv_type("welcome").await.unwrap();
    assert!(
        publish_and_receive(&server, &mut small, &long_text("fits"))
            .await
            .1
    );
    let wide = long_text("wide").repeat(3);
    assert!(!publish_and_receive(&server, &mut small, &wide).await.1);

    let mut raw = DeflateClient::connect(server.addr, "/ws/raw1?user=u", OFFER)
        .await
        .unwrap();
    assert_eq!(raw.extensions.as_deref(), Some(AGREED));
    raw.recv_type("welcome").await.unwrap();
    let (status, _) = server
        .post(
            "/api/rooms/raw1/messages",
            &json!({"text": long_text("raw")}).to_string(),
        )
        .await;
    assert_eq!(status, 202);
    let (m, compressed) = raw.recv_type("message").await.unwrap();
    assert!(m["text"].as_str().unwrap().starts_with("raw: "));
    assert!(!compressed, "the rooms file turned compression off here");
}

#[tokio::test]
async fn echo_replies_are_compressed_when_agreed() {
    let server = TestServer::with(|c| c.echo = true).await;
    let mut c = DeflateClient::connect(server.addr, "/echo", OFFER)
        .await
        .unwrap();
    let text = long_text("echo");
    c.send_compressed(&text).await.unwrap();
    match c.recv().await.unwrap() {
        Incoming::Message {
            payload,
            compressed,
            wire,
            ..
        } => {
            assert_eq!(payload, text.as_bytes());
            assert!(compressed && wire < text.len() / 2, "{wire} bytes");
        }
        other => panic!("{other:?}"),
    }
}

/// The Python interpreter with `websockets`: `$PY_WEBSOCKETS`, else the venv scripts/test.sh
/// makes in `target/py-websockets`.
fn python() -> PathBuf {
    std::env::var_os("PY_WEBSOCKETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py-websockets/bin/python")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 websockets"]
async fn an_independent_client_inflates_every_message_and_each_is_compressed_once() {
    let python = python();
    let ok = Command::new(&python)
        .args(["-c", "import websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} with websockets is missing (scripts/test.sh installs it)",
        python.display()
    );
    let server = TestServer::start().await;
    // Two plain members beside the Python clients.
    let (mut plain1, _) = Client::join(&server.ws_url("/ws/mixed?user=plain1")).await;
    let (mut plain2, _) = Client::join(&server.ws_url("/ws/mixed?user=plain2")).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compression/client.py");
    let url = server.ws_url("/ws/mixed");
    let messages = 40usize;
    let clients = 3usize;
    let child = Command::new(&python)
        .arg(script)
        .arg(&url)
        .arg(clients.to_string())
        .arg(messages.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The script says when its clients are in, then expects `messages` messages each.
    server
        .wait_for("/api/rooms/mixed", "every member in", |s, v| {
            s == 200 && v["members"] == 2 + clients
        })
        .await;
    let start = server.stats().await["frames_compressed"].as_u64().unwrap();
    let texts: Vec<String> = (0..messages)
        .map(|i| format!("{i} {}", long_text("py")))
        .collect();
    for text in &texts {
        plain1
            .send_json(&json!({"type": "message", "text": text}))
            .await;
    }
    for text in &texts {
        assert_eq!(plain2.recv_type("message").await["text"], text.as_str());
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the Python clients finish")
    .unwrap()
    .unwrap();
    let (status, stdout, stderr) = (
        out.status,
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(status.success(), "python failed:\n{stdout}\n{stderr}");
    // Every Python client saw every text, in order, on a socket that agreed to deflate.
    let expected = serde_json::to_string(&texts).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), clients, "{stdout}\n{stderr}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["extensions"], "permessage-deflate", "{line}");
        assert_eq!(v["texts"].to_string(), expected);
    }
    let compressed = server.stats().await["frames_compressed"].as_u64().unwrap() - start;
    assert_eq!(
        compressed, messages as u64,
        "once per message, not per compressing member ({clients} of them)"
    );
}
