//! The web page in a real headless browser: Debian's chromium driven by playwright-core
//! (tests/browser/chat.mjs; tests/browser/accounts.mjs with built-in accounts; tests/browser/client.mjs against a server configured like
//! production, with screenshots in target/browser-artifacts/). Needs `chromium`, `node` and `tests/browser/node_modules`, so it
//! is `#[ignore = "needs chromium"]`: a plain `cargo test` leaves it out (and says so),
//! `scripts/test.sh` installs them and runs it (`--run-ignored all`), and run without them it
//! fails, naming what is missing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::TestServer;

fn missing_prerequisites(dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        missing.push(format!("{chromium} (apt-get install -y chromium)"));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (apt-get install -y nodejs)".into());
    }
    if !dir.join("node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules (npm ci --prefix tests/browser)".into());
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium"]
async fn chat_page_works_in_a_real_browser() {
    run_script("chat.mjs").await;
}

/// The browser's own `EventSource` on `GET /sse/{room}`: it receives, and after its connection
/// is cut it reconnects by itself with `Last-Event-ID` and misses nothing (tests/browser/sse.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium"]
async fn event_source_reconnects_and_misses_nothing_in_a_real_browser() {
    run_script("sse.mjs").await;
}

/// Built-in accounts in the page: register, log in, chat, a token refreshed every second or so
/// (`--accounts-token-ttl 15s`) while the socket stays, a reload that stays logged in, log out
/// (tests/browser/accounts.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium"]
async fn accounts_register_log_in_chat_and_survive_a_reload_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("accounts.db");
    run_script_with("accounts.mjs", move |c| {
        c.jwt_secret = Some("browser-accounts-secret-of-32-bytes!".into());
        c.accounts_db = Some(db);
        c.accounts_token_ttl = Duration::from_secs(15);
    })
    .await;
}

/// Runs one script of tests/browser against a fresh server; fails on any failed check.
async fn run_script(name: &str) {
    run_script_with(name, |_| {}).await;
}

/// `run_script` against a server configured by `tweak`.
async fn run_script_with(name: &str, tweak: impl FnOnce(&mut roomcast::Config)) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let missing = missing_prerequisites(&dir);
    assert!(
        missing.is_empty(),
        "the browser test cannot run, missing: {} (scripts/test.sh installs them)",
        missing.join(", ")
    );
    let server = TestServer::with(tweak).await;
    let url = format!("http://{}", server.addr);
    let script = dir.join(name);
    let output =
        tokio::task::spawn_blocking(move || Command::new("node").arg(script).arg(url).output())
            .await
            .unwrap()
            .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "browser test failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains(" 0 failed"), "no summary line:\n{stdout}");
}

fn run_node(dir: &Path, script: &str, arg: String) -> (bool, String) {
    let output = Command::new("node")
        .arg(dir.join(script))
        .arg(arg)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    (
        output.status.success() && stdout.contains(" 0 failed"),
        format!("{stdout}\n{stderr}"),
    )
}

/// Access tokens, a listed password room, direct messages, history paging, a tight rate limit
/// and CORS for a second origin: the page and roomcast.js as a real user meets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium"]
async fn page_and_library_work_against_a_production_like_server() {
    const SECRET: &str = "browser-secret-of-reasonable-length!";
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let missing = missing_prerequisites(&dir);
    assert!(missing.is_empty(), "missing: {}", missing.join(", "));
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    std::fs::create_dir_all(&target).unwrap();
    let rooms = target.join("rooms.toml");
    std::fs::write(
        &rooms,
        "[rooms.club]\npassword = \"club-secret\"\nprivate = false\n",
    )
    .unwrap();
    let (listed_port, other_port) = (support::nodes::free_port(), support::nodes::free_port());
    let rooms_path = rooms.clone();
    let server = TestServer::with(move |c| {
        c.jwt_secret = Some(SECRET.into());
        c.rooms_config = Some(rooms_path);
        c.rate_limit = "2/s burst 8".parse().unwrap();
        c.cors_origins = vec![format!("http://127.0.0.1:{listed_port}")];
    })
    .await;
    let token = |sub: &str, rooms: Option<&str>| {
        roomcast::core::auth::issue(SECRET, sub, rooms, Duration::from_secs(3600)).unwrap()
    };
    let bad = roomcast::core::auth::issue(
        "not-the-secret-but-long-enough-anyway",
        "mallory",
        None,
        Duration::from_secs(3600),
    )
    .unwrap();
    let config = serde_json::json!({
        "base": format!("http://{}", server.addr),
        "tokens": {
            "alice": token("alice", None),
            "bob": token("bob", None),
            "carol": token("carol", Some("*")),
            "bad": bad,
        },
        "password": "club-secret",
        "corsListedPort": listed_port,
        "corsOtherPort": other_port,
        "artifacts": target.to_string_lossy(),
    });
    let config_path = target.join("client-config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let arg = config_path.to_string_lossy().into_owned();
    let (ok, out) = tokio::task::spawn_blocking(move || run_node(&dir, "client.mjs", arg))
        .await
        .unwrap();
    assert!(ok, "browser test failed:\n{out}");
}
