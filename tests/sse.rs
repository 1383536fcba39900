//! Server-Sent Events (`GET /sse/{room}`), over real sockets: a hyper client that reads the
//! stream as it comes, WebSocket members beside it, REST publishing, and, where it matters,
//! two `roomcast` processes on a real `redis-server` as well as one on its own.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::{json, Value};
use support::deployment::Deployment;
use support::nodes::Node;
use support::{Client, STEP};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// An event id's positions with their epochs left out, and the epochs; each position must be
/// `<epoch>.<seq>` with a well-formed epoch.
fn split_id(id: &str) -> Result<(String, Vec<String>)> {
    let mut epochs = Vec::new();
    let mut plain = Vec::new();
    for entry in id.split(',') {
        let (room, pos) = match entry.rsplit_once(':') {
            Some((room, pos)) => (Some(room), pos),
            None => (None, entry),
        };
        let Some((epoch, seq)) = pos.split_once('.') else {
            bail!("position {pos:?} has no epoch");
        };
        if epoch.len() != 12 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("bad epoch in {id:?}");
        }
        epochs.push(epoch.to_owned());
        plain.push(match room {
            Some(room) => format!("{room}:{seq}"),
            None => seq.to_owned(),
        });
    }
    Ok((plain.join(","), epochs))
}

/// One event as `EventSource` would dispatch it, or a comment.
#[derive(Debug, Clone, Default)]
struct Event {
    /// The id with its epochs left out (`3`, `a:1,b:x:1`): the seqs the tests follow.
    id: Option<String>,
    /// The id as sent (`<epoch>.<seq>` per room): what `Last-Event-ID` sends back.
    raw_id: Option<String>,
    /// The epochs the id names, in its order.
    epochs: Vec<String>,
    event: String,
    data: String,
    retry: Option<u64>,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An event stream being read.
struct Stream {
    body: Incoming,
    buf: Vec<u8>,
    /// `: …` comment lines seen so far (heartbeats).
    comments: usize,
    conn: JoinHandle<()>,
}

/// Opens `GET path` with `headers`: the stream, or the refusal's status and JSON body.
async fn open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Stream, (u16, Value)> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .uri(path)
        .header("host", addr.to_string())
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = tokio::time::timeout(STEP, sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("an answer");
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        return Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
    }
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    Ok(Stream {
        body: resp.into_body(),
        buf: Vec::new(),
        comments: 0,
        conn,
    })
}

/// Opens `GET path` with `headers`, which must be refused with `status` and the error code
/// `error` in the JSON body.
async fn refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)], status: u16, error: &str) {
    match open(addr, path, headers).await {
        Ok(_) => panic!("{path}: opened, expected {status} {error}"),
        Err((got, v)) => assert_eq!(
            (got, v["error"].as_str()),
            (status, Some(error)),
            "{path}: {v}"
        ),
    }
}

async fn connect(addr: SocketAddr, path: &str) -> Stream {
    connect_with(addr, path, &[]).await
}

async fn connect_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Stream {
    match open(addr, path, headers).await {
        Ok(s) => s,
        Err((status, v)) => panic!("{path}: refused {status} {v}"),
    }
}

impl Stream {
    /// The next event (comments are counted and skipped); `Ok(None)` when the stream ended.
    async fn try_next(&mut self, within: Duration) -> Result<Option<Event>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block)?;
                let mut ev = Event::default();
                let mut data: Vec<&str> = Vec::new();
                let mut any = false;
                for line in text.lines() {
                    if line.is_empty() {
                        continue;
                    }
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    any = true;
                    match field {
                        "id" => {
                            let (id, epochs) = split_id(value)?;
                            ev.id = Some(id);
                            ev.epochs = epochs;
                            ev.raw_id = Some(value.to_owned());
                        }
                        "event" => ev.event = value.to_owned(),
                        "data" => data.push(value),
                        "retry" => ev.retry = value.parse().ok(),
                        other => bail!("unknown field {other:?}"),
                    }
                }
                if !any {
                    continue;
                }
                ev.data = data.join("\n");
                return Ok(Some(ev));
            }
            let frame = match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => bail!("stream failed: {e}"),
                Ok(None) => return Ok(None),
                Err(_) => bail!("no event within {within:?}"),
            };
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    async fn next(&mut self) -> Event {
        self.try_next(STEP)
            .await
            .expect("an event")
            .expect("the stream ended")
    }

    /// The next event named `name`, skipping others (presence).
    async fn next_named(&mut self, name: &str) -> Event {
        loop {
            let ev = self.next().await;
            if ev.event == name {
                return ev;
            }
        }
    }

    /// Closes the connection, as a browser tab going away does.
    fn drop_connection(self) {
        self.conn.abort();
    }
}

in_both_modes!(a_reconnect_with_last_event_id_misses_nothing);
async fn a_reconnect_with_last_event_id_misses_nothing(d: Deployment) {
    // A WebSocket member on the other node keeps the room (and its numbering) alive.
    let (mut ws, _) = Client::join(&d.b().ws("/ws/r?user=wsock")).await;
    let mut sse = connect(d.a().addr, "/sse/r?user=reader").await;
    let welcome = sse.next_named("welcome").await;
    assert_eq!(welcome.id.as_deref(), Some("0"));
    assert_eq!(welcome.json()["user"], "reader");
    d.wait_members("r", 2).await;

    for text in ["one", "two", "three"] {
        d.publish("r", text).await;
    }
    let mut last = None;
    for seq in 1..=3u64 {
        let ev = sse.next_named("message").await;
        let m = ws.recv_type("message").await;
        assert_eq!(
            ev.json(),
            m,
            "the event's data is the WebSocket frame's JSON"
        );
        assert_eq!(ev.id, Some(seq.to_string()));
        assert_eq!(ev.json()["seq"], seq);
        assert_eq!(ev.epochs, [welcome.json()["epoch"].as_str().unwrap()]);
        last = ev.raw_id;
    }
    sse.drop_connection();
    d.wait_members("r", 1).await;

    // Published while the stream was gone.
    d.publish("r", "four").await;
    d.publish("r", "five").await;
    let last = last.unwrap();
    let mut sse = connect_with(
        d.a().addr,
        "/sse/r?user=reader",
        &[("last-event-id", &last)],
    )
    .await;
    let welcome = sse.next().await;
    assert_eq!(welcome.event, "welcome");
    assert_eq!(
        welcome.id.as_deref(),
        Some("3"),
        "the stream stands where it left off"
    );
    let mut texts = Vec::new();
    for seq in 4..=5u64 {
        let ev = sse.next_named("message").await;
        assert_ne!(ev.event, "reset");
        assert_eq!(ev.id, Some(seq.to_string()));
        texts.push(ev.json()["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(texts, ["four", "five"]);
    d.publish("r", "six").await;
    let ev = sse.next_named("message").await;
    assert_eq!(
        (ev.id.as_deref(), ev.json()["text"].as_str()),
        (Some("6"), Some("six"))
    );
    for seq in 4..=6u64 {
        assert_eq!(ws.recv_type("message").await["seq"], seq, "the same seqs");
    }
}

in_both_modes!(
    a_position_older_than_the_ring_gets_a_reset,
    "--history",
    "2"
);
async fn a_position_older_than_the_ring_gets_a_reset(d: Deployment) {
    let (_ws, _) = Client::join(&d.b().ws("/ws/r?user=keeper")).await;
    d.wait_members("r", 1).await;
    for i in 1..=5 {
        d.publish("r", &format!("m{i}")).await;
    }
    let mut sse = connect_with(d.a().addr, "/sse/r", &[("last-event-id", "1")]).await;
    assert_eq!(sse.next().await.event, "welcome");
    let reset = sse.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    let v = reset.json();
    assert_eq!(
        (v["since"].as_u64(), v["from"].as_u64()),
        (Some(1), Some(4)),
        "{v}"
    );
    for seq in 4..=5u64 {
        let ev = sse.next_named("message").await;
        assert_eq!(ev.id, Some(seq.to_string()));
    }
    // A position the server never wrote is a 400 before anything is joined.
    refused(
        d.a().addr,
        "/sse/r",
        &[("last-event-id", "x1")],
        400,
        "bad_last_event_id",
    )
    .await;
}

in_both_modes!(sse_members_are_members_and_leave_when_they_go);
async fn sse_members_are_members_and_leave_when_they_go(d: Deployment) {
    let (_ws, _) = Client::join(&d.b().ws("/ws/r?user=wsock")).await;
    let mut one = connect(d.a().addr, "/sse/r?user=one").await;
    let mut two = connect(d.a().addr, "/sse/r?user=two").await;
    one.next_named("welcome").await;
    two.next_named("welcome").await;
    d.wait_members("r", 3).await;
    let (_, info) = d.a().get("/api/rooms/r").await;
    let users: Vec<&str> = info["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["user"].as_str())
        .collect();
    assert!(users.contains(&"one") && users.contains(&"two"), "{info}");
    // Standalone, the WebSocket member is on the same process.
    let ws_here = u64::from(d.nodes.len() == 1);
    let (_, stats) = d.a().get_as_operator("/api/stats").await;
    assert_eq!(stats["sse_streams"], 2, "{stats}");
    assert_eq!(stats["local_connections"], 2 + ws_here, "{stats}");
    // Presence names SSE members like any other.
    let p = one.next_named("presence").await;
    assert!(p.id.is_none(), "presence events carry no position");
    one.drop_connection();
    d.wait_members("r", 2).await;
    two.drop_connection();
    d.wait_members("r", 1).await;
    d.a()
        .wait_for("/api/stats", "no streams left", STEP, |_, v| {
            v["sse_streams"] == 0 && v["local_connections"] == ws_here
        })
        .await;
}

in_both_modes!(several_rooms_share_one_composite_position);
async fn several_rooms_share_one_composite_position(d: Deployment) {
    let (_wa, _) = Client::join(&d.b().ws("/ws/a?user=wa")).await;
    let (_wb, _) = Client::join(&d.b().ws("/ws/b%3Ax?user=wb")).await;
    let mut sse = connect(d.a().addr, "/sse?rooms=a,b:x").await;
    let w = sse.next_named("welcome").await;
    assert_eq!(w.id.as_deref(), Some("a:0,b:x:0"));
    d.wait_members("a", 2).await;
    d.wait_members("b:x", 2).await;
    d.publish("a", "a1").await;
    assert_eq!(
        sse.next_named("message").await.id.as_deref(),
        Some("a:1,b:x:0")
    );
    d.publish("b:x", "b1").await;
    let ev = sse.next_named("message").await;
    assert_eq!(ev.id.as_deref(), Some("a:1,b:x:1"));
    assert_eq!(ev.json()["room"], "b:x");
    let last = ev.raw_id.unwrap();
    sse.drop_connection();
    d.wait_members("a", 1).await;
    d.publish("a", "a2").await;
    d.publish("b:x", "b2").await;
    let mut sse = connect_with(d.a().addr, "/sse?rooms=a,b:x", &[("last-event-id", &last)]).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let ev = sse.next_named("message").await;
        got.push((
            ev.json()["text"].as_str().unwrap().to_owned(),
            ev.id.unwrap(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("a2".to_owned(), "a:2,b:x:1".to_owned()),
            ("b2".to_owned(), "a:2,b:x:2".to_owned())
        ]
    );
}

#[tokio::test]
async fn rooms_per_stream_are_capped() {
    let node = Node::standalone(&["--max-rooms-per-connection", "2"]).await;
    refused(node.addr, "/sse?rooms=a,b,c", &[], 400, "too_many_rooms").await;
    refused(node.addr, "/sse/a?since=1&history=2", &[], 400, "bad_param").await;
    let (status, _) = open(node.addr, "/sse/%24nope", &[]).await.err().unwrap();
    assert_eq!(status, 400);
    let mut s = connect(node.addr, "/sse?rooms=a,b").await;
    assert_eq!(s.next().await.event, "welcome");
}

/// A file in the temporary folder, named for this process, written once with `contents`.
fn written_once(
    cell: &'static std::sync::OnceLock<String>,
    name: &str,
    contents: &str,
) -> &'static str {
    cell.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("roomcast-sse-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path.to_string_lossy().into_owned()
    })
}

fn rooms_file() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    written_once(
        &PATH,
        "rooms",
        "[rooms.vault]\npassword = \"s3same\"\nmax_members = 1\n",
    )
}

#[tokio::test]
async fn a_password_room_refuses_without_its_password() {
    let node = Node::standalone(&["--rooms-config", rooms_file()]).await;
    refused(node.addr, "/sse/vault", &[], 403, "bad_password").await;
    refused(
        node.addr,
        "/sse/vault?password=nope",
        &[],
        403,
        "bad_password",
    )
    .await;
    let mut s = connect(node.addr, "/sse/vault?password=s3same").await;
    assert_eq!(s.next().await.event, "welcome");
    // The header form, and the room's member cap (403 as for an upgrade).
    refused(
        node.addr,
        "/sse/vault",
        &[("x-room-password", "s3same")],
        403,
        "room_full",
    )
    .await;
    // Nothing was left behind by the refusals.
    let (_, info) = node.get("/api/rooms/vault?password=s3same").await;
    assert_eq!(info["members"], 1, "{info}");
}

const SECRET: &str = "sse-test-secret-of-a-reasonable-length";

#[tokio::test]
async fn a_token_server_needs_a_token_that_allows_every_room() {
    let node = Node::standalone(&["--jwt-secret", SECRET]).await;
    let token = |sub: &str, rooms: Option<&str>| {
        roomcast::core::auth::issue(SECRET, sub, rooms, Duration::from_secs(3600)).unwrap()
    };
    refused(node.addr, "/sse/r", &[], 401, "unauthorized").await;
    let narrow = token("ann", Some("r"));
    refused(
        node.addr,
        &format!("/sse?rooms=r,s&token={narrow}"),
        &[],
        403,
        "forbidden_room",
    )
    .await;
    refused(
        node.addr,
        &format!("/sse/r?token={narrow}&user=bob"),
        &[],
        403,
        "forbidden_user",
    )
    .await;
    let mut s = connect(node.addr, &format!("/sse/r?token={narrow}")).await;
    assert_eq!(s.next().await.json()["user"], "ann");
    let bearer = format!("Bearer {}", token("cat", None));
    let mut s = connect_with(node.addr, "/sse?rooms=r,s", &[("authorization", &bearer)]).await;
    assert_eq!(s.next().await.json()["user"], "cat");
}

#[tokio::test]
async fn a_token_that_expires_ends_the_stream() {
    let node = Node::standalone(&["--jwt-secret", SECRET]).await;
    let short = roomcast::core::auth::issue(SECRET, "ann", None, Duration::from_secs(1)).unwrap();
    let mut s = connect(node.addr, &format!("/sse/r?token={short}")).await;
    let close = s.next_named("close").await;
    assert_eq!(close.json()["code"], "token_expired");
    assert!(s.try_next(STEP).await.unwrap().is_none(), "the stream ends");
}

#[tokio::test]
async fn idle_streams_get_heartbeats() {
    let node = Node::standalone(&["--sse-heartbeat", "50ms"]).await;
    let mut s = connect(node.addr, "/sse/r").await;
    assert_eq!(s.next().await.event, "welcome");
    // Comments are counted while reading whatever else comes (presence), to a deadline.
    let deadline = tokio::time::Instant::now() + STEP;
    while s.comments < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeats");
        let _ = s.try_next(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn each_frame_is_encoded_once_for_every_stream() {
    let node = Node::standalone(&[]).await;
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut s = connect(node.addr, &format!("/sse/r?user=u{i}")).await;
        s.next_named("welcome").await;
        streams.push(s);
    }
    // Every presence frame of the joins has gone out before counting starts.
    for s in &mut streams {
        loop {
            let p = s.next_named("presence").await;
            if p.json()["members"] == 4 {
                break;
            }
        }
    }
    let (_, before) = node.get("/api/stats").await;
    for i in 0..5 {
        let (status, _) = node
            .post("/api/rooms/r/messages", &json!({"text": format!("m{i}")}))
            .await;
        assert_eq!(status, 202);
    }
    for s in &mut streams {
        for seq in 1..=5u64 {
            assert_eq!(s.next_named("message").await.id, Some(seq.to_string()));
        }
    }
    let (_, after) = node.get("/api/stats").await;
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(delta("sse_events_encoded"), 5, "{after}");
    assert_eq!(delta("frames_encoded"), 5, "{after}");
    assert_eq!(delta("frames_out"), 20, "{after}");
}

#[tokio::test]
async fn a_stream_that_is_not_read_is_evicted_and_counted() {
    let node = Node::standalone(&["--write-timeout", "200ms", "--room-buffer", "16"]).await;
    // Asks, then never reads a byte.
    let mut raw = TcpStream::connect(node.addr).await.unwrap();
    raw.write_all(b"GET /sse/r?user=sloth HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    node.wait_room("r", 1, 1).await;
    let text = "x".repeat(30_000);
    let evicted = support::eventually("the stream to be evicted", Duration::from_millis(1), || {
        let node = &node;
        let text = &text;
        async move {
            for _ in 0..20 {
                node.post("/api/rooms/r/messages", &json!({"text": text}))
                    .await;
            }
            let (_, stats) = node.get("/api/stats").await;
            (stats["sse_evictions"].as_u64() >= Some(1)).then_some(stats)
        }
    })
    .await;
    assert!(evicted["evictions"].as_u64() >= Some(1), "{evicted}");
    node.wait_for("/api/stats", "the stream gone", STEP, |_, v| {
        v["sse_streams"] == 0 && v["connections"] == 0
    })
    .await;
    drop(raw);
}

#[tokio::test]
async fn shutdown_ends_a_stream_with_a_close_event_and_a_retry() {
    let mut node = Node::standalone(&["--drain-rate", "off"]).await;
    let mut s = connect(node.addr, "/sse/r").await;
    assert_eq!(s.next().await.event, "welcome");
    node.sigterm();
    let close = s.next_named("close").await;
    let v = close.json();
    assert_eq!(v["code"], "restart", "{v}");
    assert_eq!(
        close.retry,
        v["retry_after_ms"].as_u64(),
        "retry: is the same delay"
    );
    assert!(s.try_next(STEP).await.unwrap().is_none(), "the stream ends");
    assert!(node.wait_exit(STEP).await.success());
    // Refused while shutting down is covered by the upgrade's own tests; the stream's own end
    // is what EventSource sees.
}

/// A rooms file whose `[routes]` has the tutorials' event-stream path.
fn routes_file() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    written_once(
        &PATH,
        "routes",
        "[routes]\n\"/sse/posts/{id}\" = \"post:{id}\"\n\"/ws/posts/{id}/live\" = \"post:{id}\"\n",
    )
}

in_both_modes!(
    a_route_template_opens_an_event_stream,
    "--rooms-config",
    routes_file()
);
/// A template's path asked for `text/event-stream` is a stream into the room the template
/// names, and the same path upgraded is a WebSocket into it.
async fn a_route_template_opens_an_event_stream(d: Deployment) {
    let mut s = connect(d.a().addr, "/sse/posts/9?user=reader").await;
    let w = s.next_named("welcome").await.json();
    assert_eq!(
        (&w["room"], &w["user"]),
        (&json!("post:9"), &json!("reader")),
        "{w}"
    );
    let (mut ws, w) = Client::join(&d.b().ws("/sse/posts/9?user=writer")).await;
    assert_eq!(w["room"], "post:9");
    d.wait_members("post:9", 2).await;
    ws.send("through a route").await;
    let m = s.next_named("message").await.json();
    assert_eq!(
        (&m["room"], &m["text"]),
        (&json!("post:9"), &json!("through a route"))
    );
    refused(
        d.a().addr,
        "/sse/posts/9?rooms=other",
        &[],
        400,
        "bad_param",
    )
    .await;
    refused(d.a().addr, "/sse/posts/a%20b", &[], 400, "bad_room").await;
    let (status, _) = open(d.a().addr, "/sse/posts/9/x", &[]).await.err().unwrap();
    assert_eq!(status, 404);
}
