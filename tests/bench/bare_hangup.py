"""The floor: a bare ARI client that does nothing but hang up a channel on the digit 9.

Same transport choices as the agent (one websocket, one small kept-alive REST pool), no recording at all.
Run: ARI_URL=... ARI_USERNAME=... ARI_PASSWORD=... python tests/bench/bare_hangup.py
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal

import aiohttp


async def main() -> None:
    url = os.environ.get("ARI_URL", "http://127.0.0.1:8088").rstrip("/")
    token = base64.b64encode(f"{os.environ.get('ARI_USERNAME', 'optout')}:{os.environ['ARI_PASSWORD']}".encode())
    headers = {"Authorization": "Basic " + token.decode()}
    app = os.environ.get("ARI_APP", "optout-agent")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    pool = aiohttp.TCPConnector(limit=int(os.environ.get("ARI_HANGUP_CONNECTIONS", "4")))
    async with aiohttp.ClientSession(headers=headers, connector=pool) as rest, \
            aiohttp.ClientSession(headers=headers) as wss:
        ws = await wss.ws_connect(f"{url.replace('http', 'ws', 1)}/ari/events", params={"app": app})
        print("ready", flush=True)

        async def hangup(chan: str) -> None:
            async with rest.delete(f"{url}/ari/channels/{chan}", params={"reason_code": "16"}) as resp:
                await resp.read()

        async def read() -> None:
            async for msg in ws:
                event = json.loads(msg.data)
                if event.get("type") == "ChannelDtmfReceived" and event.get("digit") == "9":
                    t = asyncio.create_task(hangup(event["channel"]["id"]))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

        reader = asyncio.create_task(read())
        await stop.wait()
        reader.cancel()
        await ws.close()


if __name__ == "__main__":
    asyncio.run(main())
