//! One WebSocket client's connect: bind a source address, TCP connect, HTTP upgrade through a
//! hyper client connection, then wait for the room's `welcome`. Every way it can fail has a
//! short name, so failures are counted by reason, never retried silently.

use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocket};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Server;
use crate::payload::{parse_incoming, Incoming};
use crate::sys::{errno_name, set_bind_address_no_port};
use crate::wire::Wire;

/// A connected client socket, its bytes counted (and inflated, with `--compression`) by `Wire`.
pub type Ws = WebSocket<Wire<TokioIo<Upgraded>>>;

/// Largest frame a client accepts, bytes: server frames are one chat message each.
const MAX_FRAME: usize = 1 << 20;

/// Why a connect failed, as counted in the report (`refused`, `http_503:too_many_connections`…).
pub type Reason = String;

/// Opens a client in `room` as `user`, returning the socket and the welcome's `seq`.
/// Not bounded in time by itself: the caller wraps it in a timeout (`timeout` reason).
/// Cancel-safe in the sense that dropping it only drops a half-open socket.
pub async fn connect(
    server: &Server,
    source: Option<Ipv4Addr>,
    room: &str,
    user: &str,
) -> Result<(Ws, u64), Reason> {
    let stream = open_tcp(server, source).await?;

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake:{}", hyper_reason(&e)))?;
    // Drives the HTTP/1 exchange until the upgrade hands the socket over; then it ends.
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });

    // With a token the server names the client by its `sub` (another `user` is refused).
    let mut req = match &server.token {
        Some(token) => Request::get(format!("/ws/{room}"))
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
        None => Request::get(format!("/ws/{room}?user={user}")),
    };
    if server.compression {
        req = req.header("Sec-WebSocket-Extensions", "permessage-deflate");
    }
    let req = req
        .header(HOST, server.host.as_str())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|_| "bad_request".to_string())?;
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("handshake:{}", hyper_reason(&e)))?;

    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status().as_u16();
        // The refusal body names the cause (`too_many_connections`); keep it in the reason.
        let body = Limited::new(resp.into_body(), 4096).collect().await;
        let code = body
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).ok())
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
        return Err(match code {
            Some(code) => format!("http_{status}:{code}"),
            None => format!("http_{status}"),
        });
    }
    let header_is = |name: hyper::header::HeaderName, want: &str| {
        resp.headers()
            .get(name)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h.eq_ignore_ascii_case(want))
    };
    if !header_is(UPGRADE, "websocket") || !header_is(CONNECTION, "upgrade") {
        return Err("handshake:bad_upgrade_headers".into());
    }
    // Asked for and not agreed to (`--compression off` on the server): a run that would
    // measure something else than it says.
    let agreed = resp
        .headers()
        .get("sec-websocket-extensions")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.starts_with("permessage-deflate"));
    if server.compression && !agreed {
        return Err("handshake:compression_declined".into());
    }
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| format!("upgrade:{}", hyper_reason(&e)))?;

    let mut ws = WebSocket::after_handshake(
        Wire::new(TokioIo::new(upgraded), server.inflate()),
        Role::Client,
    );
    ws.set_max_message_size(MAX_FRAME);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);

    loop {
        let frame = ws
            .read_frame()
            .await
            .map_err(|e| format!("before_welcome:{}", ws_reason(&e)))?;
        match frame.opcode {
            OpCode::Text => match parse_incoming(&frame.payload) {
                Incoming::Welcome { seq } => return Ok((ws, seq)),
                Incoming::Error { code } => return Err(format!("error_frame:{code}")),
                // The protocol sends welcome first; anything else first is worth a name.
                Incoming::Message { .. } => return Err("message_before_welcome".into()),
                _ => continue,
            },
            OpCode::Close => {
                return Err(format!("before_welcome:{}", close_reason(&frame.payload)))
            }
            _ => continue,
        }
    }
}

/// Binds a source address (if any) and connects.
async fn open_tcp(server: &Server, source: Option<Ipv4Addr>) -> Result<TcpStream, Reason> {
    let socket = if server.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket_{}", errno_name(&e)))?;
    if let Some(ip) = source.filter(|_| server.addr.is_ipv4()) {
        // Without it, bind picks a port that must be free towards every destination: slow
        // searches and early exhaustion with tens of thousands of sockets per address.
        set_bind_address_no_port(&socket).map_err(|e| format!("sockopt_{}", errno_name(&e)))?;
        socket
            .bind(SocketAddr::from((ip, 0)))
            .map_err(|e| format!("bind_{}", errno_name(&e)))?;
    }
    let stream = socket
        .connect(server.addr)
        .await
        .map_err(|e| errno_name(&e))?;
    // Small frames are the whole workload; do not let Nagle hold a publisher's frames back.
    let _ = stream.set_nodelay(true);

    Ok(stream)
}

/// Largest response head and first event an event stream may send before its welcome.
const MAX_SSE_HEAD: usize = 16 * 1024;

/// Opens an event stream on `room` as `user` (`GET /sse/{room}`), returning the socket and the
/// welcome's `seq`. What follows on the socket is the chunked event stream, which the caller
/// reads (and discards) itself: the `idle` scenario measures the server, not the parsing.
pub async fn connect_sse(
    server: &Server,
    source: Option<Ipv4Addr>,
    room: &str,
    user: &str,
) -> Result<(TcpStream, u64), Reason> {
    let mut stream = open_tcp(server, source).await?;
    let req = match &server.token {
        Some(token) => format!(
            "GET /sse/{room} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n",
            server.host
        ),
        None => format!(
            "GET /sse/{room}?user={user} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            server.host
        ),
    };
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| errno_name(&e))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("before_welcome:{}", errno_name(&e)))?;
        if n == 0 {
            return Err("before_welcome:eof".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(status) = text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)) {
            if status != "200" && text.contains("\r\n\r\n") {
                let code = text
                    .split_once("\"error\":\"")
                    .and_then(|(_, rest)| rest.split('"').next());
                return Err(match code {
                    Some(code) => format!("http_{status}:{code}"),
                    None => format!("http_{status}"),
                });
            }
        }
        if let Some(line) = text
            .split_once("event: welcome\n")
            .and_then(|(_, rest)| rest.split_once('\n'))
            .map(|(line, _)| line)
        {
            let seq = line
                .strip_prefix("data: ")
                .map(parse_incoming_str)
                .and_then(|w| match w {
                    Incoming::Welcome { seq } => Some(seq),
                    _ => None,
                })
                .ok_or_else(|| "bad_welcome".to_string())?;
            return Ok((stream, seq));
        }
        if buf.len() > MAX_SSE_HEAD {
            return Err("before_welcome:too_long".into());
        }
    }
}

fn parse_incoming_str(s: &str) -> Incoming {
    parse_incoming(s.as_bytes())
}

/// `close_1008:slow consumer` from a close frame's payload.
pub fn close_reason(payload: &[u8]) -> String {
    if payload.len() < 2 {
        return "close_no_code".into();
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let text = String::from_utf8_lossy(&payload[2..]);
    if text.is_empty() {
        format!("close_{code}")
    } else {
        format!("close_{code}:{text}")
    }
}

/// Short name of a WebSocket error.
pub fn ws_reason(e: &fastwebsockets::WebSocketError) -> String {
    use fastwebsockets::WebSocketError as E;
    match e {
        E::UnexpectedEOF => "eof".into(),
        E::IoError(io) => errno_name(io),
        E::ConnectionClosed => "closed".into(),
        E::FrameTooLarge => "frame_too_large".into(),
        E::InvalidUTF8 => "invalid_utf8".into(),
        E::SendError(_) => "send_error".into(),
        other => format!("protocol:{other}"),
    }
}

fn hyper_reason(e: &hyper::Error) -> String {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return errno_name(io);
        }
        source = s.source();
    }
    if e.is_incomplete_message() {
        "eof".into()
    } else if e.is_parse() {
        "bad_http".into()
    } else {
        "other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons() {
        let mut p = 1008u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"slow consumer");
        assert_eq!(close_reason(&p), "close_1008:slow consumer");
        assert_eq!(close_reason(&1000u16.to_be_bytes()), "close_1000");
        assert_eq!(close_reason(&[]), "close_no_code");
    }

    #[tokio::test]
    async fn refused_connect_is_named() {
        // Bind then drop a listener: the port is very likely closed right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let server = Server {
            url: format!("ws://127.0.0.1:{port}"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            host: format!("127.0.0.1:{port}"),
            compression: false,
            inflate: Default::default(),
            pid: None,
            token: None,
        };
        let err = connect(&server, Some(Ipv4Addr::new(127, 0, 0, 2)), "lt-0", "u0")
            .await
            .err()
            .expect("nothing listens there");
        assert_eq!(err, "refused");
    }

    #[tokio::test]
    async fn http_refusal_keeps_the_error_code() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = r#"{"error":"too_many_connections","reason":"full"}"#;
                let resp = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let server = Server {
            url: format!("ws://{addr}"),
            addr,
            host: addr.to_string(),
            compression: false,
            inflate: Default::default(),
            pid: None,
            token: None,
        };
        let err = connect(&server, None, "lt-0", "u0")
            .await
            .err()
            .expect("refused");
        assert_eq!(err, "http_503:too_many_connections");
    }
}
