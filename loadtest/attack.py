#!/usr/bin/env python3
"""One attack on a roomcast server on 127.0.0.1, for loadtest/attacks.sh: runs for SECONDS and
stops by itself. Standard library only; every socket goes to 127.0.0.1:PORT.

    attack.py MODE PORT SECONDS

MODE: slowloris (sockets that declare a 60,000-byte frame and send one byte a second), flood
(sockets sending 60,000 control characters as plain text, each a 360 KB frame once escaped, as
fast as the server takes them), pages (a room of 100 60-KB messages, and 8 loops reading
`limit=1000` pages), pings (sockets sending ping frames back to back), idle (2,000 sockets in
no room), logins (16 loops logging one account in with `POST /token`, the right password, as
fast as the server answers: every login is one Argon2id hash; needs a server with built-in
accounts; prints logins per second at the end)."""

import asyncio
import os
import sys

MODE, PORT, SECONDS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
UPGRADE = ("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def frame(opcode, payload):
    """A masked client frame (mask key 0: the payload is sent as it is)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


async def ws(path):
    r, w = await asyncio.open_connection("127.0.0.1", PORT)
    w.write(UPGRADE.format(path=path).encode())
    await r.readuntil(b"\r\n\r\n")
    return r, w


async def drain(r):
    try:
        while await r.read(65536):
            pass
    except Exception:
        pass


async def forever(make, n):
    """Runs `n` copies of `make(i)`, each started again when it ends, until the end."""
    async def loop(i):
        while True:
            try:
                await make(i)
            except Exception:
                await asyncio.sleep(0.2)
    tasks = [asyncio.create_task(loop(i)) for i in range(n)]
    await asyncio.sleep(SECONDS)
    for t in tasks:
        t.cancel()


async def slowloris(i):
    r, w = await ws(f"/ws/atk{i}?user=s{i}")
    w.write(bytes([0x81, 0x80 | 126]) + (60000).to_bytes(2, "big") + b"\0\0\0\0")
    while not r.at_eof():
        w.write(b"x")
        await w.drain()
        await asyncio.sleep(1)


async def flood(i):
    r, w = await ws(f"/ws/flood{i}?user=f{i}")
    asyncio.create_task(drain(r))
    msg = frame(1, b"\x01" * 60000)
    while True:
        w.write(msg)
        await w.drain()


async def pings(i):
    r, w = await ws(f"/ws/ping{i}?user=p{i}")
    asyncio.create_task(drain(r))
    ping = frame(9, b"p") * 64
    while True:
        w.write(ping)
        await w.drain()


async def page_reader(i):
    while True:
        r, w = await asyncio.open_connection("127.0.0.1", PORT)
        w.write(b"GET /api/rooms/pg/messages?limit=1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await drain(r)
        w.close()


async def pages():
    r, w = await ws("/ws/pg?user=pg")
    asyncio.create_task(drain(r))
    for _ in range(100):
        w.write(frame(1, b"y" * 60000))
    await w.drain()
    await asyncio.sleep(0.5)
    await forever(page_reader, 8)


async def idle():
    socks = []
    for i in range(2000):
        socks.append(await ws(f"/ws?user=i{i}"))
    await asyncio.sleep(SECONDS)


LOGIN_USER, LOGIN_PASSWORD = "flood", "flood-password-1"
counts = {}


async def http_status(request):
    r, w = await asyncio.open_connection("127.0.0.1", PORT)
    w.write(request)
    await w.drain()
    head = await r.readuntil(b"\r\n")
    await drain(r)
    w.close()
    return int(head.split()[1])


def post(path, content_type, body):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def login_loop(i):
    body = f"grant_type=password&username={LOGIN_USER}&password={LOGIN_PASSWORD}".encode()
    request = post("/token", "application/x-www-form-urlencoded", body)
    while True:
        status = await http_status(request)
        counts[status] = counts.get(status, 0) + 1


async def logins():
    body = ('{"username":"%s","password":"%s"}' % (LOGIN_USER, LOGIN_PASSWORD)).encode()
    status = await http_status(post("/register", "application/json", body))
    if status not in (201, 409):
        sys.exit(f"POST /register answered {status}: does the server have --accounts-db?")
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def report():
        # Every 5 s: attacks.sh stops this process when the chat run ends, not at SECONDS.
        while True:
            await asyncio.sleep(5)
            took = loop.time() - started
            print("logins after %.0f s: %s, %.1f logins/s" % (
                took, dict(sorted(counts.items())), counts.get(200, 0) / took), flush=True)
    reporter = asyncio.create_task(report())
    await forever(login_loop, 16)
    reporter.cancel()


async def main():
    if MODE == "slowloris":
        await forever(slowloris, 500)
    elif MODE == "flood":
        await forever(flood, 20)
    elif MODE == "pings":
        await forever(pings, 50)
    elif MODE == "pages":
        await pages()
    elif MODE == "idle":
        await idle()
    elif MODE == "logins":
        await logins()
    else:
        sys.exit(f"unknown mode {MODE}")


try:
    asyncio.run(asyncio.wait_for(main(), SECONDS + 30))
except (asyncio.TimeoutError, KeyboardInterrupt):
    pass
os._exit(0)
