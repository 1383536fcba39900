"""An independent permessage-deflate client for tests/compression.rs: Python `websockets`.

    client.py URL CLIENTS MESSAGES

Opens CLIENTS sockets to URL (each offering permessage-deflate, as websockets does by
default), reads MESSAGES chat messages on each, inflating them itself, and prints one JSON line
per socket: the extension it agreed to and the texts it got, in order. Exits non-zero on any
error or after 30 s.
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def member(url, user, count):
    async with connect(f"{url}?user={user}", open_timeout=10) as ws:
        names = [e.name for e in ws.protocol.extensions]
        texts = []
        while len(texts) < count:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "message":
                texts.append(frame["text"])
        return {"extensions": ",".join(names), "texts": texts}


async def main():
    url, clients, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    results = await asyncio.wait_for(
        asyncio.gather(*(member(url, f"py{i}", count) for i in range(clients))), 30
    )
    for r in results:
        print(json.dumps(r), flush=True)


asyncio.run(main())
