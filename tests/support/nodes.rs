//! Real processes for cluster and behaviour tests: a `redis-server` of our own on a free port,
//! and `roomcast` processes (the built binary: it can be killed with SIGKILL) that say where
//! they listen.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::{http, http_with, strip_ansi, STEP};

/// Node TTL given to every cluster node: a SIGKILLed node leaves the counts within this.
pub const NODE_TTL_SECS: f64 = 1.5;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A `redis-server` of our own, killed when dropped.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    /// Starts one on a free port.
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): this test needs it on the PATH \
                     (apt-get install -y redis-server, or run scripts/test.sh)"
                )
            });
        let redis = Redis {
            child: Some(child),
            port,
        };
        let deadline = std::time::Instant::now() + STEP;
        while !redis.pings() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {port} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many scripts this server has run so far (`EVAL` and `EVALSHA`, from
    /// `INFO commandstats`).
    pub fn script_calls(&self) -> u64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"INFO commandstats\r\n").unwrap();
        // A bulk string: `$LEN\r\n` then LEN bytes and `\r\n`.
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).expect("read INFO");
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            if let Some((head, body)) = text.split_once("\r\n") {
                let len: usize = head.trim_start_matches('$').parse().expect("bulk length");
                if body.len() >= len {
                    break;
                }
            }
            assert!(n > 0, "redis closed the INFO reply");
        }
        String::from_utf8_lossy(&reply)
            .lines()
            .filter(|l| l.starts_with("cmdstat_eval:") || l.starts_with("cmdstat_evalsha:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        *self = Redis::start_on(self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `roomcast` process (with `--redis` in cluster mode), killed when dropped. Its output is kept for the panic check.
pub struct Node {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// `Authorization` for the polling helpers: the node's API key, else (with tokens on) a
    /// token for every room, so waiting on a room's info works whatever the access rules.
    operator: Option<String>,
}

impl Node {
    /// A cluster node on `redis`.
    pub async fn start(redis: &Redis, extra: &[&str]) -> Node {
        let url = redis.url();
        let ttl = format!("{NODE_TTL_SECS}s");
        let mut args = vec!["--redis", &url, "--cluster-node-ttl", &ttl];
        args.extend_from_slice(extra);
        Self::spawn(&args).await
    }

    /// A server on its own (no Redis).
    pub async fn standalone(extra: &[&str]) -> Node {
        Self::spawn(extra).await
    }

    pub async fn spawn(extra: &[&str]) -> Node {
        // A test may set its own presence interval (clap refuses a flag given twice).
        let presence: &[&str] = if extra.contains(&"--presence-interval") {
            &[]
        } else {
            &["--presence-interval", "50ms"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["--listen", "127.0.0.1:0"])
            .args(presence)
            // The tests publish faster than the default 20 messages/s per socket.
            .args(["--rate-limit", "off"])
            .args(extra)
            .env("ROOMCAST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start roomcast");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (pipe, tx) in [
            (Box::new(stdout) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(stderr), None),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let line = strip_ansi(&line);
                    if let (Some(tx), Some(i)) = (&tx, line.find("roomcast listening addr=")) {
                        if let Ok(addr) =
                            line[i + "roomcast listening addr=".len()..].trim().parse()
                        {
                            let _ = tx.send(addr);
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(STEP))
            .await
            .unwrap()
            .expect("roomcast did not say where it listens");
        let flag = |name: &str| {
            extra
                .iter()
                .position(|a| *a == name)
                .and_then(|i| extra.get(i + 1))
        };
        let operator = match (flag("--api-key"), flag("--jwt-secret")) {
            (Some(key), _) => Some(format!("Bearer {key}")),
            (None, Some(secret)) => {
                let token = roomcast::core::auth::issue(
                    secret,
                    "operator",
                    Some("*"),
                    Duration::from_secs(3600),
                )
                .expect("a token for the polling helpers");
                Some(format!("Bearer {token}"))
            }
            (None, None) => None,
        };
        let node = Node {
            child,
            addr,
            log,
            operator,
        };
        node.wait_health("ok").await;
        node
    }

    /// Peak resident memory of the process so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the node's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmHWM in /proc status")
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = http(self.addr, "GET", path, None).await.unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// `GET path` with the node's operator credential (see `operator`).
    pub async fn get_as_operator(&self, path: &str) -> (u16, Value) {
        let headers: Vec<(&str, &str)> = self
            .operator
            .as_deref()
            .map(|auth| ("authorization", auth))
            .into_iter()
            .collect();
        let r = http_with(self.addr, "GET", path, &headers, None)
            .await
            .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = http(self.addr, "POST", path, Some(body.to_string()))
            .await
            .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    /// Polls `GET path` until `pred` holds, or fails after `within`.
    pub async fn wait_for(
        &self,
        path: &str,
        what: &str,
        within: Duration,
        pred: impl Fn(u16, &Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (status, v) = self.get_as_operator(path).await;
            if pred(status, &v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: timed out waiting for {what}: last answer {status} {v}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_health(&self, status: &str) {
        self.wait_for("/healthz", &format!("/healthz {status}"), STEP, |s, v| {
            s == 200 && v["status"] == status
        })
        .await;
    }

    /// Waits until `/api/rooms/{room}` reports `members` cluster-wide and `local` here
    /// (`members == 0`: until the room is gone, 404).
    pub async fn wait_room(&self, room: &str, members: u64, local: u64) {
        let path = format!("/api/rooms/{room}");
        self.wait_for(
            &path,
            &format!("{room}: {members} members, {local} local"),
            STEP,
            |s, v| {
                if members == 0 {
                    s == 404
                } else {
                    s == 200 && v["members"] == members && v["local_members"] == local
                }
            },
        )
        .await;
    }

    /// Sends SIGTERM (the start of a graceful shutdown).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `within` for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for roomcast") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {within:?}; log:\n{}",
                self.addr,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process has printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails if the process died or logged a panic.
    pub fn assert_healthy(&mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "{} exited; log:\n{}",
            self.addr,
            self.log.lock().unwrap()
        );
        let log = self.log.lock().unwrap();
        assert!(!log.contains("panicked"), "{} panicked:\n{log}", self.addr);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
