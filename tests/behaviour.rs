//! One behaviour, whatever the deployment: every check here runs against a server on its own
//! and against two `roomcast` processes on a real `redis-server`, and expects the same frames,
//! the same status codes, the same counters and the same room info fields.
//!
//! In cluster mode, `a` and `b` are two processes; standalone they are the same one. The
//! cluster runs need `redis-server` (`#[ignore = "needs redis-server"]`; `scripts/test.sh` runs
//! them).

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use support::deployment::Deployment;
use support::nodes::Node;
use support::Client;

/// The fields of `GET /api/rooms/{room}`, in every mode.
const ROOM_INFO: &[&str] = &[
    "room",
    "members",
    "local_members",
    "users",
    "next_users_after",
    "published",
    "evicted",
    "last_seq",
    "created_at",
    "messages_per_sec",
    "p99_wait_ms",
    "password_protected",
    "max_members",
];

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

in_both_modes!(chat_frames_and_room_info);
async fn chat_frames_and_room_info(d: Deployment) {
    let (mut alice, welcome) = Client::join(&d.a().ws("/ws/r?user=alice")).await;
    assert_eq!(
        keys(&welcome),
        set(&["type", "room", "user", "members", "seq", "epoch", "users"])
    );
    let (mut bob, _) = Client::join(&d.b().ws("/ws/r?user=bob")).await;
    d.wait_members("r", 2).await;

    alice.send("hello").await;
    let mine = alice.recv_type("message").await;
    let theirs = bob.recv_type("message").await;
    assert_eq!(mine, theirs, "one frame for every member");
    assert_eq!(
        keys(&mine),
        set(&["type", "room", "user", "text", "seq", "ts"])
    );
    assert_eq!(
        (mine["user"].as_str(), mine["seq"].as_u64()),
        (Some("alice"), Some(1))
    );

    for node in &d.nodes {
        let (status, info) = node.get("/api/rooms/r").await;
        assert_eq!(status, 200);
        assert_eq!(keys(&info), set(ROOM_INFO), "{info}");
        assert_eq!(info["members"], 2);
        assert_eq!(info["last_seq"], 1);
        assert!(info["created_at"].is_u64(), "{info}");
        let (status, list) = node.get("/api/rooms").await;
        assert_eq!(status, 200);
        assert_eq!(list["total"], 1, "{list}");
        assert_eq!(
            keys(&list["rooms"][0]),
            set(&["room", "members", "local_members", "password_protected"])
        );
        assert_eq!(list["rooms"][0]["members"], 2);
    }
    let total_local: u64 = {
        let mut n = 0;
        for node in &d.nodes {
            n += node.get("/api/rooms/r").await.1["local_members"]
                .as_u64()
                .unwrap_or(0);
        }
        n
    };
    assert_eq!(total_local, 2, "each member is local to exactly one node");
}

in_both_modes!(rest_publish_answers);
async fn rest_publish_answers(d: Deployment) {
    let (mut alice, _) = Client::join(&d.a().ws("/ws/r?user=alice")).await;
    d.wait_members("r", 1).await;
    let (status, v) = d
        .b()
        .post("/api/rooms/r/messages", &json!({"text": "from a backend"}))
        .await;
    assert_eq!((status, v.clone()), (202, json!({"room": "r", "seq": 1})));
    let m = alice.recv_type("message").await;
    assert_eq!(
        (m["user"].as_str(), m["seq"].as_u64()),
        (Some("api"), Some(1))
    );

    let (status, v) = d
        .b()
        .post("/api/rooms/empty/messages", &json!({"text": "x"}))
        .await;
    assert_eq!((status, v["error"].as_str()), (404, Some("no_such_room")));
    let (status, v) = d
        .b()
        .post("/api/rooms/r/messages", &json!({"text": 5}))
        .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_message")));
    let (status, v) = d.b().get("/api/rooms/empty").await;
    assert_eq!((status, v["error"].as_str()), (404, Some("no_such_room")));
    let (status, v) = d.b().get("/api/rooms?limit=0").await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_param")));
}

in_both_modes!(
    room_rate_limit_is_counted_for_sockets_and_rest,
    "--room-rate-limit",
    "1/m"
);
async fn room_rate_limit_is_counted_for_sockets_and_rest(d: Deployment) {
    let (mut alice, _) = Client::join(&d.a().ws("/ws/r?user=alice")).await;
    alice.send("one").await;
    assert_eq!(alice.recv_type("message").await["text"], "one");
    alice.send("two").await;
    let refused = alice.recv_type("error").await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().unwrap() > 0);
    let (status, v) = d
        .a()
        .post("/api/rooms/r/messages", &json!({"text": "three"}))
        .await;
    assert_eq!((status, v["error"].as_str()), (429, Some("rate_limited")));
    assert!(v["retry_after_ms"].as_u64().unwrap() > 0);
    let (_, stats) = d.a().get("/api/stats").await;
    assert_eq!(
        stats["rate_limited"], 2,
        "one socket refusal, one REST refusal: {stats}"
    );
}

in_both_modes!(refusals_are_error_frames_and_the_lobby_is_read_only);
async fn refusals_are_error_frames_and_the_lobby_is_read_only(d: Deployment) {
    let mut c = Client::connect(&d.b().ws("/ws?user=carol")).await;
    c.send_json(&json!({"type": "join", "room": "$secret"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(e["code"], "reserved_room", "{e}");
    c.send_json(&json!({"type": "join", "room": "$lobby"}))
        .await;
    assert_eq!(c.recv_type("welcome").await["room"], "$lobby");
    c.send_json(&json!({"type": "message", "room": "$lobby", "text": "x"}))
        .await;
    assert_eq!(c.recv_type("error").await["code"], "reserved_room");
    c.send_json(&json!({"type": "dance"})).await;
    assert_eq!(c.recv_type("error").await["code"], "unknown_type");
    // The lobby is each process's own: it hears of the rooms this process holds.
    let (_dave, _) = Client::join(&d.b().ws("/ws/lobbied?user=dave")).await;
    loop {
        let v = c.recv().await;
        if v["type"] == "room_counts" && v["rooms"][0]["room"] == "lobbied" {
            assert_eq!(v["rooms"][0]["members"], 1, "{v}");
            break;
        }
    }
}

in_both_modes!(a_repeated_id_is_acknowledged_not_broadcast);
async fn a_repeated_id_is_acknowledged_not_broadcast(d: Deployment) {
    let (mut alice, _) = Client::join(&d.a().ws("/ws/r?user=alice")).await;
    let msg = json!({"text": "once", "id": "k-1"});
    alice.send_json(&msg).await;
    let first = alice.recv_type("message").await;
    alice.send_json(&msg).await;
    let ack = alice.recv_type("ack").await;
    assert_eq!(
        ack,
        json!({"type": "ack", "room": "r", "id": "k-1", "seq": first["seq"], "duplicate": true})
    );
    let body = json!({"text": "rest", "id": "k-2"});
    let (status, v) = d.a().post("/api/rooms/r/messages", &body).await;
    assert_eq!((status, v["duplicate"].as_bool()), (202, Some(false)));
    // In cluster mode the first copy comes back through Redis; a retry is recognised once it
    // has (the wait keeps the check deterministic).
    assert_eq!(alice.recv_type("message").await["id"], "k-2");
    let (status, again) = d.a().post("/api/rooms/r/messages", &body).await;
    assert_eq!((status, again["duplicate"].as_bool()), (202, Some(true)));
    assert_eq!(again["seq"], v["seq"]);
    let (_, stats) = d.a().get("/api/stats").await;
    assert_eq!(stats["duplicates"], 2, "{stats}");
}

const SECRET: &str = "behaviour-secret-of-reasonable-length";
const API_KEY: &str = "behaviour-api-key";

fn token(sub: &str, rooms: Option<&str>) -> String {
    roomcast::core::auth::issue(SECRET, sub, rooms, std::time::Duration::from_secs(3600)).unwrap()
}

/// A rooms file with one password room and one private room, written once per test process and left in the temp
/// directory (its name carries the process id).
fn rooms_file() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "roomcast-behaviour-rooms-{}.toml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "[rooms.vault]\npassword = \"s3same\"\n[rooms.staff]\nprivate = true\n\
             [rooms.club]\npassword = \"s3club\"\nprivate = false\n",
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    })
}

/// A GET with `Authorization: Bearer` when `auth` is given: its status and JSON body.
async fn get_with(node: &Node, path: &str, auth: Option<&str>) -> (u16, Value) {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let r = support::http_with(node.addr, "GET", path, &headers, None)
        .await
        .unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

/// An upgrade the server refuses before the 101: its status and the JSON body's `error`.
async fn refused_upgrade(node: &Node, path: &str) -> (u16, Value) {
    let r = support::http_with(node.addr, "GET", path, &support::UPGRADE_HEADERS, None)
        .await
        .unwrap();
    (r.status, r.json()["error"].clone())
}

/// Room names of a `GET /api/rooms` answer.
fn listed(v: &Value) -> Vec<String> {
    let mut names: Vec<String> = v["rooms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["room"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Frames a `$lobby` member gets until a `room_counts` lists `until` (which must show up).
async fn lobby_until(lobby: &mut Client, until: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = lobby.recv().await;
        let done = v["type"] == "room_counts"
            && v["rooms"]
                .as_array()
                .is_some_and(|rooms| rooms.iter().any(|r| r["room"] == until));
        seen.push(v);
        if done {
            return seen;
        }
    }
}

/// A REST publish with headers: its status and JSON body.
async fn post_with(node: &Node, path: &str, auth: Option<&str>, body: &Value) -> (u16, Value) {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let r = support::http_with(node.addr, "POST", path, &headers, Some(body.to_string()))
        .await
        .unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

in_both_modes!(
    rest_publish_needs_the_key_or_a_token_when_tokens_are_on,
    "--jwt-secret",
    SECRET,
    "--api-key",
    API_KEY,
    "--rooms-config",
    rooms_file()
);
async fn rest_publish_needs_the_key_or_a_token_when_tokens_are_on(d: Deployment) {
    let watcher = token("watcher", None);
    let (mut open, _) = Client::join(&d.a().ws(&format!("/ws/open?token={watcher}"))).await;
    let (mut vault, _) = Client::join(
        &d.a()
            .ws(&format!("/ws/vault?token={watcher}&password=s3same")),
    )
    .await;
    d.wait_members("open", 1).await;
    d.wait_members("vault", 1).await;
    let admin = json!({"text": "x", "user": "admin"});
    let b = d.b();

    // Nobody: no token, no key.
    for room in ["open", "vault"] {
        let (status, v) = post_with(b, &format!("/api/rooms/{room}/messages"), None, &admin).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (401, Some("unauthorized")),
            "{room}: {v}"
        );
    }
    // A token for other rooms only; a token whose sub is not the body's user.
    let mallory = token("mallory", Some("elsewhere"));
    let (status, v) = post_with(b, "/api/rooms/open/messages", Some(&mallory), &admin).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("forbidden_room")),
        "{v}"
    );
    let bob = token("bob", Some("open,vault"));
    let (status, v) = post_with(b, "/api/rooms/open/messages", Some(&bob), &admin).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("forbidden_user")),
        "{v}"
    );
    // A password room wants its password from a token holder.
    let (status, v) = post_with(
        b,
        "/api/rooms/vault/messages",
        Some(&bob),
        &json!({"text": "x"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("bad_password")),
        "{v}"
    );
    let wrong = json!({"text": "x", "password": "guess"});
    let (status, v) = post_with(b, "/api/rooms/vault/messages", Some(&bob), &wrong).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("bad_password")),
        "{v}"
    );
    let (_, stats) = b.get("/api/stats").await;
    assert_eq!(
        stats["auth_refused"], 6,
        "every refusal is counted: {stats}"
    );

    // Allowed: a token publishes as its sub (body password or query password), the key as the
    // body's user, into any room.
    let (status, _) = post_with(
        b,
        "/api/rooms/open/messages",
        Some(&bob),
        &json!({"text": "t1", "user": "bob"}),
    )
    .await;
    assert_eq!(status, 202);
    let right = json!({"text": "t2", "password": "s3same"});
    let (status, _) = post_with(b, "/api/rooms/vault/messages", Some(&bob), &right).await;
    assert_eq!(status, 202);
    let (status, _) = post_with(
        b,
        "/api/rooms/vault/messages?password=s3same",
        Some(&bob),
        &json!({"text": "t3"}),
    )
    .await;
    assert_eq!(status, 202);
    let keyed = json!({"text": "t4", "user": "ops"});
    let (status, _) = post_with(b, "/api/rooms/vault/messages", Some(API_KEY), &keyed).await;
    assert_eq!(status, 202);

    let m = open.recv_type("message").await;
    assert_eq!(
        (m["user"].as_str(), m["text"].as_str()),
        (Some("bob"), Some("t1")),
        "{m}"
    );
    for (user, text) in [("bob", "t2"), ("bob", "t3"), ("ops", "t4")] {
        let m = vault.recv_type("message").await;
        assert_eq!(
            (m["user"].as_str(), m["text"].as_str()),
            (Some(user), Some(text)),
            "{m}"
        );
    }
    open.expect_silence(std::time::Duration::from_millis(200))
        .await;
    vault
        .expect_silence(std::time::Duration::from_millis(200))
        .await;
}

in_both_modes!(
    rest_publish_with_tokens_and_no_key_is_not_open,
    "--jwt-secret",
    SECRET
);
async fn rest_publish_with_tokens_and_no_key_is_not_open(d: Deployment) {
    let watcher = token("watcher", Some("r"));
    let (mut member, _) = Client::join(&d.a().ws(&format!("/ws/r?token={watcher}"))).await;
    d.wait_members("r", 1).await;
    let admin = json!({"text": "x", "user": "admin"});
    let (status, v) = d.b().post("/api/rooms/r/messages", &admin).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let (_, stats) = d.b().get("/api/stats").await;
    assert_eq!(stats["auth_refused"], 1, "{stats}");
    let (status, _) = post_with(
        d.b(),
        "/api/rooms/r/messages",
        Some(&watcher),
        &json!({"text": "y"}),
    )
    .await;
    assert_eq!(status, 202);
    let m = member.recv_type("message").await;
    assert_eq!(
        (m["user"].as_str(), m["text"].as_str()),
        (Some("watcher"), Some("y")),
        "{m}"
    );
}

in_both_modes!(
    an_open_rest_publish_still_needs_a_rooms_password,
    "--rooms-config",
    rooms_file()
);
/// Without tokens or a key REST publishing is open; a password room still wants its password.
async fn an_open_rest_publish_still_needs_a_rooms_password(d: Deployment) {
    let (mut vault, _) = Client::join(&d.a().ws("/ws/vault?user=v&password=s3same")).await;
    d.wait_members("vault?password=s3same", 1).await;
    let admin = json!({"text": "x", "user": "admin"});
    let (status, v) = d.b().post("/api/rooms/vault/messages", &admin).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("bad_password")),
        "{v}"
    );
    let (_, stats) = d.b().get("/api/stats").await;
    assert_eq!(stats["auth_refused"], 1, "{stats}");
    let (status, _) = d
        .b()
        .post(
            "/api/rooms/vault/messages?password=s3same",
            &json!({"text": "in"}),
        )
        .await;
    assert_eq!(status, 202);
    let m = vault.recv_type("message").await;
    assert_eq!(
        (m["user"].as_str(), m["text"].as_str()),
        (Some("api"), Some("in")),
        "{m}"
    );
}

/// Ids are deduplicated per author: a member who sees another's ids cannot use them up first.
async fn nobody_suppresses_another_members_message(
    d: &Deployment,
    alice: &str,
    mallory: &str,
) -> (Client, Client) {
    let (mut alice, _) = Client::join(&d.a().ws(alice)).await;
    let (mut mallory, _) = Client::join(&d.b().ws(mallory)).await;
    d.wait_members("r", 2).await;
    alice.send_json(&json!({"text": "one", "id": "c-2"})).await;
    // Every member, the sender included, gets each message with its id.
    assert_eq!(alice.recv_type("message").await["id"], "c-2");
    assert_eq!(mallory.recv_type("message").await["id"], "c-2");
    // Mallory guesses Alice's next id and sends it first; Alice's process has seen it (in
    // cluster mode through Redis) before Alice sends hers.
    mallory
        .send_json(&json!({"text": "spoof", "id": "c-3"}))
        .await;
    for c in [&mut alice, &mut mallory] {
        let spoof = c.recv_type("message").await;
        assert_eq!(
            (spoof["text"].as_str(), spoof["id"].as_str()),
            (Some("spoof"), Some("c-3"))
        );
    }
    alice.send_json(&json!({"text": "real", "id": "c-3"})).await;
    let m = mallory.recv_type("message").await;
    assert_eq!(
        (m["text"].as_str(), m["id"].as_str()),
        (Some("real"), Some("c-3")),
        "Alice's own c-3 is delivered: {m}"
    );
    // Her own retry is still recognised.
    assert_eq!(alice.recv_type("message").await["text"], "real");
    alice.send_json(&json!({"text": "real", "id": "c-3"})).await;
    let ack = alice.recv_type("ack").await;
    assert_eq!(
        (ack["duplicate"].as_bool(), &ack["seq"]),
        (Some(true), &m["seq"]),
        "{ack}"
    );
    (alice, mallory)
}

in_both_modes!(ids_are_each_connections_own);
async fn ids_are_each_connections_own(d: Deployment) {
    let (mut alice, mut mallory) =
        nobody_suppresses_another_members_message(&d, "/ws/r?user=alice", "/ws/r?user=mallory")
            .await;
    // The REST API (open here) is an author of its own: its ids are not Alice's either.
    let (status, _) = d
        .b()
        .post(
            "/api/rooms/r/messages",
            &json!({"text": "rest", "id": "c-5"}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(alice.recv_type("message").await["text"], "rest");
    alice.send_json(&json!({"text": "mine", "id": "c-5"})).await;
    let m = mallory.recv_type("message").await;
    assert_eq!(m["text"], "rest");
    let m = mallory.recv_type("message").await;
    assert_eq!(
        (m["text"].as_str(), m["user"].as_str()),
        (Some("mine"), Some("alice")),
        "{m}"
    );
}

in_both_modes!(ids_are_each_token_users_own, "--jwt-secret", SECRET);
async fn ids_are_each_token_users_own(d: Deployment) {
    let alice = format!("/ws/r?token={}", token("alice", None));
    let mallory = format!("/ws/r?token={}", token("mallory", None));
    // Kept so that the room stays alive for the REST retry below.
    let _members = nobody_suppresses_another_members_message(&d, &alice, &mallory).await;
    // A token user's ids span its sockets and its REST calls: a retry elsewhere is a repeat.
    let (status, v) = post_with(
        d.b(),
        "/api/rooms/r/messages",
        Some(&token("alice", None)),
        &json!({"text": "real", "id": "c-3"}),
    )
    .await;
    assert_eq!((status, v["duplicate"].as_bool()), (202, Some(true)), "{v}");
}

in_both_modes!(
    private_rooms_stay_unlisted,
    "--rooms-config",
    rooms_file(),
    "--api-key",
    API_KEY
);
/// A private room and a password room are never listed nor announced, except to the API key,
/// and a password room's info wants its password.
async fn private_rooms_stay_unlisted(d: Deployment) {
    // The lobby is each process's own: it watches the process the rooms are made on.
    let (mut lobby, _) = Client::join(&d.a().ws("/ws/$lobby?user=watcher")).await;
    let (_staff, _) = Client::join(&d.a().ws("/ws/staff?user=s")).await;
    let (_vault, _) = Client::join(&d.a().ws("/ws/vault?user=v&password=s3same")).await;
    let (_open, _) = Client::join(&d.a().ws("/ws/open?user=o")).await;
    let told = lobby_until(&mut lobby, "open").await;
    let told = Value::Array(told).to_string();
    assert!(
        !told.contains("staff") && !told.contains("vault"),
        "the lobby announced a private room: {told}"
    );
    d.wait_members("open", 1).await;
    d.wait_members("vault?password=s3same", 1).await;

    for node in &d.nodes {
        let (status, v) = node.get("/api/rooms").await;
        assert_eq!(status, 200);
        assert_eq!(listed(&v), ["open"], "{v}");
        assert_eq!(v["total"], 1, "{v}");
        let (_, v) = get_with(node, "/api/rooms", Some(API_KEY)).await;
        assert_eq!(
            listed(&v),
            ["open", "staff", "vault"],
            "the key sees all: {v}"
        );
    }
    let b = d.b();
    for path in ["/api/rooms/vault", "/api/rooms/vault?password=nope"] {
        let (status, v) = b.get(path).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (403, Some("bad_password")),
            "{path}: the members of a password room are for those who may join it"
        );
    }
    let (status, v) = b.get("/api/rooms/vault?password=s3same").await;
    assert_eq!((status, v["members"].as_u64()), (200, Some(1)), "{v}");
    let (status, _) = get_with(b, "/api/rooms/vault", Some(API_KEY)).await;
    assert_eq!(status, 200);
    let (_, stats) = b.get("/api/stats").await;
    assert_eq!(
        stats["auth_refused_by_reason"]["bad_password"], 2,
        "{stats}"
    );
}

in_both_modes!(
    tokens_bound_what_listings_show,
    "--jwt-secret",
    SECRET,
    "--rooms-config",
    rooms_file()
);
/// With tokens on, the room list, room info and the `$lobby` show a caller only the rooms its
/// grant covers, and joining the lobby is itself a grant.
async fn tokens_bound_what_listings_show(d: Deployment) {
    let no_lobby = token("p", Some("post:*"));
    assert_eq!(
        refused_upgrade(d.a(), &format!("/ws/$lobby?token={no_lobby}")).await,
        (403, json!("forbidden_room")),
        "a token without `$lobby` may not watch the lobby"
    );

    let poster = token("p", Some("post:*,$lobby"));
    let everyone = token("e", None);
    let (mut posts_lobby, _) = Client::join(&d.a().ws(&format!("/ws/$lobby?token={poster}"))).await;
    let (mut all_lobby, _) = Client::join(&d.a().ws(&format!("/ws/$lobby?token={everyone}"))).await;
    let (_g, _) = Client::join(&d.a().ws(&format!("/ws/general?token={everyone}"))).await;
    let (_s, _) = Client::join(&d.a().ws(&format!("/ws/staff?token={everyone}"))).await;
    let (_p, _) = Client::join(&d.a().ws(&format!("/ws/post:1?token={everyone}"))).await;
    let seen = Value::Array(lobby_until(&mut posts_lobby, "post:1").await).to_string();
    assert!(
        !seen.contains("general") && !seen.contains("staff"),
        "the lobby showed a room the grant does not cover: {seen}"
    );
    let seen = Value::Array(lobby_until(&mut all_lobby, "general").await).to_string();
    assert!(
        !seen.contains("staff"),
        "a private room was announced: {seen}"
    );
    d.wait_members("post:1", 1).await;
    d.wait_members("general", 1).await;

    let b = d.b();
    let (status, v) = b.get("/api/rooms").await;
    assert_eq!((status, v["error"].as_str()), (401, Some("unauthorized")));
    let (status, v) = get_with(b, "/api/rooms", Some(&poster)).await;
    assert_eq!(
        (status, listed(&v)),
        (200, vec!["post:1".to_owned()]),
        "{v}"
    );
    let (_, v) = get_with(b, "/api/rooms", Some(&everyone)).await;
    assert_eq!(listed(&v), ["general", "post:1"], "{v}");
    let (status, v) = get_with(b, "/api/rooms/general", Some(&poster)).await;
    assert_eq!((status, v["error"].as_str()), (403, Some("forbidden_room")));
    let (status, _) = b.get("/api/rooms/general").await;
    assert_eq!(status, 401);
    let (status, v) = get_with(b, "/api/rooms/post:1", Some(&poster)).await;
    assert_eq!((status, v["members"].as_u64()), (200, Some(1)), "{v}");
}

in_both_modes!(
    password_guesses_are_locked_out,
    "--rooms-config",
    rooms_file()
);
/// Wrong passwords from one address for one room: a few are answered, then every attempt is
/// refused unseen for a while, on every path, and counted with its reason.
async fn password_guesses_are_locked_out(d: Deployment) {
    let a = d.a();
    let upgrade = |password: &'static str| async move {
        support::http_with(
            a.addr,
            "GET",
            &format!("/ws/vault?user=g&password={password}"),
            &support::UPGRADE_HEADERS,
            None,
        )
        .await
        .unwrap()
    };
    let mut answers = Vec::new();
    for _ in 0..8 {
        let r = upgrade("guess").await;
        answers.push(r.status);
        if r.status == 429 {
            let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
            assert_eq!(r.json()["error"], "too_many_failures");
            assert!(r.json()["retry_after_ms"].as_u64().unwrap() > 0);
        }
    }
    assert_eq!(
        answers[..6],
        [403; 6],
        "a few wrong passwords are answered: {answers:?}"
    );
    assert_eq!(
        answers[6..],
        [429; 2],
        "then the address is locked out: {answers:?}"
    );
    // Even the right password waits now, on every path that takes one.
    assert_eq!(upgrade("s3same").await.status, 429);
    let (status, v) = a.get("/api/rooms/vault/messages?password=s3same").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (429, Some("too_many_failures"))
    );
    let mut c = Client::connect(&a.ws("/ws?user=g")).await;
    c.send_json(&json!({"type": "join", "room": "vault", "password": "s3same"}))
        .await;
    let e = c.recv_type("error").await;
    assert_eq!(e["code"], "too_many_failures", "{e}");
    assert!(e["retry_after_ms"].as_u64().unwrap() > 0, "{e}");
    // Other rooms are not touched.
    c.send_json(&json!({"type": "join", "room": "open"})).await;
    assert_eq!(c.recv_type("welcome").await["room"], "open");

    let (_, stats) = a.get("/api/stats").await;
    assert_eq!(
        stats["auth_refused_by_reason"]["bad_password"], 6,
        "{stats}"
    );
    assert_eq!(
        stats["auth_refused_by_reason"]["too_many_failures"], 5,
        "{stats}"
    );
    let r = support::http(a.addr, "GET", "/metrics", None)
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&r.body);
    assert!(
        metrics.contains("roomcast_auth_refused_total{reason=\"too_many_failures\"} 5"),
        "{metrics}"
    );
}

in_both_modes!(
    presence_frames_say_when_names_were_left_out,
    "--presence-interval",
    "3s"
);
/// 250 joins in one or two presence intervals: a frame lists at most 100 names, says
/// `truncated`, and the names left out are counted.
async fn presence_frames_say_when_names_were_left_out(d: Deployment) {
    support::raise_nofile();
    let (mut alice, _) = Client::join(&d.a().ws("/ws/crowd?user=alice")).await;
    let joins = (0..250).map(|i| {
        let url = d.b().ws(&format!("/ws/crowd?user=u{i}"));
        async move { Client::join(&url).await.0 }
    });
    let _crowd = futures_util::future::join_all(joins).await;
    d.wait_members("crowd", 251).await;
    let mut truncated = None;
    let mut named = 0;
    while named < 250 && truncated.is_none() {
        let p = alice.recv_type("presence").await;
        let joined = p["joined"].as_array().unwrap().len();
        assert!(joined <= 100, "{joined} names in one frame");
        named += joined;
        if p["truncated"] == true {
            truncated = Some(p);
        } else {
            assert!(p.get("truncated").is_none(), "only ever `true`: {p}");
        }
    }
    let p = truncated.expect("a frame says truncated");
    assert_eq!(p["joined"].as_array().unwrap().len(), 100, "{p}");
    let dropped = d.b().get("/api/stats").await.1["presence_names_dropped"]
        .as_u64()
        .unwrap();
    assert!(dropped >= 50, "{dropped} names counted as left out");
}

in_both_modes!(a_process_holds_at_most_max_rooms, "--max-rooms", "2");
/// Rooms are bounded per process: a join that would create one more is refused on both join
/// paths, counted, and works again once a room has closed.
async fn a_process_holds_at_most_max_rooms(d: Deployment) {
    let a = d.a();
    let (r1, _) = Client::join(&a.ws("/ws/r1?user=u")).await;
    let (_r2, _) = Client::join(&a.ws("/ws/r2?user=u")).await;
    assert_eq!(
        refused_upgrade(a, "/ws/r3?user=u").await,
        (503, json!("max_rooms"))
    );
    let mut c = Client::connect(&a.ws("/ws?user=c")).await;
    c.send_json(&json!({"type": "join", "room": "r3"})).await;
    assert_eq!(c.recv_type("error").await["code"], "max_rooms");
    // An existing room still takes members.
    c.send_json(&json!({"type": "join", "room": "r1"})).await;
    assert_eq!(c.recv_type("welcome").await["room"], "r1");
    c.send_json(&json!({"type": "leave", "room": "r1"})).await;
    c.recv_type("left").await;
    drop(r1);
    a.wait_for("/api/rooms/r1", "r1 closed", support::STEP, |s, _| s == 404)
        .await;
    c.send_json(&json!({"type": "join", "room": "r3"})).await;
    assert_eq!(c.recv_type("welcome").await["room"], "r3");
    let (_, stats) = a.get("/api/stats").await;
    assert_eq!(stats["rooms_refused"], 2, "{stats}");
}

in_both_modes!(
    direct_message_rooms_admit_only_their_users_by_token,
    "--jwt-secret",
    SECRET,
    "--api-key",
    API_KEY
);
/// `dm:alice+bob` admits alice and bob by their tokens' `sub`, although neither token lists it,
/// and nobody else, whatever their token says; over the upgrade, over a `join` frame, and for
/// the room's info. It is never listed.
async fn direct_message_rooms_admit_only_their_users_by_token(d: Deployment) {
    let (alice_t, bob_t, carol_t) = (
        token("alice", Some("general")),
        token("bob", Some("general")),
        token("carol", Some("*")),
    );
    let (mut alice, w) =
        Client::join(&d.a().ws(&format!("/ws/dm:alice+bob?token={alice_t}"))).await;
    assert_eq!(w["room"], "dm:alice+bob", "{w}");
    let mut bob = Client::connect(&d.b().ws(&format!("/ws?token={bob_t}"))).await;
    bob.send_json(&json!({"type": "join", "room": "dm:alice+bob"}))
        .await;
    bob.recv_type("welcome").await;
    d.wait_members(&format!("dm:alice+bob?token={bob_t}"), 2)
        .await;

    assert_eq!(
        refused_upgrade(d.a(), &format!("/ws/dm:alice+bob?token={carol_t}")).await,
        (403, json!("forbidden_room"))
    );
    let mut carol = Client::connect(&d.b().ws(&format!("/ws?token={carol_t}"))).await;
    carol
        .send_json(&json!({"type": "join", "room": "dm:alice+bob"}))
        .await;
    let e = carol.recv_type("error").await;
    assert_eq!(e["code"], "forbidden_room", "{e}");
    // One set of users has one room name: unsorted or repeated lists are no room at all.
    for bad in ["dm:bob+alice", "dm:alice+alice+bob"] {
        assert_eq!(
            refused_upgrade(d.a(), &format!("/ws/{bad}?token={alice_t}")).await,
            (400, json!("bad_room"))
        );
        carol.send_json(&json!({"type": "join", "room": bad})).await;
        assert_eq!(carol.recv_type("error").await["code"], "bad_room");
    }

    alice.send("psst").await;
    let m = bob.recv_non_presence().await;
    assert_eq!((&m["text"], &m["user"]), (&json!("psst"), &json!("alice")));

    for node in &d.nodes {
        let (status, v) = get_with(node, "/api/rooms/dm:alice+bob", Some(&carol_t)).await;
        assert_eq!((status, &v["error"]), (403, &json!("forbidden_room")));
        let (status, _) = get_with(node, "/api/rooms/dm:alice+bob", Some(&bob_t)).await;
        assert_eq!(status, 200);
        let (status, _) = get_with(node, "/api/rooms/dm:alice+bob/messages", Some(&alice_t)).await;
        assert_eq!(status, 200);
        let (_, v) = get_with(node, "/api/rooms", Some(&carol_t)).await;
        assert!(!v.to_string().contains("dm:"), "a DM was listed: {v}");
        let (_, v) = get_with(node, "/api/rooms", Some(API_KEY)).await;
        assert!(
            v.to_string().contains("dm:alice+bob"),
            "the key sees all: {v}"
        );
    }
    let (status, v) = post_with(
        d.a(),
        "/api/rooms/dm:alice+bob/messages",
        Some(&carol_t),
        &json!({"text": "let me in"}),
    )
    .await;
    assert_eq!((status, &v["error"]), (403, &json!("forbidden_room")));
    let (_, stats) = d.b().get("/api/stats").await;
    assert!(
        stats["auth_refused_by_reason"]["forbidden_room"].as_u64() >= Some(2),
        "{stats}"
    );
}

in_both_modes!(direct_message_rooms_admit_only_their_users_by_name);
/// Without tokens a DM room goes by the name a client gives (unauthenticated, as every name
/// is then): others are refused at the upgrade, on a `join` frame, on reads and REST
/// publishes.
async fn direct_message_rooms_admit_only_their_users_by_name(d: Deployment) {
    let (_alice, _) = Client::join(&d.a().ws("/ws/dm:alice+bob?user=alice")).await;
    assert_eq!(
        refused_upgrade(d.a(), "/ws/dm:alice+bob?user=carol").await,
        (403, json!("forbidden_room"))
    );
    assert_eq!(
        refused_upgrade(d.a(), "/ws/dm:alice+bob").await,
        (403, json!("forbidden_room")),
        "an anonymous name is nobody's"
    );
    let mut carol = Client::connect(&d.b().ws("/ws?user=carol")).await;
    carol
        .send_json(&json!({"type": "join", "room": "dm:alice+bob"}))
        .await;
    assert_eq!(carol.recv_type("error").await["code"], "forbidden_room");
    d.wait_members("dm:alice+bob?user=alice", 1).await;
    for path in [
        "/api/rooms/dm:alice+bob",
        "/api/rooms/dm:alice+bob?user=carol",
    ] {
        let (status, v) = d.b().get(path).await;
        assert_eq!(
            (status, &v["error"]),
            (403, &json!("forbidden_room")),
            "{path}"
        );
    }
    // The paging API answers from the server asked: the one with the member.
    let (status, _) = d.a().get("/api/rooms/dm:alice+bob/messages?user=bob").await;
    assert_eq!(status, 200);
    let (status, v) = d
        .a()
        .post(
            "/api/rooms/dm:alice+bob/messages",
            &json!({"text": "hi", "user": "carol"}),
        )
        .await;
    assert_eq!((status, &v["error"]), (403, &json!("forbidden_room")));
    let (status, _) = d
        .a()
        .post(
            "/api/rooms/dm:alice+bob/messages",
            &json!({"text": "hi", "user": "bob"}),
        )
        .await;
    assert_eq!(status, 202);
    let (_, v) = d.a().get("/api/rooms").await;
    assert!(!v.to_string().contains("dm:"), "a DM was listed: {v}");
}

in_both_modes!(
    listed_password_rooms_are_marked,
    "--rooms-config",
    rooms_file()
);
/// A password room its operator lists (`private = false`) appears in `GET /api/rooms` marked
/// `password_protected`, so a client asks for the password before it joins.
async fn listed_password_rooms_are_marked(d: Deployment) {
    let (_c, _) = Client::join(&d.a().ws("/ws/club?user=c&password=s3club")).await;
    let (_o, _) = Client::join(&d.a().ws("/ws/open?user=o")).await;
    for node in &d.nodes {
        let v = node
            .wait_for(
                "/api/rooms",
                "club and open listed",
                support::STEP,
                |s, v| s == 200 && listed(v) == ["club", "open"],
            )
            .await;
        for room in v["rooms"].as_array().unwrap() {
            assert_eq!(room["password_protected"], room["room"] == "club", "{room}");
        }
    }
}

in_both_modes!(a_room_message_is_compressed_once_per_process);
/// permessage-deflate: members that agreed get each room message compressed, members that did
/// not get it plain, and each process compresses a message once however many of its members
/// get it compressed (`frames_compressed`, as `frames_encoded` counts serialisations).
async fn a_room_message_is_compressed_once_per_process(d: Deployment) {
    use support::deflate::DeflateClient;
    let (a, b) = (d.a(), d.b());
    let offer = Some("permessage-deflate; client_max_window_bits");
    let mut zipped = Vec::new();
    for (node, user) in [(a, "z1"), (a, "z2"), (b, "z3")] {
        let mut c = DeflateClient::connect(node.addr, &format!("/ws/zip?user={user}"), offer)
            .await
            .unwrap();
        assert_eq!(
            c.extensions.as_deref(),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
        c.recv_type("welcome").await.unwrap();
        zipped.push(c);
    }
    let (mut plain, _) = Client::join(&b.ws("/ws/zip?user=plain")).await;
    d.wait_members("zip", 4).await;
    let before = |v: &Value| v["frames_compressed"].as_u64().unwrap();
    let start_a = before(&a.get("/api/stats").await.1);
    let start_b = before(&b.get("/api/stats").await.1);
    let texts: Vec<String> = (0..5)
        .map(|i| {
            format!(
                "message {i}: {}",
                "the quick brown fox jumps over the lazy dog ".repeat(12)
            )
        })
        .collect();
    for text in &texts {
        plain
            .send_json(&json!({"type": "message", "text": text}))
            .await;
    }
    for c in &mut zipped {
        for text in &texts {
            let (m, compressed) = c.recv_type("message").await.unwrap();
            assert_eq!(m["text"], text.as_str());
            assert!(compressed, "a member that agreed gets it compressed");
        }
    }
    for text in &texts {
        assert_eq!(plain.recv_type("message").await["text"], text.as_str());
    }
    let (_, sa) = a.get("/api/stats").await;
    let (_, sb) = b.get("/api/stats").await;
    // Standalone `a` and `b` are one process with three compressing members; in a cluster, `a`
    // has two and `b` one: either way one compression per message per process.
    assert_eq!(before(&sa) - start_a, texts.len() as u64, "{sa}");
    assert_eq!(before(&sb) - start_b, texts.len() as u64, "{sb}");
}

/// A rooms file with `[routes]` (the tutorials' paths, and one into a password room), written
/// once per test process.
fn routes_file() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "roomcast-behaviour-routes-{}.toml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "[rooms.vault]\npassword = \"s3same\"\n\n[routes]\n\
             \"/ws/posts/{id}/live\" = \"post:{id}\"\n\
             \"/ws/chat/{room}\" = \"{room}\"\n\
             \"/sse/posts/{id}\" = \"post:{id}\"\n\
             \"/safe/{name}\" = \"{name}\"\n",
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    })
}

in_both_modes!(
    route_templates_lead_into_rooms,
    "--rooms-config",
    routes_file()
);
/// A path a template maps is a join of the room it names, with every rule of `/ws/{room}`:
/// query parameters, name rules, passwords; unmapped paths stay 404.
async fn route_templates_lead_into_rooms(d: Deployment) {
    let (mut alice, w) = Client::join(&d.a().ws("/ws/posts/42/live?user=alice")).await;
    assert_eq!(
        (&w["room"], &w["user"]),
        (&json!("post:42"), &json!("alice"))
    );
    // The same room by another template, on the other process.
    let (mut bob, w) = Client::join(&d.b().ws("/ws/chat/post:42?username=bob")).await;
    assert_eq!(w["room"], "post:42");
    let (_general, w) = Client::join(&d.b().ws("/ws/chat/%23general")).await;
    assert_eq!(w["room"], "#general");
    d.wait_members("post:42", 2).await;
    bob.send("hello from a route").await;
    let m = alice.recv_type("message").await;
    assert_eq!(
        (&m["room"], &m["text"]),
        (&json!("post:42"), &json!("hello from a route"))
    );
    bob.recv_type("message").await;

    // Query parameters as on `/ws/{room}`: history.
    let (mut carol, _) = Client::join(&d.a().ws("/ws/posts/42/live?user=carol&history=5")).await;
    let h = carol.recv_type("history").await;
    assert_eq!(
        (&h["room"], &h["count"]),
        (&json!("post:42"), &json!(1)),
        "{h}"
    );
    assert_eq!(
        carol.recv_type("message").await["text"],
        "hello from a route"
    );
    assert_eq!(
        refused_upgrade(d.a(), "/ws/posts/42/live?history=x").await,
        (400, json!("bad_param"))
    );

    // The substituted name obeys the room rules.
    for (path, code) in [
        ("/ws/chat/a%20b", "bad_room"),
        ("/ws/posts/%ff/live", "bad_room"),
        ("/ws/chat/%24lobby2", "reserved_room"),
    ] {
        assert_eq!(
            refused_upgrade(d.a(), path).await,
            (400, json!(code)),
            "{path}"
        );
    }
    assert_eq!(
        refused_upgrade(d.a(), "/ws/chat/ok?user=").await,
        (400, json!("bad_user"))
    );
    // A mapped room's password still applies.
    assert_eq!(
        refused_upgrade(d.a(), "/safe/vault?user=eve").await,
        (403, json!("bad_password"))
    );
    assert_eq!(
        refused_upgrade(d.b(), "/safe/vault?user=eve&password=nope").await,
        (403, json!("bad_password"))
    );
    let (_v, w) = Client::join(&d.b().ws("/safe/vault?user=vic&password=s3same")).await;
    assert_eq!(w["room"], "vault");
    // Unmapped paths, and a mapped path asked for neither transport.
    for path in [
        "/ws/posts/42",
        "/ws/posts/42/live/x",
        "/safe",
        "/nothing/here",
    ] {
        assert_eq!(
            refused_upgrade(d.a(), path).await,
            (404, json!("not_found")),
            "{path}"
        );
    }
    let (status, v) = d.a().get("/ws/chat/general").await;
    assert_eq!((status, &v["error"]), (400, &json!("bad_request")), "{v}");
    let r = support::http(d.a().addr, "POST", "/ws/chat/general", None)
        .await
        .unwrap();
    assert_eq!(r.status, 405);
}

in_both_modes!(
    route_templates_answer_to_tokens,
    "--jwt-secret",
    SECRET,
    "--rooms-config",
    routes_file()
);
/// The room a template names is the room a token must allow.
async fn route_templates_answer_to_tokens(d: Deployment) {
    let posts = token("alice", Some("post:*"));
    let (_alice, w) = Client::join(&d.a().ws(&format!("/ws/posts/7/live?token={posts}"))).await;
    assert_eq!(
        (&w["room"], &w["user"]),
        (&json!("post:7"), &json!("alice"))
    );
    assert_eq!(
        refused_upgrade(d.b(), &format!("/ws/chat/general?token={posts}")).await,
        (403, json!("forbidden_room"))
    );
    assert_eq!(
        refused_upgrade(d.b(), &format!("/ws/posts/7/live?token={posts}&user=bob")).await,
        (403, json!("forbidden_user"))
    );
    assert_eq!(
        refused_upgrade(d.b(), "/ws/posts/7/live").await,
        (401, json!("unauthorized"))
    );
}

/// A member list as a client keeps it: the welcome's `users`, then each presence frame's
/// `joined_ids`/`left_ids` (joined first), keyed by member id.
#[derive(Debug, Default, PartialEq)]
struct Roster(BTreeMap<u64, String>);

impl Roster {
    fn from_welcome(w: &Value) -> Roster {
        let mut r = Roster::default();
        for u in w["users"].as_array().expect("a users list") {
            r.0.insert(
                u["id"].as_u64().unwrap(),
                u["user"].as_str().unwrap().to_owned(),
            );
        }
        r
    }

    fn apply(&mut self, p: &Value) {
        let pairs = |names: &str, ids: &str| -> Vec<(u64, String)> {
            let names = p[names].as_array().unwrap();
            let ids = p[ids]
                .as_array()
                .unwrap_or_else(|| panic!("{ids} with names: {p}"));
            assert_eq!(names.len(), ids.len(), "{p}");
            ids.iter()
                .zip(names)
                .map(|(id, n)| (id.as_u64().unwrap(), n.as_str().unwrap().to_owned()))
                .collect()
        };
        for (id, name) in pairs("joined", "joined_ids") {
            self.0.insert(id, name);
        }
        for (id, _) in pairs("left", "left_ids") {
            self.0.remove(&id);
        }
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.values().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// The `users` of a welcome or a room-info page as `(id, name)`.
fn users_of(v: &Value) -> Vec<(u64, String)> {
    v["users"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| {
                    (
                        u["id"].as_u64().unwrap(),
                        u["user"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads `c`'s presence frames until one counts `members`: from then on the process `c` is on
/// knows of every one of them (cluster mode: of those elsewhere too).
async fn until_members(c: &mut Client, members: u64) {
    while c.recv_type("presence").await["members"] != members {}
}

in_both_modes!(a_joiner_sees_who_is_there);
/// The welcome lists the room's members, the joiner included, with the ids the room-info API
/// uses; in cluster mode those on the other process too.
async fn a_joiner_sees_who_is_there(d: Deployment) {
    let (mut alice, w) = Client::join(&d.a().ws("/ws/roster?user=alice")).await;
    assert_eq!(Roster::from_welcome(&w).names(), ["alice"], "{w}");
    let (_bob, _) = Client::join(&d.b().ws("/ws/roster?user=bob")).await;
    until_members(&mut alice, 2).await;
    let (_carol, w) = Client::join(&d.a().ws("/ws/roster?user=carol")).await;
    assert_eq!(
        Roster::from_welcome(&w).names(),
        ["alice", "bob", "carol"],
        "{w}"
    );
    assert!(
        w.get("next_users_after").is_none() && w.get("users_partial").is_none(),
        "{w}"
    );
    let ids: Vec<u64> = users_of(&w).iter().map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "by id: {w}");
    assert!(
        ids.iter().all(|id| *id < 1 << 53),
        "ids a browser reads exactly: {w}"
    );
    // The room-info API lists the same members with the same ids, on every process.
    for node in &d.nodes {
        let v = node
            .wait_for("/api/rooms/roster", "three users", support::STEP, |s, v| {
                s == 200 && users_of(v).len() == 3
            })
            .await;
        assert_eq!(users_of(&v), users_of(&w), "{v}");
    }
}

in_both_modes!(
    a_big_room_lists_one_page_and_a_cursor,
    "--roster-limit",
    "2"
);
/// Past `--roster-limit` the welcome lists the first members by id and `next_users_after`, the
/// cursor the room-info API pages on from there.
async fn a_big_room_lists_one_page_and_a_cursor(d: Deployment) {
    let (mut first, _) = Client::join(&d.a().ws("/ws/big?user=u0")).await;
    let mut others = Vec::new();
    for i in 1..4 {
        let node = if i % 2 == 0 { d.a() } else { d.b() };
        others.push(
            Client::join(&node.ws(&format!("/ws/big?user=u{i}")))
                .await
                .0,
        );
    }
    until_members(&mut first, 4).await;
    let (_joiner, w) = Client::join(&d.a().ws("/ws/big?user=joiner")).await;
    let all = d
        .a()
        .wait_for(
            "/api/rooms/big?users_limit=100",
            "five users",
            support::STEP,
            |s, v| s == 200 && users_of(v).len() == 5,
        )
        .await;
    let all = users_of(&all);
    assert_eq!(users_of(&w), all[..2], "{w}");
    assert_eq!(w["next_users_after"], all[1].0, "{w}");
    let after = all[1].0;
    for node in &d.nodes {
        // Another process's members reach its roster in Redis within a presence interval.
        node.wait_for(
            "/api/rooms/big?users_limit=100",
            "five users",
            support::STEP,
            |s, v| s == 200 && users_of(v).len() == 5,
        )
        .await;
        let (_, page) = node
            .get(&format!("/api/rooms/big?users_limit=2&users_after={after}"))
            .await;
        assert_eq!(users_of(&page), all[2..4], "{page}");
        assert_eq!(page["next_users_after"], all[3].0, "{page}");
        let (_, last) = node
            .get(&format!(
                "/api/rooms/big?users_limit=2&users_after={}",
                all[3].0
            ))
            .await;
        assert_eq!(users_of(&last), all[4..], "{last}");
        assert_eq!(last["next_users_after"], Value::Null, "{last}");
    }
}

/// A rooms file with a `counts` and an `off` room, written once per test process.
fn presence_file() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "roomcast-behaviour-presence-{}.toml",
            std::process::id()
        ));
        std::fs::write(
            &path,
            "[rooms.\"quiet:*\"]\npresence = \"counts\"\n[rooms.\"silent:*\"]\npresence = \"off\"\n",
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    })
}

in_both_modes!(
    rooms_that_name_nobody_list_nobody,
    "--rooms-config",
    presence_file()
);
/// `counts` and `off` rooms send no names: no `users` in the welcome, no ids in presence.
async fn rooms_that_name_nobody_list_nobody(d: Deployment) {
    for room in ["quiet:1", "silent:1"] {
        let (mut one, w) = Client::join(&d.a().ws(&format!("/ws/{room}?user=one"))).await;
        assert!(
            w.get("users").is_none() && w.get("next_users_after").is_none(),
            "{w}"
        );
        let (_two, w) = Client::join(&d.b().ws(&format!("/ws/{room}?user=two"))).await;
        assert!(w.get("users").is_none(), "{w}");
        if room == "quiet:1" {
            let p = one.recv_type("presence").await;
            assert_eq!(p["joined"], json!([]), "{p}");
            assert!(
                p.get("joined_ids").is_none() && p.get("left_ids").is_none(),
                "{p}"
            );
        }
    }
}

in_both_modes!(presence_after_the_welcome_keeps_the_roster_right);
/// A client that starts from its welcome and applies presence frames by id ends with the room's
/// members exactly, however joins and leaves fall around its welcome, on either process.
async fn presence_after_the_welcome_keeps_the_roster_right(d: Deployment) {
    let (mut alice, _) = Client::join(&d.a().ws("/ws/live?user=alice")).await;
    let (_bob, _) = Client::join(&d.b().ws("/ws/live?user=bob")).await;
    until_members(&mut alice, 2).await;
    let (mut carol, w) = Client::join(&d.a().ws("/ws/live?user=carol")).await;
    let mut roster = Roster::from_welcome(&w);
    // Joins and leaves after the welcome, on both processes; one user twice.
    let (_dave, _) = Client::join(&d.b().ws("/ws/live?user=dave")).await;
    let (_bob2, _) = Client::join(&d.a().ws("/ws/live?user=bob")).await;
    drop(alice);
    let (eve, _) = Client::join(&d.b().ws("/ws/live?user=eve")).await;
    drop(eve);
    let expected = ["bob", "bob", "carol", "dave"];
    let deadline = tokio::time::Instant::now() + support::STEP;
    let mut eve_left = false;
    while roster.names() != expected || !eve_left {
        assert!(tokio::time::Instant::now() < deadline, "{roster:?}");
        let p = carol.recv_type("presence").await;
        eve_left |= p["left"].as_array().unwrap().contains(&json!("eve"));
        roster.apply(&p);
    }
    d.wait_members("live", 4).await;
    let v = d
        .a()
        .wait_for("/api/rooms/live", "four users", support::STEP, |s, v| {
            s == 200 && users_of(v).len() == 4
        })
        .await;
    let listed: BTreeMap<u64, String> = users_of(&v).into_iter().collect();
    assert_eq!(roster.0, listed, "the same members by the same ids");
}
