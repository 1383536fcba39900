//! Built-in accounts (`--accounts-db`) against real `roomcast` processes: register, log in as a
//! form and as JSON, `GET /users/me`, a WebSocket with the issued token; in cluster mode the two
//! processes share one accounts file. Then the abuse: names and passwords against the rules,
//! taken names, closed registration, a start without `--jwt-secret`, the login lockout per
//! address and per account, the registration rate, the hash queue, the timing of unknown names
//! against wrong passwords; and `roomcast user`.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::deployment::Deployment;
use support::nodes::Node;
use support::{http_with, Client, HttpResponse};

const SECRET: &str = "accounts-test-secret-of-32-bytes!!";
const PASSWORD: &str = "correct horse battery";

/// A fresh accounts file under the target's temporary directory, one per call (both processes
/// of a cluster get the same one).
fn fresh_db() -> &'static str {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("accounts");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{}-{}.db",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Box::leak(path.to_string_lossy().into_owned().into_boxed_str())
}

/// Request headers, name and value.
type Headers<'a> = &'a [(&'a str, &'a str)];

async fn send(
    node: &Node,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> HttpResponse {
    http_with(node.addr, method, path, headers, body)
        .await
        .unwrap()
}

fn json_of(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

async fn register(node: &Node, name: &str, password: &str) -> (u16, Value) {
    let body = json!({"username": name, "password": password}).to_string();
    let r = send(node, "POST", "/register", &[], Some(body)).await;
    (r.status, json_of(&r))
}

fn form(name: &str, password: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "password")
        .append_pair("username", name)
        .append_pair("password", password)
        .append_pair("scope", "")
        .finish()
}

/// `POST /token` as FastAPI's `OAuth2PasswordRequestForm` expects it, from `forwarded` (an
/// `X-Forwarded-For` address, for a server that trusts 127.0.0.1) when given.
async fn login_form(
    node: &Node,
    name: &str,
    password: &str,
    forwarded: Option<&str>,
) -> HttpResponse {
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(ip) = forwarded {
        headers.push(("x-forwarded-for", ip));
    }
    send(node, "POST", "/token", &headers, Some(form(name, password))).await
}

async fn login_json(node: &Node, name: &str, password: &str) -> HttpResponse {
    let body = json!({"username": name, "password": password}).to_string();
    send(node, "POST", "/token", &[], Some(body)).await
}

/// The access token of a successful login.
fn token_of(r: &HttpResponse) -> String {
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let v = json_of(r);
    assert_eq!(v["token_type"], "bearer", "{v}");
    v["access_token"].as_str().expect("access_token").to_owned()
}

async fn with_bearer(node: &Node, method: &str, path: &str, token: &str) -> HttpResponse {
    let auth = format!("Bearer {token}");
    send(node, method, path, &[("authorization", &auth)], None).await
}

/// An `/api/stats` counter summed over the deployment's processes.
async fn counter(d: &Deployment, name: &str) -> u64 {
    let mut total = 0;
    for node in &d.nodes {
        let (status, v) = node.get_as_operator("/api/stats").await;
        assert_eq!(status, 200, "{v}");
        total += v[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {v}"));
    }
    total
}

in_both_modes!(
    register_log_in_and_chat,
    "--jwt-secret",
    SECRET,
    "--accounts-db",
    fresh_db(),
    "--accounts-register-rate",
    "off"
);
async fn register_log_in_and_chat(d: Deployment) {
    let (status, server) = d.b().get("/api/server").await;
    assert_eq!(status, 200);
    assert_eq!(server["accounts"], true, "{server}");
    assert_eq!(server["register"], "open", "{server}");
    assert_eq!(server["tokens_required"], true, "{server}");
    assert!(server["version"].is_string(), "{server}");

    assert_eq!(
        register(d.a(), "alice", PASSWORD).await,
        (201, json!({"username": "alice"}))
    );
    // In cluster mode the other process reads the same file.
    let r = login_form(d.b(), "alice", PASSWORD, None).await;
    let alice_form = token_of(&r);
    assert_eq!(json_of(&r)["expires_in"], 3600);
    let alice = token_of(&login_json(d.a(), "ALICE", PASSWORD).await);
    for token in [&alice_form, &alice] {
        let me = with_bearer(d.b(), "GET", "/users/me", token).await;
        assert_eq!(me.status, 200);
        let me = json_of(&me);
        assert_eq!(me["username"], "alice", "the name as registered: {me}");
        let age = support_now_ms().saturating_sub(me["created_at"].as_u64().unwrap());
        assert!(age < 60_000, "{me}");
    }
    assert_eq!(register(d.b(), "bob", PASSWORD).await.0, 201);
    let bob = token_of(&login_form(d.a(), "bob", PASSWORD, None).await);

    // The issued tokens open WebSockets as their users, on either process.
    let (mut a, welcome) = Client::join(&d.a().ws(&format!("/ws/general?token={alice}"))).await;
    assert_eq!(welcome["user"], "alice");
    let (mut b, welcome) = Client::join(&d.b().ws(&format!("/ws/general?token={bob}"))).await;
    assert_eq!(welcome["user"], "bob");
    d.wait_members("general", 2).await;
    a.send("hello from an account").await;
    let got = b.recv_type("message").await;
    assert_eq!(
        (got["user"].as_str(), got["text"].as_str()),
        (Some("alice"), Some("hello from an account"))
    );

    // A refresh issues a fresh token without the password; the socket can take it.
    let r = with_bearer(d.b(), "POST", "/token/refresh", &alice).await;
    let fresh = token_of(&r);
    assert_eq!(
        with_bearer(d.a(), "GET", "/users/me", &fresh).await.status,
        200
    );
    a.send_json(&json!({"type": "refresh", "token": fresh}))
        .await;
    assert_eq!(a.recv_type("refreshed").await["type"], "refreshed");

    assert_eq!(counter(&d, "accounts_registered").await, 2);
    assert_eq!(counter(&d, "accounts_logins").await, 3);
    assert_eq!(counter(&d, "accounts_refreshed").await, 1);
    assert_eq!(counter(&d, "accounts_login_failures").await, 0);
}

fn support_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Names and passwords against the rules get 400 with the rule, taken names 409 whatever their
/// case or width, bodies that are not credentials 400/413/415; nothing is created by any of
/// them, and each is counted.
#[tokio::test]
async fn bad_names_passwords_and_bodies_are_refused_with_the_rule() {
    let db = fresh_db();
    let node = Node::standalone(&[
        "--jwt-secret",
        SECRET,
        "--accounts-db",
        db,
        "--accounts-register-rate",
        "off",
    ])
    .await;
    let long = "x".repeat(33);
    let too_long_password = "p".repeat(1025);
    let cases: [(&str, &str, &str, &str); 7] = [
        ("", PASSWORD, "bad_user", "user name is empty"),
        (&long, PASSWORD, "bad_user", "longer than 32 characters"),
        ("bell\u{7}", PASSWORD, "bad_user", "control character"),
        (
            " alice",
            PASSWORD,
            "bad_user",
            "starts or ends with a space",
        ),
        ("al\u{200B}ice", PASSWORD, "bad_user", "invisible character"),
        (
            "alice",
            "seven77",
            "bad_password",
            "shorter than 8 characters",
        ),
        (
            "alice",
            &too_long_password,
            "bad_password",
            "longer than 1024 bytes",
        ),
    ];
    for (name, password, code, rule) in cases {
        let (status, v) = register(&node, name, password).await;
        assert_eq!(status, 400, "{name:?}: {v}");
        assert_eq!(v["error"], code, "{name:?}: {v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(reason.contains(rule), "{name:?}: {reason}");
    }
    assert_eq!(register(&node, "Alice", PASSWORD).await.0, 201);
    for taken in ["Alice", "alice", "ALICE", "ＡＬＩＣＥ"] {
        let (status, v) = register(&node, taken, PASSWORD).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (409, Some("name_taken")),
            "{taken}"
        );
    }
    let bodies: [(Headers, String, u16, &str); 6] = [
        (&[], "not json".into(), 400, "bad_request"),
        (
            &[],
            json!({"username": 7, "password": PASSWORD}).to_string(),
            400,
            "bad_request",
        ),
        (
            &[],
            json!({"username": "carol"}).to_string(),
            400,
            "bad_request",
        ),
        (&[], "x".repeat(9000), 413, "payload_too_large"),
        (
            &[("content-type", "text/plain")],
            "username=carol".into(),
            415,
            "unsupported_media_type",
        ),
        (
            &[("content-type", "application/x-www-form-urlencoded")],
            json!({"username": "carol", "password": PASSWORD}).to_string(),
            400,
            "bad_request",
        ),
    ];
    for (headers, body, status, code) in bodies {
        let r = send(&node, "POST", "/register", headers, Some(body.clone())).await;
        let v = json_of(&r);
        assert_eq!(
            (r.status, v["error"].as_str()),
            (status, Some(code)),
            "{body:.40}: {v}"
        );
    }
    // OAuth2's other grants are not this endpoint's.
    let r = send(
        &node,
        "POST",
        "/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some("grant_type=client_credentials&username=Alice&password=x".into()),
    )
    .await;
    assert_eq!(
        (r.status, json_of(&r)["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    // The one account there is.
    token_of(&login_json(&node, "alice", PASSWORD).await);
    assert_eq!(login_json(&node, "carol", PASSWORD).await.status, 401);
    let (_, stats) = node.get_as_operator("/api/stats").await;
    assert_eq!(stats["accounts_registered"], 1, "{stats}");
    assert_eq!(stats["accounts_register_refused"], 7 + 4, "{stats}");
    assert_eq!(stats["accounts_malformed"], 6 + 1, "{stats}");
    // Without accounts the routes say so.
    let plain = Node::standalone(&[]).await;
    let (status, v) = register(&plain, "alice", PASSWORD).await;
    assert_eq!((status, v["error"].as_str()), (404, Some("accounts_off")));
    let (_, v) = plain.get("/api/server").await;
    assert_eq!(
        (&v["accounts"], &v["register"], &v["tokens_required"]),
        (&json!(false), &Value::Null, &json!(false)),
        "{v}"
    );
}

/// `--accounts-db` without `--jwt-secret` stops the server at start, saying why.
#[tokio::test]
async fn accounts_without_a_jwt_secret_do_not_start() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--listen", "127.0.0.1:0", "--accounts-db", fresh_db()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--accounts-db needs --jwt-secret"),
        "{stderr}"
    );
}

/// Wrong passwords from one address: the lockout's five are answered, then 429 with
/// `Retry-After` (the right password included: refused unseen), counted. Spread over many
/// addresses, the account's own lockout stops them, and other accounts are untouched.
#[tokio::test]
async fn a_login_flood_meets_the_lockout_per_address_and_per_account() {
    let node = Node::standalone(&[
        "--jwt-secret",
        SECRET,
        "--accounts-db",
        fresh_db(),
        "--accounts-register-rate",
        "off",
        "--trusted-proxies",
        "127.0.0.1",
    ])
    .await;
    for name in ["alice", "bob"] {
        assert_eq!(register(&node, name, PASSWORD).await.0, 201);
    }
    let mut failures = 0;
    let mut limited = None;
    for attempt in 0..20 {
        let r = login_form(&node, "alice", "wrong password", Some("10.0.0.1")).await;
        match r.status {
            401 => failures += 1,
            429 => {
                limited = Some((attempt, r));
                break;
            }
            s => panic!("attempt {attempt}: {s}"),
        }
    }
    let (attempt, r) = limited.expect("no 429 within 20 wrong passwords");
    assert!(attempt <= 6, "the lockout came after {attempt} attempts");
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=13).contains(&wait), "Retry-After {wait}");
    let v = json_of(&r);
    assert_eq!(v["error"], "too_many_failures", "{v}");
    assert!(v["retry_after_ms"].as_u64().unwrap() > 0, "{v}");
    let r = login_form(&node, "alice", PASSWORD, Some("10.0.0.1")).await;
    assert_eq!(r.status, 429, "a locked address is refused unseen");
    // Another address still logs in.
    token_of(&login_form(&node, "alice", PASSWORD, Some("10.0.0.2")).await);

    // One guess per address, many addresses: the account locks.
    let mut spread = None;
    for i in 0..30 {
        let ip = format!("10.1.0.{i}");
        let r = login_form(&node, "bob", "wrong password", Some(&ip)).await;
        match r.status {
            401 => failures += 1,
            429 => {
                spread = Some(i);
                break;
            }
            s => panic!("guess {i}: {s}"),
        }
    }
    let i = spread.expect("no 429 within 30 guesses from 30 addresses");
    assert!(i <= 12, "bob locked after {i} guesses");
    assert_eq!(
        login_form(&node, "bob", PASSWORD, Some("10.2.0.1"))
            .await
            .status,
        429
    );
    token_of(&login_form(&node, "alice", PASSWORD, Some("10.2.0.2")).await);

    let (_, stats) = node.get_as_operator("/api/stats").await;
    assert_eq!(stats["accounts_login_failures"], failures, "{stats}");
    assert_eq!(stats["accounts_login_limited"], 4, "{stats}");
    let metrics = support::http(node.addr, "GET", "/metrics", None)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("roomcast_accounts_login_limited_total 4"),
        "{text}"
    );
}

/// `--accounts-register-rate` per address: past it, 429 with `Retry-After`, counted.
#[tokio::test]
async fn a_registration_flood_meets_the_rate() {
    let node = Node::standalone(&[
        "--jwt-secret",
        SECRET,
        "--accounts-db",
        fresh_db(),
        "--accounts-register-rate",
        "2/m burst 2",
    ])
    .await;
    assert_eq!(register(&node, "one", PASSWORD).await.0, 201);
    // A refused registration spends its token too.
    assert_eq!(register(&node, "two", "short").await.0, 400);
    let body = json!({"username": "three", "password": PASSWORD}).to_string();
    let r = send(&node, "POST", "/register", &[], Some(body)).await;
    assert_eq!(r.status, 429);
    assert_eq!(json_of(&r)["error"], "rate_limited");
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "Retry-After {wait}");
    let (_, stats) = node.get_as_operator("/api/stats").await;
    assert_eq!(stats["accounts_register_limited"], 1, "{stats}");
    assert_eq!(stats["accounts_registered"], 1, "{stats}");
}

/// One hash slot and a burst of logins: the queue holds 32, the rest get 503 `accounts_busy`
/// with `Retry-After` at once, counted; every other login succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_hash_queue_is_refused_not_queued() {
    let node = Node::standalone(&[
        "--jwt-secret",
        SECRET,
        "--accounts-db",
        fresh_db(),
        "--accounts-hash-slots",
        "1",
    ])
    .await;
    assert_eq!(register(&node, "alice", PASSWORD).await.0, 201);
    let addr = node.addr;
    let logins = (0..100).map(|_| {
        tokio::spawn(async move {
            let body = form("alice", PASSWORD);
            http_with(
                addr,
                "POST",
                "/token",
                &[("content-type", "application/x-www-form-urlencoded")],
                Some(body),
            )
            .await
            .unwrap()
        })
    });
    let answers = futures_util::future::join_all(logins).await;
    let (mut ok, mut busy) = (0, 0);
    for r in answers {
        let r = r.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(json_of(&r)["error"], "accounts_busy");
                assert!(r.headers.contains_key("retry-after"));
                busy += 1;
            }
            s => panic!("{s}: {:?}", String::from_utf8_lossy(&r.body)),
        }
    }
    assert!(busy > 0 && ok >= 32, "{ok} logins, {busy} busy");
    let (_, stats) = node.get_as_operator("/api/stats").await;
    assert_eq!(stats["accounts_busy"], busy, "{stats}");
    assert_eq!(stats["accounts_logins"], ok, "{stats}");
}

/// An unknown name and a wrong password take the same time (one Argon2id check each: the
/// unknown name against a dummy hash) and get the same answer. Medians of 50 each,
/// interleaved, every attempt from its own address, and at most 8 wrong passwords per account,
/// so that no lockout bites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_wrong_passwords_take_the_same_time() {
    let node = Node::standalone(&[
        "--jwt-secret",
        SECRET,
        "--accounts-db",
        fresh_db(),
        "--accounts-register-rate",
        "off",
        "--trusted-proxies",
        "127.0.0.1",
    ])
    .await;
    const N: usize = 50;
    const ACCOUNTS: usize = 7;
    for i in 0..ACCOUNTS {
        assert_eq!(register(&node, &format!("user{i}"), PASSWORD).await.0, 201);
    }
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    let mut bodies = std::collections::BTreeSet::new();
    for i in 0..N {
        let mut attempts = [
            (
                format!("nobody{i}"),
                format!("10.3.{}.{}", i / 200, i % 200),
                true,
            ),
            (
                format!("user{}", i % ACCOUNTS),
                format!("10.4.{}.{}", i / 200, i % 200),
                false,
            ),
        ];
        if i % 2 == 1 {
            attempts.reverse();
        }
        for (name, ip, is_unknown) in attempts {
            let started = Instant::now();
            let r = login_form(&node, &name, "not the password", Some(&ip)).await;
            let took = started.elapsed();
            assert_eq!(r.status, 401, "{name}");
            bodies.insert(r.body.clone());
            if is_unknown {
                unknown.push(took);
            } else {
                wrong.push(took);
            }
        }
    }
    assert_eq!(bodies.len(), 1, "different bodies: {bodies:?}");
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (u, w) = (median(&mut unknown), median(&mut wrong));
    let ratio = u.as_secs_f64() / w.as_secs_f64();
    println!("median unknown name {u:?}, wrong password {w:?}, ratio {ratio:.2}");
    assert!(
        (1.0 / 1.5..=1.5).contains(&ratio),
        "unknown name {u:?} against wrong password {w:?}: ratio {ratio:.2}"
    );
}

/// Runs `roomcast ARGS` with `stdin`; its exit code, stdout and stderr.
fn roomcast(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `roomcast user add|list|del` on the file a server with closed registration uses: only the
/// command line creates accounts, and a deleted account can neither log in nor refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_registration_and_the_user_command() {
    let db = fresh_db();
    let line = format!("{PASSWORD}\n");
    let (code, out, err) = roomcast(
        &[
            "user",
            "add",
            "carol",
            "--password-stdin",
            "--accounts-db",
            db,
        ],
        &line,
    );
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("created account carol"), "{out}");
    let (code, _, err) = roomcast(
        &[
            "user",
            "add",
            "Carol",
            "--password-stdin",
            "--accounts-db",
            db,
        ],
        &line,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("taken"), "{err}");
    let (code, _, err) = roomcast(&["user", "add", "dave", "--accounts-db", db], "short\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("shorter than 8"), "{err}");
    let (code, _, err) = roomcast(&["user", "add", " dave", "--accounts-db", db], &line);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("space"), "{err}");
    let (code, _, err) = roomcast(&["user", "list"], "");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--accounts-db"), "{err}");

    let node = Node::standalone(&[
        "--jwt-secret",
        SECRET,
        "--accounts-db",
        db,
        "--accounts-register",
        "closed",
    ])
    .await;
    let (_, v) = node.get("/api/server").await;
    assert_eq!(v["register"], "closed", "{v}");
    let (status, v) = register(&node, "mallory", PASSWORD).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("registration_closed"))
    );
    let carol = token_of(&login_form(&node, "carol", PASSWORD, None).await);
    assert_eq!(
        with_bearer(&node, "GET", "/users/me", &carol).await.status,
        200
    );

    let (code, out, _) =
        tokio::task::spawn_blocking(move || roomcast(&["user", "list", "--accounts-db", db], ""))
            .await
            .unwrap();
    assert_eq!(code, 0);
    assert!(out.starts_with("carol\t20"), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        roomcast(&["user", "del", "CAROL", "--accounts-db", db], "")
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(login_form(&node, "carol", PASSWORD, None).await.status, 401);
    for (method, path) in [("POST", "/token/refresh"), ("GET", "/users/me")] {
        let r = with_bearer(&node, method, path, &carol).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(json_of(&r)["error"], "no_account", "{path}");
        assert!(r.headers.contains_key("www-authenticate"));
    }
    let (code, _, err) = roomcast(&["user", "del", "carol", "--accounts-db", db], "");
    assert_eq!(code, 1, "{err}");
}
