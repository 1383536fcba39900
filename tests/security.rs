//! Authentication, authorization and abuse limits, against a real server over real sockets:
//! JWT on the upgrade and on later joins, the API key, allowed origins, rate limits, the per-IP
//! cap and the handshake timeout.

mod support;

use std::time::Duration;

use clap::Parser;
use futures_util::SinkExt;
use roomcast::config::rate::RateLimitArg;
use serde_json::{json, Value};
use support::{http_with, Client, HttpResponse, TestServer, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "test-secret-of-reasonable-length";

const UPGRADE: [(&str, &str); 4] = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

fn token(sub: &str, rooms: Option<&str>, ttl: Duration) -> String {
    roomcast::core::auth::issue(SECRET, sub, rooms, ttl).unwrap()
}

/// A token signed by hand, for claims `issue` would never produce.
fn raw_token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn upgrade(server: &TestServer, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
    let mut headers: Vec<(&str, &str)> = UPGRADE.to_vec();
    headers.extend_from_slice(extra);
    http_with(server.addr, "GET", path, &headers, None)
        .await
        .unwrap()
}

fn assert_refused(r: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}");
    assert_eq!(r.headers["content-type"], "application/json", "{what}");
    assert_eq!(r.json()["error"], code, "{what}: {}", r.json());
}

#[tokio::test]
async fn upgrades_need_a_valid_token_that_allows_the_room() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let hour = Duration::from_secs(3600);
    let good = token("alice", Some("general,post:*"), hour);
    let now = jsonwebtoken::get_current_timestamp();
    let expired = raw_token(SECRET, json!({"sub": "alice", "exp": now - 120}));
    let forged = raw_token("another-secret", json!({"sub": "alice", "exp": now + 600}));
    let no_exp = raw_token(SECRET, json!({"sub": "alice"}));
    let bad_sub = raw_token(SECRET, json!({"sub": "a\nb", "exp": now + 600}));

    let r = upgrade(&server, "/ws/general", &[]).await;
    assert_refused(&r, 401, "unauthorized", "no token");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    for (t, what) in [
        (&expired, "expired"),
        (&forged, "bad signature"),
        (&no_exp, "no exp"),
        (&bad_sub, "bad sub"),
    ] {
        let r = upgrade(&server, &format!("/ws/general?token={t}"), &[]).await;
        assert_refused(&r, 401, "unauthorized", what);
    }
    let r = upgrade(&server, "/ws/general?token=garbage", &[]).await;
    assert_refused(&r, 401, "unauthorized", "garbage");
    assert!(r.json()["reason"].as_str().unwrap().contains("invalid"));
    let r = upgrade(&server, &format!("/ws/secret?token={good}"), &[]).await;
    assert_refused(&r, 403, "forbidden_room", "room not in the claim");
    let r = upgrade(
        &server,
        &format!("/ws/general?token={good}&user=mallory"),
        &[],
    )
    .await;
    assert_refused(&r, 403, "forbidden_user", "user differs from sub");
    assert_eq!(server.stats().await["auth_refused"], 8);
    assert_eq!(server.stats().await["connections"], 0);

    // Query, header and subprotocol all work; the user name is the token's `sub`.
    let (mut c, welcome) = Client::join(&server.ws_url(&format!("/ws/post:1?token={good}"))).await;
    assert_eq!(welcome["user"], "alice");
    c.send("hello").await;
    assert_eq!(c.recv_type("message").await["text"], "hello");

    let bearer = format!("Bearer {good}");
    let r = upgrade(&server, "/ws/general", &[("authorization", &bearer)]).await;
    assert_eq!(r.status, 101, "Authorization header");

    let mut req = server.ws_url("/ws/general").into_client_request().unwrap();
    let offer = format!("roomcast, bearer.{good}");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&offer).unwrap(),
    );
    let (ws, resp) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "roomcast",
        "the server selects the roomcast subprotocol, as browsers require"
    );
    let mut c = Client { ws };
    assert_eq!(c.recv_type("welcome").await["user"], "alice");
}

#[tokio::test]
async fn joins_over_an_open_socket_are_checked_against_the_token() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let t = token("bob", Some("lobby:*"), Duration::from_secs(3600));
    let mut c = Client::connect(&server.ws_url(&format!("/ws?token={t}"))).await;
    c.send_json(&json!({"type": "join", "room": "private"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(e["code"], "forbidden_room");
    assert_eq!(e["room"], "private");
    let op = token("operator", None, Duration::from_secs(3600));
    let (status, _) = server.get(&format!("/api/rooms/private?token={op}")).await;
    assert_eq!(status, 404, "no membership was created");
    c.send_json(&json!({"type": "join", "room": "lobby:1"}))
        .await;
    assert_eq!(c.recv_type("welcome").await["room"], "lobby:1");
}

/// Seconds since the Unix epoch, whole, as jsonwebtoken compares them.
fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A token whose `exp` is 3 s in the past: inside the 5 s leeway, so the upgrade takes it, and
/// past it within 3 s (timestamps are whole seconds).
fn expiring(sub: &str, rooms: Option<&str>) -> (String, u64) {
    let exp = now() - 3;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(rooms) = rooms {
        claims["rooms"] = json!(rooms);
    }
    (raw_token(SECRET, claims), exp)
}

#[tokio::test]
async fn a_socket_is_closed_when_its_token_expires() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let (t, exp) = expiring("carol", None);
    let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/any-0?token={t}"))).await;
    c.send_json(&json!({"type": "join", "room": "any-1"})).await;
    assert_eq!(
        c.recv_type("welcome").await["room"],
        "any-1",
        "valid until exp + leeway"
    );
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    assert!(now() > exp + 5, "closed before exp + leeway");
    server
        .wait_for("/api/stats", "the socket is gone", |_, s| {
            s["connections"] == 0
        })
        .await;
}

#[tokio::test]
async fn a_refresh_before_expiry_keeps_the_socket_open() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let (old, old_exp) = expiring("dave", None);
    let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/r?token={old}"))).await;
    let fresh = token("dave", None, Duration::from_secs(3600));
    c.send_json(&json!({"type": "refresh", "token": fresh}))
        .await;
    let v = c.recv_non_presence().await;
    assert_eq!(v["type"], "refreshed", "{v}");
    let new_exp = v["exp"].as_u64().unwrap();
    assert!(new_exp >= now() + 3500, "{v}");
    // Past the moment the old token would have closed the socket, it still answers.
    while now() <= old_exp + 6 {
        c.send_json(&json!({"type": "ping"})).await;
        assert_eq!(c.recv_non_presence().await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.send("still here").await;
    assert_eq!(c.recv_type("message").await["text"], "still here");
}

#[tokio::test]
async fn a_refresh_for_another_user_is_refused() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let hour = Duration::from_secs(3600);
    let t = token("erin", None, hour);
    let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/r?token={t}"))).await;
    c.send_json(&json!({"type": "refresh", "token": token("mallory", None, hour)}))
        .await;
    let e = c.recv_non_presence().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "forbidden_user", "{e}");
    // A token that is not valid is refused too; neither touches the socket.
    let forged = raw_token(
        "another-secret-of-thirty-two-bytes",
        json!({"sub": "erin", "exp": now() + 600}),
    );
    c.send_json(&json!({"type": "refresh", "token": forged}))
        .await;
    assert_eq!(c.recv_non_presence().await["code"], "unauthorized");
    c.send("as erin").await;
    let m = c.recv_type("message").await;
    assert_eq!(
        (m["user"].as_str(), m["text"].as_str()),
        (Some("erin"), Some("as erin"))
    );
}

#[tokio::test]
async fn a_narrower_refresh_leaves_the_rooms_it_no_longer_allows() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let hour = Duration::from_secs(3600);
    let wide = token("fay", Some("keep,drop,also:*"), hour);
    let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/keep?token={wide}"))).await;
    for room in ["drop", "also:1"] {
        c.send_json(&json!({"type": "join", "room": room})).await;
        assert_eq!(c.recv_type("welcome").await["room"], room);
    }
    c.send_json(&json!({"type": "refresh", "token": token("fay", Some("keep"), hour)}))
        .await;
    let mut left = Vec::new();
    let refreshed = loop {
        let v = c.recv_non_presence().await;
        match v["type"].as_str() {
            Some("left") => {
                assert_eq!(v["reason"], "token no longer allows this room", "{v}");
                left.push(v["room"].as_str().unwrap().to_owned());
            }
            _ => break v,
        }
    };
    assert_eq!(refreshed["type"], "refreshed", "{refreshed}");
    left.sort();
    assert_eq!(left, ["also:1", "drop"]);
    let op = token("operator", None, Duration::from_secs(3600));
    for room in ["drop", "also:1"] {
        let (status, _) = server.get(&format!("/api/rooms/{room}?token={op}")).await;
        assert_eq!(status, 404, "{room} lost its only member");
        c.send_json(&json!({"type": "message", "room": room, "text": "x"}))
            .await;
        assert_eq!(c.recv_non_presence().await["code"], "not_joined");
    }
    c.send("kept").await;
    assert_eq!(c.recv_type("message").await["room"], "keep");
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let later = raw_token(
        SECRET,
        json!({"sub": "gus", "exp": now() + 600, "nbf": now() + 60}),
    );
    let r = upgrade(&server, &format!("/ws/r?token={later}"), &[]).await;
    assert_refused(&r, 401, "unauthorized", "nbf in the future");
    let started = raw_token(
        SECRET,
        json!({"sub": "gus", "exp": now() + 600, "nbf": now() - 1}),
    );
    let r = upgrade(&server, &format!("/ws/r?token={started}"), &[]).await;
    assert_eq!(r.status, 101, "nbf in the past");
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_set() {
    const ISS: &str = "https://id.example.com";
    let server = TestServer::with(|c| {
        // As the command line sets them.
        let flags = roomcast::Config::try_parse_from([
            "roomcast",
            "--jwt-secret",
            SECRET,
            "--jwt-audience",
            "chat",
            "--jwt-issuer",
            ISS,
        ])
        .expect("--jwt-audience and --jwt-issuer exist");
        *c = roomcast::Config {
            listen: c.listen,
            ..flags
        };
    })
    .await;
    let exp = now() + 600;
    let good = raw_token(
        SECRET,
        json!({"sub": "hal", "exp": exp, "aud": "chat", "iss": ISS}),
    );
    let r = upgrade(&server, &format!("/ws/r?token={good}"), &[]).await;
    assert_eq!(r.status, 101, "right aud and iss");
    let list = raw_token(
        SECRET,
        json!({"sub": "hal", "exp": exp, "aud": ["other", "chat"], "iss": ISS}),
    );
    let r = upgrade(&server, &format!("/ws/r?token={list}"), &[]).await;
    assert_eq!(r.status, 101, "aud as a list that names us");
    for (claims, what) in [
        (
            json!({"sub": "hal", "exp": exp, "aud": "other", "iss": ISS}),
            "wrong aud",
        ),
        (json!({"sub": "hal", "exp": exp, "iss": ISS}), "no aud"),
        (
            json!({"sub": "hal", "exp": exp, "aud": "chat", "iss": "https://evil.example"}),
            "wrong iss",
        ),
        (json!({"sub": "hal", "exp": exp, "aud": "chat"}), "no iss"),
    ] {
        let t = raw_token(SECRET, claims);
        let r = upgrade(&server, &format!("/ws/r?token={t}"), &[]).await;
        assert_refused(&r, 401, "unauthorized", what);
    }
    // A refresh is held to the same rules.
    let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/r?token={good}"))).await;
    let wrong = raw_token(
        SECRET,
        json!({"sub": "hal", "exp": exp + 60, "aud": "other", "iss": ISS}),
    );
    c.send_json(&json!({"type": "refresh", "token": wrong}))
        .await;
    assert_eq!(c.recv_non_presence().await["code"], "unauthorized");
}

#[tokio::test]
async fn a_short_secret_is_refused_at_start() {
    let short = "only-31-bytes-of-shared-secret!";
    assert_eq!(short.len(), 31);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = roomcast::Config {
        jwt_secret: Some(short.into()),
        ..roomcast::Config::default()
    };
    let res = tokio::time::timeout(
        STEP,
        roomcast::run(listener, config, std::future::pending()),
    )
    .await
    .expect("the server started with a 31-byte secret");
    let e = res.expect_err("the server started with a 31-byte secret");
    assert!(e.to_string().contains("at least 32 bytes"), "{e}");

    // The binary says so and exits non-zero.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--listen", "127.0.0.1:0", "--jwt-secret", short])
        .env_remove("ROOMCAST_JWT_SECRET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the binary kept running with a 31-byte secret");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--jwt-secret must be at least 32 bytes"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_token_command_prints_a_token_the_server_accepts() {
    let bin = env!("CARGO_BIN_EXE_roomcast");
    let out = std::process::Command::new(bin)
        .args([
            "token", "--sub", "dora", "--rooms", "general", "--ttl", "10m",
        ])
        .env("ROOMCAST_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let (_c, w) = Client::join(&server.ws_url(&format!("/ws/general?token={t}"))).await;
    assert_eq!(w["user"], "dora");
    let r = upgrade(&server, &format!("/ws/other?token={t}"), &[]).await;
    assert_refused(&r, 403, "forbidden_room", "token command rooms");

    let out = std::process::Command::new(bin)
        .args(["token", "--sub", "dora"])
        .env_remove("ROOMCAST_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no secret is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jwt-secret"));
}

#[tokio::test]
async fn rest_publish_needs_the_api_key() {
    let server = TestServer::with(|c| c.api_key = Some("k3y".into())).await;
    let (mut member, _) = Client::join(&server.ws_url("/ws/r")).await;
    let body = Some(r#"{"text":"hi"}"#.to_owned());
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer k3"),
        Some("Basic k3y"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = http_with(
            server.addr,
            "POST",
            "/api/rooms/r/messages",
            &headers,
            body.clone(),
        )
        .await
        .unwrap();
        assert_refused(&r, 401, "unauthorized", &format!("{auth:?}"));
    }
    member.expect_silence(Duration::from_millis(300)).await;
    let r = http_with(
        server.addr,
        "POST",
        "/api/rooms/r/messages",
        &[("authorization", "Bearer k3y")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202);
    assert_eq!(member.recv_type("message").await["text"], "hi");
    // Reads stay open.
    let (status, _) = server.get("/api/rooms/r").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn only_allowed_origins_may_open_sockets() {
    let server = TestServer::with(|c| {
        c.allowed_origins = vec![
            "https://chat.example.com".into(),
            "http://localhost:3000".into(),
        ]
    })
    .await;
    let r = upgrade(&server, "/ws/r", &[("origin", "https://evil.example.net")]).await;
    assert_refused(&r, 403, "origin_not_allowed", "foreign origin");
    let r = upgrade(&server, "/ws/r", &[("origin", "null")]).await;
    assert_refused(&r, 403, "origin_not_allowed", "opaque origin");
    let r = upgrade(&server, "/ws/r", &[("origin", "https://chat.example.com")]).await;
    assert_eq!(r.status, 101, "listed origin");
    let r = upgrade(&server, "/ws/r", &[("origin", "HTTP://LOCALHOST:3000")]).await;
    assert_eq!(r.status, 101, "origins compare case-insensitively");
    let r = upgrade(&server, "/ws/r", &[]).await;
    assert_eq!(r.status, 101, "no Origin: not a browser");
}

#[tokio::test]
async fn a_fast_sender_gets_retry_hints_then_is_closed_for_flooding() {
    let server = TestServer::with(|c| c.rate_limit = "2/s burst 3".parse().unwrap()).await;
    let (mut listener, _) = Client::join(&server.ws_url("/ws/r")).await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r")).await;
    for i in 0..3 {
        c.send(&format!("m{i}")).await;
    }
    for i in 0..3 {
        assert_eq!(listener.recv_type("message").await["text"], format!("m{i}"));
    }
    c.send("over").await;
    let e = c.recv_type("error").await;
    assert_eq!(e["code"], "rate_limited");
    let retry = e["retry_after_ms"].as_u64().unwrap();
    assert!(
        (1..=500).contains(&retry),
        "one token every 500 ms: {retry}"
    );
    // Backing off as told is enough to be let through again.
    tokio::time::sleep(Duration::from_millis(retry + 20)).await;
    c.send("after").await;
    assert_eq!(listener.recv_type("message").await["text"], "after");
    assert!(server.stats().await["rate_limited"].as_u64().unwrap() >= 1);
    let (mut c2, _) = Client::join(&server.ws_url("/ws/r")).await;
    // A client that ignores the hints is closed.
    for i in 0..20 {
        if c.ws
            .send(tokio_tungstenite::tungstenite::Message::text(format!(
                "f{i}"
            )))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded"));
    // Nobody else was affected.
    c2.send("still here").await;
    let mut texts = Vec::new();
    loop {
        let m = listener.recv_type("message").await;
        let text = m["text"].as_str().unwrap().to_owned();
        texts.push(text.clone());
        if text == "still here" {
            break;
        }
    }
    assert!(texts.len() <= 4, "at most the burst got through: {texts:?}");
}

#[tokio::test]
async fn a_room_rate_limit_refuses_websocket_and_rest_publishes() {
    let server = TestServer::with(|c| {
        c.room_rate_limit = "1/s burst 2".parse().unwrap();
        c.rate_limit = RateLimitArg(None);
    })
    .await;
    let (mut a, _) = Client::join(&server.ws_url("/ws/busy")).await;
    let (mut other, _) = Client::join(&server.ws_url("/ws/quiet")).await;
    a.send("1").await;
    a.send("2").await;
    a.send_json(&json!({"type": "message", "room": "busy", "text": "3"}))
        .await;
    let e = a.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["room"].as_str()),
        (Some("rate_limited"), Some("busy"))
    );
    assert!(e["retry_after_ms"].as_u64().unwrap() >= 1);
    let r = http_with(
        server.addr,
        "POST",
        "/api/rooms/busy/messages",
        &[],
        Some(r#"{"text":"rest"}"#.into()),
    )
    .await
    .unwrap();
    assert_refused(&r, 429, "rate_limited", "REST over the room limit");
    assert!(r.headers.contains_key("retry-after"));
    assert!(r.json()["retry_after_ms"].as_u64().unwrap() >= 1);
    // Other rooms have budgets of their own.
    other.send("fine").await;
    assert_eq!(other.recv_type("message").await["text"], "fine");
}

#[tokio::test]
async fn one_address_may_hold_only_so_many_sockets() {
    let server =
        TestServer::with(|c| c.max_connections_per_ip = roomcast::config::PerIpCap(Some(2))).await;
    let a = Client::connect(&server.ws_url("/ws/r")).await;
    let _b = Client::connect(&server.ws_url("/ws/r")).await;
    let r = upgrade(&server, "/ws/r", &[]).await;
    assert_refused(&r, 429, "too_many_connections_from_ip", "third socket");
    // The REST API is not counted.
    let (status, _) = server.get("/api/stats").await;
    assert_eq!(status, 200);
    drop(a);
    server
        .wait_for("/api/stats", "a slot frees up", |_, s| {
            s["connections"] == 1
        })
        .await;
    let _c = Client::connect(&server.ws_url("/ws/r")).await;
}

/// Opens a WebSocket whose upgrade carries `X-Forwarded-For: xff`.
async fn connect_forwarded(server: &TestServer, xff: &str) -> Result<Client, String> {
    let mut req = server.ws_url("/ws/r").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
    match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((ws, _))) => Ok(Client { ws }),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_cap() {
    let server = TestServer::with(|c| {
        c.max_connections_per_ip = roomcast::config::PerIpCap(Some(1));
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let _a = connect_forwarded(&server, "203.0.113.1").await.unwrap();
    let _b = connect_forwarded(&server, "203.0.113.2").await.unwrap();
    let again = connect_forwarded(&server, "203.0.113.1").await;
    assert!(
        again.is_err_and(|e| e.contains("429")),
        "one socket per client address"
    );

    // From a peer that is not a trusted proxy the header is anyone's words: ignored.
    let server =
        TestServer::with(|c| c.max_connections_per_ip = roomcast::config::PerIpCap(Some(1))).await;
    let _a = connect_forwarded(&server, "203.0.113.1").await.unwrap();
    let spoofed = connect_forwarded(&server, "203.0.113.2").await;
    assert!(
        spoofed.is_err_and(|e| e.contains("429")),
        "X-Forwarded-For from an untrusted peer moves nothing"
    );
}

#[tokio::test]
async fn slow_headers_are_dropped_at_the_handshake_timeout() {
    let server = TestServer::with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    // Fifty connections that send half a request line and then stall (slowloris).
    let mut socks = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /ws/r HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        socks.push(s);
    }
    for mut s in socks {
        let mut buf = [0u8; 512];
        // The server answers 408 or just closes; either way the socket reaches EOF.
        let closed = tokio::time::timeout(STEP, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a stalled handshake was not dropped");
    }
    // The server still serves.
    let (_c, w) = Client::join(&server.ws_url("/ws/r")).await;
    assert_eq!(w["type"], "welcome");
}

#[tokio::test]
async fn operator_routes_can_live_on_their_own_listener() {
    let port = support::nodes::free_port();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let node = support::nodes::Node::standalone(&["--admin-listen", &admin.to_string()]).await;
    let get = |addr, path: &'static str| async move {
        support::http(addr, "GET", path, None).await.unwrap().status
    };
    for path in ["/metrics", "/api/stats"] {
        assert_eq!(get(node.addr, path).await, 404, "{path} on --listen");
        assert_eq!(get(admin, path).await, 200, "{path} on --admin-listen");
    }
    assert_eq!(get(node.addr, "/healthz").await, 200);
    assert_eq!(get(admin, "/healthz").await, 200);
    for path in ["/api/rooms", "/ws/r", "/"] {
        assert_eq!(
            get(admin, path).await,
            404,
            "{path} is not an operator route"
        );
    }
    assert_eq!(get(node.addr, "/api/rooms").await, 200);
}

#[tokio::test]
async fn upgrades_past_the_accept_rate_get_503_with_retry_after_and_are_counted() {
    let server = TestServer::with(|c| {
        c.accept_rate = "1/m burst 3".parse().unwrap();
        // With tokens on, a refused upgrade never reaches the (costly) token check.
        c.jwt_secret = Some(SECRET.into());
    })
    .await;
    let path = format!(
        "/ws/gate?token={}",
        token("al", None, Duration::from_secs(60))
    );
    // A request that is not an upgrade does not spend the budget.
    let plain = http_with(server.addr, "GET", &path, &[], None)
        .await
        .unwrap();
    assert_eq!(plain.status, 400, "{}", plain.json());
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::join(&server.ws_url(&path)).await.0);
    }
    // Past the burst, even a request with a bad token is refused here first.
    for path in [path.as_str(), "/ws/gate?token=forged"] {
        let r = http_with(server.addr, "GET", path, &UPGRADE, None)
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{}", r.json());
        let body = r.json();
        assert_eq!(body["error"], "accept_rate", "{body}");
        let ms = body["retry_after_ms"].as_u64().unwrap();
        assert!((1..=60_000).contains(&ms), "{body}");
        let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert_eq!(secs, ms.div_ceil(1000), "{body}");
    }
    let stats = server.stats().await;
    assert_eq!(stats["accept_rate_refused"], 2, "{stats}");
    assert_eq!(stats["auth_refused"], 0, "no token was checked: {stats}");
    assert_eq!(stats["connections"], 3, "{stats}");
    let metrics = http_with(server.addr, "GET", "/metrics", &[], None)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&metrics.body).contains("roomcast_accept_rate_refused_total 2"));
}

/// `--cors-origins`: a listed origin may read and publish with `Authorization`; `*` lets any
/// other origin GET without it, never publish; refused preflights are 403 and counted.
#[tokio::test]
async fn cors_answers_listed_origins_fully_and_others_read_only() {
    let server = TestServer::with(|c| {
        c.cors_origins = vec!["http://app.test:8080".into(), "*".into()];
    })
    .await;
    let preflight = |origin: &'static str, method: &'static str, headers: &'static str| {
        let addr = server.addr;
        async move {
            let mut h = vec![
                ("origin", origin),
                ("access-control-request-method", method),
            ];
            if !headers.is_empty() {
                h.push(("access-control-request-headers", headers));
            }
            http_with(addr, "OPTIONS", "/api/rooms/r/messages", &h, None)
                .await
                .unwrap()
        }
    };
    let allow_origin = |r: &HttpResponse| {
        r.headers
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let ok = preflight("http://app.test:8080", "POST", "authorization,content-type").await;
    assert_eq!(ok.status, 204);
    assert_eq!(allow_origin(&ok).as_deref(), Some("http://app.test:8080"));
    let methods = ok.headers["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("POST"), "{methods}");
    assert!(ok.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(ok.headers["access-control-max-age"], "600");

    let read = preflight("http://else.test", "GET", "content-type").await;
    assert_eq!(
        (read.status, allow_origin(&read).as_deref()),
        (204, Some("*"))
    );
    for (method, headers) in [("POST", "content-type"), ("GET", "authorization")] {
        let r = preflight("http://else.test", method, headers).await;
        assert_eq!(r.status, 403, "{method} {headers}");
        assert_eq!(r.json()["error"], "origin_not_allowed");
        assert_eq!(allow_origin(&r), None);
    }

    // Simple requests: the answer is marked for whoever may read it, refusals included.
    let get = |origin: &'static str| {
        let addr = server.addr;
        async move {
            http_with(addr, "GET", "/api/rooms", &[("origin", origin)], None)
                .await
                .unwrap()
        }
    };
    let r = get("http://app.test:8080").await;
    assert_eq!(allow_origin(&r).as_deref(), Some("http://app.test:8080"));
    assert_eq!(r.headers["vary"], "Origin");
    assert_eq!(
        allow_origin(&get("http://else.test").await).as_deref(),
        Some("*")
    );
    let post = http_with(
        server.addr,
        "POST",
        "/api/rooms/r/messages",
        &[("origin", "http://else.test")],
        Some(r#"{"text":"x"}"#.into()),
    )
    .await
    .unwrap();
    assert_eq!(allow_origin(&post), None, "never a publish under *");
    // Not the API: no CORS.
    let page = http_with(
        server.addr,
        "GET",
        "/healthz",
        &[("origin", "http://app.test:8080")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(allow_origin(&page), None);
    let stats = http_with(server.addr, "GET", "/api/stats", &[], None)
        .await
        .unwrap()
        .json();
    assert_eq!(stats["cors_refused"], 2, "{stats}");

    // Without `*`, other origins get nothing.
    let listed_only =
        TestServer::with(|c| c.cors_origins = vec!["http://app.test:8080".into()]).await;
    let r = http_with(
        listed_only.addr,
        "GET",
        "/api/rooms",
        &[("origin", "http://else.test")],
        None,
    )
    .await
    .unwrap();
    assert_eq!((r.status, allow_origin(&r)), (200, None));
}

/// A refused chat message's error frame names its `id`, so a client with several messages in
/// flight knows which one to keep (its own copies of the others may arrive after the error).
#[tokio::test]
async fn a_refused_message_error_names_its_id() {
    let server = TestServer::with(|c| c.rate_limit = "1/m burst 1".parse().unwrap()).await;
    let (mut c, _) = Client::join(&server.ws_url("/ws/r?user=u")).await;
    c.send_json(&json!({"type": "message", "room": "elsewhere", "text": "x", "id": "m-1"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (&e["code"], &e["id"]),
        (&json!("not_joined"), &json!("m-1")),
        "{e}"
    );
    c.send_json(&json!({"text": "y", "id": "m-2"})).await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (&e["code"], &e["id"]),
        (&json!("rate_limited"), &json!("m-2")),
        "{e}"
    );
    assert!(e["retry_after_ms"].as_u64().is_some(), "{e}");
}
