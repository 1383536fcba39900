//! The web page in a real headless browser: Debian's chromium driven by playwright-core
//! (tests/browser/chat.mjs). Needs `chromium`, `node` and `tests/browser/node_modules`, so it
//! is `#[ignore = "needs chromium"]`: a plain `cargo test` leaves it out (and says so),
//! `scripts/test.sh` installs them and runs it (`--run-ignored all`), and run without them it
//! fails, naming what is missing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Runs one script of tests/browser against a fresh server; fails on any failed check.
async fn run_script(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let missing = missing_prerequisites(&dir);
    assert!(
        missing.is_empty(),
        "the browser test cannot run, missing: {} (scripts/test.sh installs them)",
        missing.join(", ")
    );
    let server = TestServer::start().await;
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
