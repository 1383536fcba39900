//! One WebSocket client's connect: bind a source address, TCP connect, HTTP upgrade, then wait
//! for the room's `welcome`. Every way it can fail has a short name, so failures are counted by
//! reason, never retried silently.
//!
//! The upgrade is one request written by hand and one response read with `httparse`, on the
//! socket itself: no hyper client connection, no task spawned per socket, and afterwards the
//! WebSocket reads the `TcpStream` directly instead of through hyper's boxed `Upgraded`.
//! Connects are the ramp's whole cost on this side, and every later read is a delivery.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fastwebsockets::{OpCode, Role, WebSocket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Server;
use crate::payload::{parse_incoming, Incoming};
use crate::sys::{errno_name, set_bind_address_no_port};

/// A connected client socket.
pub type Ws = WebSocket<Stream>;

/// Largest frame a client accepts, bytes: server frames are one chat message each.
const MAX_FRAME: usize = 1 << 20;
/// Largest upgrade response head read, bytes.
const MAX_HEAD: usize = 8192;
/// Largest refusal body read for its error code, bytes.
const MAX_BODY: usize = 4096;
/// Response headers parsed; the server sends about six.
const MAX_HEADERS: usize = 32;

/// Why a connect failed, as counted in the report (`refused`, `http_503:too_many_connections`…).
pub type Reason = String;

/// The upgraded TCP stream, with whatever the server sent right behind its 101 response (often
/// the `welcome` frame, read in the same segment) served first.
pub struct Stream {
    /// Bytes read past the response head; empty (no allocation) once consumed.
    early: Bytes,
    tcp: TcpStream,
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Opens a client in `room` as `user`, returning the socket and the welcome's `seq`.
/// Not bounded in time by itself: the caller wraps it in a timeout (`timeout` reason).
/// Cancel-safe in the sense that dropping it only drops a half-open socket.
pub async fn connect(
    server: &Server,
    source: Option<Ipv4Addr>,
    room: &str,
    user: &str,
) -> Result<(Ws, u64), Reason> {
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
    let mut tcp = socket
        .connect(server.addr)
        .await
        .map_err(|e| errno_name(&e))?;
    // Small frames are the whole workload; do not let Nagle hold a publisher's frames back.
    let _ = tcp.set_nodelay(true);

    let early = upgrade(&mut tcp, &server.host, room, user).await?;
    let mut ws = WebSocket::after_handshake(Stream { early, tcp }, Role::Client);
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

/// Sends the upgrade request and reads the response head. Returns the bytes read past the
/// head (the start of the WebSocket stream). A refusal becomes `http_<status>[:<code>]`, with
/// the error code from its JSON body.
async fn upgrade(tcp: &mut TcpStream, host: &str, room: &str, user: &str) -> Result<Bytes, Reason> {
    let io = |e: io::Error| format!("handshake:{}", errno_name(&e));
    // Room and user names of this tool (`lt-<n>`, `u<n>`) need no percent-encoding.
    let request = format!(
        "GET /ws/{room}?user={user} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        fastwebsockets::handshake::generate_key()
    );
    tcp.write_all(request.as_bytes()).await.map_err(io)?;

    let mut buf = BytesMut::with_capacity(1024);
    let head = loop {
        if tcp.read_buf(&mut buf).await.map_err(io)? == 0 {
            return Err("handshake:eof".into());
        }
        match Head::parse(&buf)? {
            Some(head) => break head,
            None if buf.len() >= MAX_HEAD => return Err("handshake:bad_http".into()),
            None => {}
        }
    };
    let rest = buf.split_off(head.len);
    if head.status != 101 {
        return Err(refusal(tcp, &head, rest).await);
    }
    if !head.upgrade_websocket || !head.connection_upgrade {
        return Err("handshake:bad_upgrade_headers".into());
    }
    Ok(rest.freeze())
}

/// The parts of an HTTP response head the upgrade looks at.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes of the head, blank line included.
    len: usize,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    content_length: Option<usize>,
}

impl Head {
    /// `Ok(None)` while the head is incomplete.
    fn parse(buf: &[u8]) -> Result<Option<Head>, Reason> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("handshake:bad_http".into()),
        };
        let is = |name: &str, want: &str| {
            resp.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case(name)
                    && std::str::from_utf8(h.value)
                        .is_ok_and(|v| v.trim().eq_ignore_ascii_case(want))
            })
        };
        let content_length = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
        Ok(Some(Head {
            status: resp.code.unwrap_or(0),
            len,
            upgrade_websocket: is("upgrade", "websocket"),
            connection_upgrade: is("connection", "upgrade"),
            content_length,
        }))
    }
}

/// `http_503:too_many_connections`: the status, and the `error` code of the JSON body when it
/// has one (read up to its length or `MAX_BODY`).
async fn refusal(tcp: &mut TcpStream, head: &Head, mut body: BytesMut) -> Reason {
    let want = head.content_length.unwrap_or(MAX_BODY).min(MAX_BODY);
    while body.len() < want {
        match tcp.read_buf(&mut body).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let code = serde_json::from_slice::<serde_json::Value>(&body[..body.len().min(want)])
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
    match code {
        Some(code) => format!("http_{}:{code}", head.status),
        None => format!("http_{}", head.status),
    }
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
        };
        let err = connect(&server, None, "lt-0", "u0")
            .await
            .err()
            .expect("refused");
        assert_eq!(err, "http_503:too_many_connections");
    }

    #[test]
    fn response_heads() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: x\r\n\r\n\x81\x02hi";
        let head = Head::parse(ok).expect("valid").expect("complete");
        assert_eq!(head.status, 101);
        assert!(head.upgrade_websocket && head.connection_upgrade);
        assert_eq!(
            &ok[head.len..],
            b"\x81\x02hi",
            "the frame behind the head is kept"
        );
        assert_eq!(Head::parse(&ok[..20]), Ok(None), "incomplete");
        assert_eq!(
            Head::parse(b"HTTP/1.1 101 OK\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n")
                .expect("valid")
                .map(|h| h.upgrade_websocket),
            Some(false)
        );
        assert_eq!(
            Head::parse(b"HTTP/1.1 503 Busy\r\ncontent-length: 12\r\n\r\n")
                .expect("valid")
                .map(|h| (h.status, h.content_length)),
            Some((503, Some(12)))
        );
        assert_eq!(
            Head::parse(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err("handshake:bad_http".to_string())
        );
    }

    #[tokio::test]
    async fn early_bytes_are_read_before_the_socket() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tcp, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut peer, _) = accepted.expect("accept");
        peer.write_all(b" world").await.expect("write");
        let mut s = Stream {
            early: Bytes::from_static(b"hello"),
            tcp: tcp.expect("connect"),
        };
        let mut got = vec![0u8; 11];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"hello world");
    }
}
