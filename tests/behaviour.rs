//! One behaviour, whatever the deployment: every check here runs against a server on its own
//! and against two `roomcast` processes on a real `redis-server`, and expects the same frames,
//! the same status codes, the same counters and the same room info fields.
//!
//! In cluster mode, `a` and `b` are two processes; standalone they are the same one. The
//! cluster runs need `redis-server` (`#[ignore = "needs redis-server"]`; `scripts/test.sh` runs
//! them).

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::nodes::{Node, Redis};
use support::Client;

struct Deployment {
    nodes: Vec<Node>,
    _redis: Option<Redis>,
}

impl Deployment {
    async fn standalone(extra: &[&str]) -> Deployment {
        Deployment {
            nodes: vec![Node::standalone(extra).await],
            _redis: None,
        }
    }

    async fn cluster(extra: &[&str]) -> Deployment {
        let redis = Redis::start();
        let a = Node::start(&redis, extra).await;
        let b = Node::start(&redis, extra).await;
        Deployment {
            nodes: vec![a, b],
            _redis: Some(redis),
        }
    }

    fn a(&self) -> &Node {
        &self.nodes[0]
    }

    fn b(&self) -> &Node {
        &self.nodes[self.nodes.len() - 1]
    }

    /// Waits until both nodes see `members` in `room`.
    async fn wait_members(&self, room: &str, members: u64) {
        for node in &self.nodes {
            node.wait_for(
                &format!("/api/rooms/{room}"),
                &format!("{members} members in {room}"),
                support::STEP,
                |s, v| s == 200 && v["members"] == members,
            )
            .await;
        }
    }
}

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

/// Runs `$check` once standalone and once as a two-process cluster.
macro_rules! in_both_modes {
    ($check:ident $(, $arg:expr)*) => {
        mod $check {
            use super::*;

            #[tokio::test]
            async fn standalone() {
                super::$check(Deployment::standalone(&[$($arg),*]).await).await;
            }

            #[tokio::test]
            #[ignore = "needs redis-server"]
            async fn cluster() {
                super::$check(Deployment::cluster(&[$($arg),*]).await).await;
            }
        }
    };
}

in_both_modes!(chat_frames_and_room_info);
async fn chat_frames_and_room_info(d: Deployment) {
    let (mut alice, welcome) = Client::join(&d.a().ws("/ws/r?user=alice")).await;
    assert_eq!(
        keys(&welcome),
        set(&["type", "room", "user", "members", "seq"])
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
            set(&["room", "members", "local_members"])
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
