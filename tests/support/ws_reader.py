"""A websocket client in a process of its own (as a browser would be), for the tests.

    python ws_reader.py URL TOKEN COUNT

Connects, prints ``ready`` once registered, then reads until it has seen COUNT ``succeeded``
job events, and prints the job events it saw as one JSON line ``[[id, event], ...]``. Exits 1
with the close reason if the server closes the connection first.
"""

from __future__ import annotations

import json
import sys

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


async def main(url: str, token: str, count: int) -> int:
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    seen: list[tuple[int, str]] = []
    succeeded = 0
    async with open_websocket_url(url, extra_headers=headers) as ws:
        while json.loads(await ws.get_message())["type"] != "registered":
            pass
        print("ready", flush=True)
        try:
            while succeeded < count:
                msg = json.loads(await ws.get_message())
                if msg["type"] == "job":
                    seen.append((msg["data"]["id"], msg["data"]["event"]))
                    succeeded += msg["data"]["event"] == "succeeded"
        except ConnectionClosed as exc:
            print(f"closed {exc.reason}", flush=True)
            return 1
    print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3])))
