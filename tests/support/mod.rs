//! Shared test harness: a real roomcast server on an ephemeral 127.0.0.1 port, an independent
//! WebSocket client (tokio-tungstenite), and a small HTTP client (hyper).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
pub mod deflate;
pub mod deployment;
pub mod nodes;

use roomcast::Config;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before a test fails.
pub const STEP: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<roomcast::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    /// Starts a server on 127.0.0.1:0 with the default config changed by `tweak`.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(roomcast::run(listener, config, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Triggers shutdown and waits for `run` to return; returns how long that took.
    pub async fn shutdown(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle
                .await
                .expect("server task panicked")
                .expect("server returned an error");
        }
        started.elapsed()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = http(self.addr, "GET", path, None).await.unwrap();
        (r.status, r.json())
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = http(self.addr, "POST", path, Some(body.to_owned()))
            .await
            .unwrap();
        (r.status, r.json())
    }

    pub async fn stats(&self) -> Value {
        let (status, v) = self.get("/api/stats").await;
        assert_eq!(status, 200);
        v
    }

    /// Polls `GET path` until `pred` holds on its JSON, or fails after `STEP`.
    pub async fn wait_for(
        &self,
        path: &str,
        what: &str,
        pred: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let (status, v) = self.get(path).await;
            if pred(status, &v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}: last answer {status} {v}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Retries `attempt` every `every` until it returns `Some`, and returns that; fails the test
/// after `STEP`, naming `what`. For waiting on a condition instead of sleeping a fixed time and
/// hoping it holds.
pub async fn eventually<T, Fut>(what: &str, every: Duration, mut attempt: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(v) = attempt().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The headers of a WebSocket upgrade request sent as plain HTTP (to read a refusal's status
/// and JSON body).
pub const UPGRADE_HEADERS: [(&str, &str); 4] = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<HttpResponse> {
    http_with(addr, method, path, &[], body).await
}

pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Result<HttpResponse> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let typed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if body.is_some() && !typed {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tokio::time::timeout(STEP, sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An independent WebSocket client.
pub struct Client {
    pub ws: Ws,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::try_connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    pub async fn try_connect(url: &str) -> Result<Client> {
        let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url)).await??;
        Ok(Client { ws })
    }

    /// Connects and consumes the `welcome` frame, returning it.
    pub async fn join(url: &str) -> (Client, Value) {
        let mut c = Self::connect(url).await;
        let w = c.recv_type("welcome").await;
        (c, w)
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send(&v.to_string()).await;
    }

    /// The next data message as JSON (control frames are skipped).
    pub async fn try_recv(&mut self, within: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {within:?}"))?
                .ok_or_else(|| anyhow!("stream ended"))??;
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).context("text frame is not JSON")
                }
                Message::Close(c) => bail!("closed: {c:?}"),
                Message::Binary(_) => bail!("unexpected binary frame"),
                _ => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.try_recv(STEP).await.unwrap()
    }

    /// The next frame of type `kind`, skipping others (presence, mostly).
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Skips presence frames and returns the next other frame.
    pub async fn recv_non_presence(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] != "presence" {
                return v;
            }
        }
    }

    /// Asserts nothing but presence frames arrive within `within`.
    pub async fn expect_silence(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.try_recv(left).await {
                Ok(v) if v["type"] == "presence" => continue,
                Ok(v) => panic!("expected silence, got {v}"),
                Err(e) if e.to_string().starts_with("no frame") => return,
                Err(e) => panic!("expected silence, got {e}"),
            }
        }
    }

    /// Reads until the server's close frame; returns its code and reason. Data frames before it
    /// are counted and skipped.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let msg = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("no close frame in time")
                .expect("stream ended without a close frame")
                .expect("websocket error before close frame");
            if let Message::Close(frame) = msg {
                let frame = frame.expect("close frame without a code");
                return (u16::from(frame.code), frame.reason.to_string());
            }
        }
    }
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// Lifts this process's open-file soft limit (tests that open many sockets).
pub fn raise_nofile() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}

/// A server log line without terminal colour sequences (`ESC [ … letter`), for tests that read
/// the output of a `roomcast` process.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A masked client frame, as a client writes it: `b0` is the whole first byte (FIN, RSV bits,
/// opcode), any payload length form.
pub fn masked_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
