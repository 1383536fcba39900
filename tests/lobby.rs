//! The `$lobby`, reserved names, and per-room settings (`--rooms-config`: passwords, member
//! caps, presence modes, reload on SIGHUP), end to end over real sockets and a real process.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{http, http_with, strip_ansi, Client, TestServer, STEP};

/// The lobby's room name, percent-encoded for a URL path.
const LOBBY_PATH: &str = "/ws/%24lobby";

/// A settings file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "roomcast-lobby-test-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn write(&self, contents: &str) {
        std::fs::write(&self.0, contents).unwrap();
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn with_rooms_config(contents: &str) -> (TestServer, TempFile) {
    let file = TempFile::new(contents);
    let path = file.path().to_owned();
    let server = TestServer::with(move |c| c.rooms_config = Some(path)).await;
    (server, file)
}

/// An upgrade request the server refuses: its status and JSON body.
async fn refused_upgrade(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let r = http_with(addr, "GET", path, &upgrade, None).await.unwrap();
    assert_ne!(r.status, 101, "{path} was upgraded");
    assert_eq!(r.headers["content-type"], "application/json", "{path}");
    (r.status, r.json())
}

/// The next lobby frame that is not a `room_counts` snapshot.
async fn next_change(lobby: &mut Client) -> Value {
    loop {
        let v = lobby.recv().await;
        if v["type"] != "room_counts" {
            return v;
        }
    }
}

#[tokio::test]
async fn lobby_announces_rooms_created_and_closed_and_their_counts() {
    let server = TestServer::start().await;
    let (mut lobby, w) = Client::join(&server.ws_url(&format!("{LOBBY_PATH}?user=watcher"))).await;
    assert_eq!(
        w,
        json!({"type": "welcome", "room": "$lobby", "user": "watcher", "members": 1, "seq": 0,
               "epoch": w["epoch"]})
    );
    // A joiner gets a first snapshot even when nothing changes.
    let first = lobby.recv().await;
    assert_eq!(
        first,
        json!({"type": "room_counts", "rooms": [], "total": 0})
    );

    // The lobby is not a room of the API.
    let (_, rooms) = server.get("/api/rooms").await;
    assert_eq!(rooms, json!({"rooms": [], "total": 0}));
    assert_eq!(server.stats().await["rooms"], 0);

    let (alice, _) = Client::join(&server.ws_url("/ws/alpha?user=alice")).await;
    assert_eq!(
        next_change(&mut lobby).await,
        json!({"type": "room_created", "room": "alpha"})
    );
    let counts = loop {
        let v = lobby.recv_type("room_counts").await;
        if v["total"] == 1 {
            break v;
        }
    };
    assert_eq!(counts["rooms"], json!([{"room": "alpha", "members": 1}]));

    // Counts follow joins.
    let (bob, _) = Client::join(&server.ws_url("/ws/alpha?user=bob")).await;
    loop {
        let v = lobby.recv_type("room_counts").await;
        if v["rooms"][0]["members"] == 2 {
            break;
        }
    }

    drop(alice);
    drop(bob);
    assert_eq!(
        next_change(&mut lobby).await,
        json!({"type": "room_closed", "room": "alpha"})
    );

    // A lobby member joined over an open socket sees the same, and leaves cleanly.
    let mut other = Client::connect(&server.ws_url("/ws?user=late")).await;
    other
        .send_json(&json!({"type": "join", "room": "$lobby"}))
        .await;
    assert_eq!(other.recv_type("welcome").await["room"], "$lobby");
    let (_beta, _) = Client::join(&server.ws_url("/ws/beta")).await;
    assert_eq!(
        next_change(&mut other).await,
        json!({"type": "room_created", "room": "beta"})
    );
    other
        .send_json(&json!({"type": "leave", "room": "$lobby"}))
        .await;
    assert_eq!(
        other.recv_type("left").await,
        json!({"type": "left", "room": "$lobby"})
    );
}

#[tokio::test]
async fn a_burst_of_500_rooms_costs_a_handful_of_lobby_frames() {
    const ROOMS: usize = 500;
    // 1,000 joins and leaves from one socket: past the default per-socket rate limit.
    let server = TestServer::with(|c| {
        c.max_rooms_per_connection = 1000;
        c.rate_limit = roomcast::config::rate::RateLimitArg(None);
    })
    .await;
    let (mut lobby, _) = Client::join(&server.ws_url(LOBBY_PATH)).await;
    // Let the joiner's first snapshot go by.
    assert_eq!(lobby.recv().await["type"], "room_counts");

    let started = Instant::now();
    let mut maker = Client::connect(&server.ws_url("/ws?user=maker")).await;
    for i in 0..ROOMS {
        maker
            .send_json(&json!({"type": "join", "room": format!("burst-{i:03}")}))
            .await;
    }
    for _ in 0..ROOMS {
        maker.recv_type("welcome").await;
    }

    // Every creation arrives, in few frames.
    let mut created = BTreeSet::new();
    let mut frames = 0usize;
    while created.len() < ROOMS {
        let v = lobby.recv().await;
        frames += 1;
        match v["type"].as_str() {
            Some("rooms_changed") => {
                assert_eq!(v["closed"], json!([]), "{v}");
                for r in v["created"].as_array().unwrap() {
                    assert!(created.insert(r.as_str().unwrap().to_owned()), "twice: {r}");
                }
            }
            Some("room_created") => {
                assert!(created.insert(v["room"].as_str().unwrap().to_owned()));
            }
            Some("room_counts") => {}
            other => panic!("unexpected lobby frame {other:?}: {v}"),
        }
    }
    let ticks = started.elapsed().as_secs() as usize + 2;
    assert_eq!(created.len(), ROOMS);
    assert!(
        created.iter().all(|r| r.starts_with("burst-")),
        "{created:?}"
    );
    // At most one change frame and one snapshot per one-second tick, whatever the burst size.
    assert!(
        frames <= 2 * ticks,
        "{frames} lobby frames for {ROOMS} rooms over {ticks} ticks"
    );
    assert!(frames < 20, "{frames} lobby frames for {ROOMS} rooms");
    println!("{ROOMS} rooms created: {frames} lobby frames");

    // The snapshot lists the busiest rooms, at most --lobby-top (50), with the true total.
    let counts = loop {
        let v = lobby.recv_type("room_counts").await;
        if v["total"] == ROOMS {
            break v;
        }
    };
    assert_eq!(counts["rooms"].as_array().unwrap().len(), 50);

    // And the closures too.
    drop(maker);
    let started = Instant::now();
    let mut closed = BTreeSet::new();
    let mut frames = 0usize;
    while closed.len() < ROOMS {
        let v = lobby.recv().await;
        frames += 1;
        match v["type"].as_str() {
            Some("rooms_changed") => {
                for r in v["closed"].as_array().unwrap() {
                    closed.insert(r.as_str().unwrap().to_owned());
                }
            }
            Some("room_closed") => {
                closed.insert(v["room"].as_str().unwrap().to_owned());
            }
            Some("room_counts") => {}
            other => panic!("unexpected lobby frame {other:?}: {v}"),
        }
    }
    assert_eq!(closed, created);
    let ticks = started.elapsed().as_secs() as usize + 2;
    assert!(frames <= 2 * ticks && frames < 20, "{frames} frames");
    println!("{ROOMS} rooms closed: {frames} lobby frames");
}

#[tokio::test]
async fn server_names_are_refused_and_the_lobby_is_read_only() {
    let server = TestServer::start().await;
    for path in [
        "/ws/%24secret",
        "/ws/$secret",
        "/ws?room=%24lobby2",
        "/ws/%24",
    ] {
        let (status, v) = refused_upgrade(server.addr, path).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("reserved_room")),
            "{path}"
        );
    }
    // `$` anywhere but first is just a bad character.
    let (status, v) = refused_upgrade(server.addr, "/ws/a%24b").await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_room")));

    // REST: no publishing into, or looking at, a server room.
    let r = http(
        server.addr,
        "POST",
        "/api/rooms/%24lobby/messages",
        Some(r#"{"text":"spam"}"#.into()),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("reserved_room"))
    );
    let (status, v) = server.get("/api/rooms/%24lobby").await;
    assert_eq!((status, v["error"].as_str()), (400, Some("reserved_room")));

    // Over a socket: joining another `$` room is refused with an error frame.
    let (mut c, _) = Client::join(&server.ws_url("/ws/%24lobby?user=c")).await;
    c.send_json(&json!({"type": "join", "room": "$private"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["room"].as_str()),
        (Some("reserved_room"), Some("$private"))
    );

    // Publishing into the lobby, by name or as the only room, is refused; nobody receives it.
    let (mut watcher, _) = Client::join(&server.ws_url(LOBBY_PATH)).await;
    c.send_json(&json!({"type": "message", "room": "$lobby", "text": "hi all"}))
        .await;
    assert_eq!(c.recv_type("error").await["code"], "reserved_room");
    c.send("plain text").await;
    assert_eq!(c.recv_type("error").await["code"], "reserved_room");

    // With one chat room besides the lobby, plain text goes to the chat room.
    c.send_json(&json!({"type": "join", "room": "chat"})).await;
    assert_eq!(c.recv_type("welcome").await["room"], "chat");
    c.send("to the chat").await;
    let m = c.recv_type("message").await;
    assert_eq!(
        (m["room"].as_str(), m["text"].as_str()),
        (Some("chat"), Some("to the chat"))
    );
    loop {
        let v = watcher.recv().await;
        assert_ne!(v["type"], "message", "a message reached the lobby: {v}");
        if v["type"] == "room_created" {
            break;
        }
    }
}

const PASSWORDS: &str = r#"
[rooms.vip]
password = "open sesame"

[rooms."team:*"]
password = "t3am"
"#;

#[tokio::test]
async fn password_protected_rooms_on_both_join_paths() {
    let (server, _file) = with_rooms_config(PASSWORDS).await;

    // Upgrade path: missing and wrong are 403 before the upgrade, with no membership.
    for path in [
        "/ws/vip?user=eve",
        "/ws/vip?user=eve&password=wrong",
        "/ws/vip?user=eve&password=open%20sesam",
        "/ws?room=team:1&password=open%20sesame",
    ] {
        let (status, v) = refused_upgrade(server.addr, path).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (403, Some("bad_password")),
            "{path}"
        );
    }
    let (status, _) = server.get("/api/rooms/vip?password=open%20sesame").await;
    assert_eq!(status, 404, "a refused join created no room");

    let (mut alice, w) =
        Client::join(&server.ws_url("/ws/vip?user=alice&password=open%20sesame")).await;
    assert_eq!(w["members"], 1);
    let (_t, w) = Client::join(&server.ws_url("/ws?room=team:1&username=t&password=t3am")).await;
    assert_eq!(w["room"], "team:1");

    // Join path over an open socket.
    let mut bob = Client::connect(&server.ws_url("/ws?user=bob")).await;
    for bad in [
        json!({"type": "join", "room": "vip"}),
        json!({"type": "join", "room": "vip", "password": "nope"}),
    ] {
        bob.send_json(&bad).await;
        let e = bob.recv_type("error").await;
        assert_eq!(
            (e["code"].as_str(), e["room"].as_str()),
            (Some("bad_password"), Some("vip")),
            "{bad}"
        );
    }
    // Not a member: a message to the room is refused and alice receives nothing.
    bob.send_json(&json!({"type": "message", "room": "vip", "text": "let me in"}))
        .await;
    assert_eq!(bob.recv_type("error").await["code"], "not_joined");
    bob.send_json(&json!({"type": "join", "room": "vip", "password": "open sesame"}))
        .await;
    let w = bob.recv_type("welcome").await;
    assert_eq!(
        (w["room"].as_str(), w["members"].as_u64()),
        (Some("vip"), Some(2))
    );
    bob.send_json(&json!({"type": "message", "room": "vip", "text": "in"}))
        .await;
    assert_eq!(alice.recv_type("message").await["text"], "in");

    // The room-info API wants what joining wants, then says the room is protected and never
    // shows the password.
    let r = http(server.addr, "GET", "/api/rooms/vip", None)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, json!("bad_password"))
    );
    let r = http_with(
        server.addr,
        "GET",
        "/api/rooms/vip",
        &[("x-room-password", "open sesame")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["password_protected"], true);
    assert!(!String::from_utf8_lossy(&r.body).contains("sesame"));
    let (_, open) = {
        let _c = Client::join(&server.ws_url("/ws/open")).await;
        server.get("/api/rooms/open").await
    };
    assert_eq!(open["password_protected"], false);
    assert_eq!(open["max_members"], Value::Null);
}

#[tokio::test]
async fn a_full_room_refuses_one_join_too_many_on_both_paths() {
    let (server, _file) = with_rooms_config("[rooms.\"small:*\"]\nmax_members = 2\n").await;
    let (a, _) = Client::join(&server.ws_url("/ws/small:1?user=a")).await;
    let (_b, _) = Client::join(&server.ws_url("/ws/small:1?user=b")).await;

    let (status, v) = refused_upgrade(server.addr, "/ws/small:1?user=c").await;
    assert_eq!((status, v["error"].as_str()), (403, Some("room_full")));

    let mut c = Client::connect(&server.ws_url("/ws?user=c")).await;
    c.send_json(&json!({"type": "join", "room": "small:1"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["room"].as_str()),
        (Some("room_full"), Some("small:1"))
    );

    let (_, info) = server.get("/api/rooms/small:1").await;
    assert_eq!(
        (info["members"].as_u64(), info["max_members"].as_u64()),
        (Some(2), Some(2))
    );

    // A place frees up: the next join gets it.
    drop(a);
    server
        .wait_for("/api/rooms/small:1", "a member to leave", |_, v| {
            v["members"] == 1
        })
        .await;
    c.send_json(&json!({"type": "join", "room": "small:1"}))
        .await;
    assert_eq!(c.recv_type("welcome").await["members"], 2);
    // Other rooms are not capped.
    let mut big = Vec::new();
    for i in 0..3 {
        let (c, w) = Client::join(&server.ws_url(&format!("/ws/big?user=u{i}"))).await;
        assert_eq!(w["members"], i + 1);
        big.push(c);
    }
}

#[tokio::test]
async fn presence_modes_counts_and_off() {
    let (server, _file) = with_rooms_config(
        "[rooms.quiet]\npresence = \"off\"\n[rooms.counted]\npresence = \"counts\"\n",
    )
    .await;

    let (mut a, _) = Client::join(&server.ws_url("/ws/counted?user=a")).await;
    let (_b, _) = Client::join(&server.ws_url("/ws/counted?user=b")).await;
    let p = loop {
        let p = a.recv_type("presence").await;
        if p["members"] == 2 {
            break p;
        }
    };
    assert_eq!(
        (p["joined"].clone(), p["left"].clone()),
        (json!([]), json!([])),
        "{p}"
    );

    let (mut q, _) = Client::join(&server.ws_url("/ws/quiet?user=q")).await;
    let (_r, _) = Client::join(&server.ws_url("/ws/quiet?user=r")).await;
    // Publish after the joins: the message must be the first thing q sees, no presence before.
    let (status, _) = server
        .post("/api/rooms/quiet/messages", r#"{"text":"marker"}"#)
        .await;
    assert_eq!(status, 202);
    let v = q.recv().await;
    assert_eq!(
        (v["type"].as_str(), v["text"].as_str()),
        (Some("message"), Some("marker"))
    );
    // Longer than a presence interval: still nothing.
    match q.try_recv(Duration::from_millis(600)).await {
        Err(e) => assert!(e.to_string().starts_with("no frame"), "{e}"),
        Ok(v) => panic!("presence is off, got {v}"),
    }
}

#[test]
fn a_bad_config_file_stops_the_server_naming_file_line_and_key() {
    let file =
        TempFile::new("[defaults]\nmax_members = 10\n\n[rooms.\"post:*\"]\npresense = \"off\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--listen", "127.0.0.1:0", "--rooms-config"])
        .arg(file.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let expected = format!(
        "{}:5:1: key `rooms.\"post:*\".presense`: unknown field",
        file.path().display()
    );
    assert!(stderr.contains(&expected), "stderr: {stderr}");

    let file = TempFile::new("[rooms.a]\nmax_members = -1\n");
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--listen", "127.0.0.1:0", "--rooms-config"])
        .arg(file.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(":2:") && stderr.contains("key `rooms.a.max_members`"),
        "{stderr}"
    );
}

/// A real roomcast process; killed when dropped.
struct Process {
    child: Child,
    addr: std::net::SocketAddr,
    /// Every line it logs (stdout and stderr).
    lines: mpsc::Receiver<String>,
}

impl Process {
    fn start(config: &Path) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--listen", "127.0.0.1:0", "--rooms-config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .env("ROOMCAST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(strip_ansi(&line)).is_err() {
                        return;
                    }
                }
            });
        }
        let mut p = Process {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            lines,
        };
        let line = p.wait_line("roomcast listening");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        p.addr = addr
            .parse()
            .unwrap_or_else(|_| panic!("bad address in {line:?}"));
        p
    }

    /// The first log line containing `needle`, or a panic after `STEP`.
    fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?} within {STEP:?}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether joining `vip` with `password` is let in (101) or refused (403), via a real upgrade.
async fn vip_lets_in(addr: std::net::SocketAddr, password: &str) -> bool {
    let url = format!("ws://{addr}/ws/vip?password={password}");
    match Client::try_connect(&url).await {
        Ok(_) => true,
        Err(e) => {
            let refused = e.to_string().contains("403");
            assert!(refused, "neither in nor refused: {e}");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_file_and_keeps_the_settings_on_a_bad_one() {
    let file = TempFile::new("[rooms.vip]\npassword = \"one\"\n");
    let process = tokio::task::spawn_blocking({
        let path = file.path().to_owned();
        move || Process::start(&path)
    })
    .await
    .unwrap();
    let addr = process.addr;
    assert!(vip_lets_in(addr, "one").await);
    assert!(!vip_lets_in(addr, "two").await);

    // A good file: the new password is in force, the old one no longer.
    file.write("[rooms.vip]\npassword = \"two\"\nmax_members = 5\n");
    process.signal("HUP");
    let process = tokio::task::spawn_blocking(move || {
        process.wait_line("rooms config reloaded");
        process
    })
    .await
    .unwrap();
    assert!(vip_lets_in(addr, "two").await);
    assert!(!vip_lets_in(addr, "one").await);

    // A bad file: logged with its line and key; the previous settings stay.
    file.write("[rooms.vip]\npassword = \"three\"\nmax_members = \"many\"\n");
    process.signal("HUP");
    let (process, line) = tokio::task::spawn_blocking(move || {
        let line = process.wait_line("not reloaded");
        (process, line)
    })
    .await
    .unwrap();
    assert!(
        line.contains(":3:") && line.contains("key `rooms.vip.max_members`"),
        "{line}"
    );
    assert!(vip_lets_in(addr, "two").await);
    assert!(!vip_lets_in(addr, "three").await);

    // The process still answers and shuts down cleanly.
    let (status, _) = {
        let r = http(addr, "GET", "/healthz", None).await.unwrap();
        (r.status, ())
    };
    assert_eq!(status, 200);
    process.signal("TERM");
    let mut process = process;
    let exit = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn a_room_password_travels_off_the_url_as_a_subprotocol() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    // A password with the characters a subprotocol token could not carry as they are.
    let (server, _file) =
        with_rooms_config("[rooms.vip]\npassword = \"open sesame, = ok\"\n").await;
    let offer = |password: &str| {
        let mut req = server
            .ws_url("/ws/vip?user=alice")
            .into_client_request()
            .unwrap();
        let value = format!("roomcast, password.{}", URL_SAFE_NO_PAD.encode(password));
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&value).unwrap(),
        );
        req
    };
    let (ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(offer("open sesame, = ok")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "roomcast");
    let mut alice = Client { ws };
    assert_eq!(alice.recv_type("welcome").await["room"], "vip");

    let wrong = tokio_tungstenite::connect_async(offer("open sesame")).await;
    assert!(
        wrong.is_err(),
        "a wrong password is refused before the upgrade"
    );
    let r = http_with(
        server.addr,
        "GET",
        "/ws/vip?user=eve",
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-protocol", "roomcast, password.not base64!"),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_password"))
    );
}

#[test]
fn a_bad_route_template_stops_the_server_naming_its_position() {
    for (text, expected, why) in [
        (
            "[routes]\n\"/ws/posts/{id}/live\" = \"post:{id}\"\n\"/ws/x/{id\" = \"{id}\"\n",
            ":3:1: key `routes.\"/ws/x/{id\"`",
            "unbalanced",
        ),
        (
            "[routes]\n\"/live/{id}\" = \"post:{slug}\"\n",
            ":2:16: key `routes.\"/live/{id}\"`",
            "not in the path",
        ),
        (
            "[routes]\n\"/a/{x}\" = \"{x}\"\n\"/a/{y}\" = \"{y}\"\n",
            ":3:12: key `routes.\"/a/{y}\"`",
            "same paths",
        ),
        (
            "[routes]\n\"/ws/{room}\" = \"{room}\"\n",
            ":2:1: key `routes.\"/ws/{room}\"`",
            "server answers itself",
        ),
    ] {
        let file = TempFile::new(text);
        let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--listen", "127.0.0.1:0", "--rooms-config"])
            .arg(file.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{text}: exit status {:?}",
            out.status
        );
        let expected = format!("{}{expected}", file.path().display());
        assert!(
            stderr.contains(&expected) && stderr.contains(why),
            "{text}: stderr: {stderr}"
        );
    }
}

/// The room an upgrade on `path` lands in (its welcome's), or the refusal's status.
async fn routed_room(addr: std::net::SocketAddr, path: &str) -> Result<String, u16> {
    match Client::try_connect(&format!("ws://{addr}{path}")).await {
        Ok(mut c) => Ok(c.recv_type("welcome").await["room"]
            .as_str()
            .unwrap_or_default()
            .to_owned()),
        Err(_) => Err(refused_upgrade(addr, path).await.0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_route_table_and_a_bad_one_keeps_the_old() {
    let file = TempFile::new("[routes]\n\"/live/{id}\" = \"post:{id}\"\n");
    let process = tokio::task::spawn_blocking({
        let path = file.path().to_owned();
        move || Process::start(&path)
    })
    .await
    .unwrap();
    let addr = process.addr;
    assert_eq!(routed_room(addr, "/live/1").await, Ok("post:1".to_owned()));
    assert_eq!(routed_room(addr, "/feed/1").await, Err(404));

    // A changed table: the new template leads in, the old one no longer does.
    file.write("[routes]\n\"/feed/{id}\" = \"feed:{id}\"\n");
    process.signal("HUP");
    support::eventually("the new routes", Duration::from_millis(20), || async {
        (routed_room(addr, "/feed/1").await == Ok("feed:1".to_owned())).then_some(())
    })
    .await;
    assert_eq!(routed_room(addr, "/live/1").await, Err(404));

    // A bad table is refused, counted, and the routes in force stay.
    file.write("[routes]\n\"/feed/{id}\" = \"x:{id}\"\n\"/feed/{other}\" = \"y:{other}\"\n");
    process.signal("HUP");
    support::eventually("the refusal counted", Duration::from_millis(20), || async {
        let r = http(addr, "GET", "/api/stats", None).await.ok()?;
        (r.json()["rooms_config_reloads_refused"] == 1).then_some(())
    })
    .await;
    let (_process, line) = tokio::task::spawn_blocking(move || {
        let line = process.wait_line("not reloaded");
        (process, line)
    })
    .await
    .unwrap();
    assert!(
        line.contains(":3:") && line.contains("same paths"),
        "{line}"
    );
    assert_eq!(routed_room(addr, "/feed/2").await, Ok("feed:2".to_owned()));
}
