"""The ARI agent: catches the opt-out digit on channels in the Stasis app and hangs them up at once.

aioari (the design's library) opens the websocket and reads events; its known limits are contained here:
- `run()` returns when the socket closes and never reconnects: `AriAgent.run` reconnects with backoff and,
  since Asterisk does not replay events sent while no socket was connected, lists the app's channels again.
- it awaits listeners inside the socket reader, and Asterisk drops a reader stalled over 100 ms: the one
  listener here is synchronous and only updates memory and starts tasks; nothing in it waits on I/O.
- `aioari.connect` puts the password in the URL (api_key): the client is built with HTTP Basic auth instead.
The hangup itself (`DELETE /channels/{id}`) goes over one kept-alive connection pool of our own, sized
small on purpose: under a burst, requests queued on warm connections beat opening dozens of new ones.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aioari
import aiohttp
from aioswagger11.http_client import AsynchronousHttpClient, BasicAuthenticator

from agent import metrics
from agent.backoff import Backoff
from agent.constants import Origin
from agent.errors import JournalError, TelephonyError
from agent.lifecycle import Resource
from agent.optout import HangupInfo, OptOutRecord
from agent.pipeline import OptOutPipeline, Terminator
from agent.telephony import CHANNEL_VARS, ChannelFacts, call_record

log = logging.getLogger("agent.ari")

HANGUP_PRIORITY_WAIT = 0.1
"""How long an opt-out's recording may wait for other calls' hangups to go out first (seconds)."""
HANGUP_EVENTS = frozenset({"ChannelHangupRequest", "StasisEnd", "ChannelDestroyed"})


@dataclass
class Channel:
    """A channel in the app, as the agent tracks it."""

    id: str
    facts: ChannelFacts
    opted_out: bool = False
    hangup_sent: bool = False
    hangup_seen: asyncio.Future[datetime] | None = field(default=None, repr=False)


def parse_ari_time(value: str) -> datetime:
    """ARI timestamps look like 2026-11-25T12:25:11.945+0000."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z")


def basic_auth(username: str, password: str) -> str:
    """An HTTP Basic Authorization header value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class _HeaderAuthHttpClient(AsynchronousHttpClient):  # type: ignore[misc]
    """aioswagger's client with Basic auth in a header for the websocket too.

    Its own `ws_connect` applies the authenticator to the query string, which would put the password in
    the URL (and so in access logs); here the websocket carries the same Authorization header as REST.
    """

    def __init__(self, host: str | None, username: str, password: str) -> None:
        super().__init__(auth=BasicAuthenticator(host, username, password))
        self._auth_header = {"Authorization": basic_auth(username, password)}

    async def ws_connect(self, url: str, params: dict[str, str] | None = None) -> aiohttp.ClientWebSocketResponse:
        ws: aiohttp.ClientWebSocketResponse = await self.session.ws_connect(
            url, params=params or {}, headers=self._auth_header, heartbeat=10
        )
        self.websockets.add(ws)
        return ws


def facts_from_ari(channel: dict[str, Any]) -> ChannelFacts:
    """The facts of an ARI Channel object. Raises KeyError/TypeError when it has no id."""
    variables = {k: str(v) for k, v in (channel.get("channelvars") or {}).items() if k in CHANNEL_VARS and v}
    dialplan = channel.get("dialplan") or {}
    return ChannelFacts(
        uniqueid=str(channel["id"]),
        name=str(channel.get("name", "")),
        linkedid=channel.get("linkedid"),
        variables=variables,
        connected_number=(channel.get("connected") or {}).get("number") or None,
        caller_number=(channel.get("caller") or {}).get("number") or None,
        exten=dialplan.get("exten"),
        context=dialplan.get("context"),
    )


class AriAgent(Resource):
    """One ARI connection for one Stasis app; `run()` until cancelled."""

    def __init__(
        self, *, url: str, username: str, password: str, app: str, digit: str, region: str,
        pipeline: OptOutPipeline, hangup_connections: int = 4, request_timeout: float = 2.0,
    ) -> None:
        self._url = url.rstrip("/")
        self._username = username
        self._password = password
        self._app = app
        self._digit = digit
        self._region = region
        self._pipeline = pipeline
        self._hangup_connections = hangup_connections
        self._timeout = request_timeout
        self._channels: dict[str, Channel] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rest: aiohttp.ClientSession | None = None
        self._client: Any = None
        self._http_client: _HeaderAuthHttpClient | None = None
        self._accepting = True
        self.connected = False
        # Hangups first: the store and Redis work of an opt-out waits while any hangup is in flight, so
        # under a burst every call is ended before the machine spends time on recording (the journal
        # write is not held back: it runs alongside the hangup).
        self._hangups_in_flight = 0
        self._no_hangup_in_flight = asyncio.Event()
        self._no_hangup_in_flight.set()

    # --- lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the kept-alive REST pool the hangups use (the websocket is `run()`'s)."""
        self._rest = aiohttp.ClientSession(
            headers={"Authorization": basic_auth(self._username, self._password)},
            connector=aiohttp.TCPConnector(limit=self._hangup_connections, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )

    async def close(self) -> None:
        """Close the websocket and the REST pool (after `drain`). Safe to call twice."""
        self._accepting = False
        await self._close_client()
        if self._rest is not None:
            rest, self._rest = self._rest, None
            await rest.close()

    async def run(self) -> None:
        """Connect, read events, reconnect with backoff when the socket drops; until cancelled or stopped."""
        backoff = Backoff("ARI connection", initial=0.1, maximum=2.0, logger=log)
        try:
            while self._accepting:
                try:
                    await self._session_once(backoff)
                except (aiohttp.ClientError, OSError, TelephonyError, TimeoutError) as exc:
                    self._set_connected(False)
                    if self._accepting:
                        await asyncio.sleep(backoff.delay(exc))
                    continue
                self._set_connected(False)
                if self._accepting:
                    log.warning("ARI websocket closed; reconnecting")
                    await asyncio.sleep(backoff.delay("websocket closed"))
        finally:
            self._set_connected(False)
            await self._close_client()

    async def _session_once(self, backoff: Backoff) -> None:
        host = urllib.parse.urlsplit(self._url).hostname
        http_client = _HeaderAuthHttpClient(host, self._username, self._password)
        client = aioari.Client(self._url + "/", http_client)
        self._client, self._http_client = client, http_client
        try:
            await client.init()
        except Exception as exc:
            await self._close_client()
            if isinstance(exc, aiohttp.ClientResponseError):
                raise TelephonyError(f"ARI at {self._url} refused the client: HTTP {exc.status}") from exc
            if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
                raise
            raise TelephonyError(f"ARI at {self._url}: {type(exc).__name__}: {exc}") from exc
        # aioari keeps the whole Swagger description as many small objects; moving what exists now out of
        # the collector's reach keeps full collections (and the pauses they cause mid-call) short.
        gc.freeze()
        client.on_event("*", self._on_event)
        run = asyncio.create_task(client.run(apps=self._app), name="ari-websocket")
        # List the app's channels only once the websocket is up, so no channel falls in between.
        deadline = time.monotonic() + self._timeout
        while not client.websockets and not run.done() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if run.done() or not client.websockets:
            run.cancel()
            why: object = (await asyncio.gather(run, return_exceptions=True))[0]
            await self._close_client()
            raise TelephonyError(f"ARI websocket for app {self._app!r} did not open: {why!r}")
        self._set_connected(True)
        backoff.reset()
        try:
            await self._resync()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not list the app's channels after connecting: %s", exc)
        log.info("ARI connected", extra={"app": self._app, "channels": len(self._channels)})
        try:
            await run
        finally:
            await self._close_client()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        http_client, self._http_client = self._http_client, None
        if client is not None and "repositories" in vars(client):  # aioari's close() needs a finished init()
            try:
                await client.close()
            except Exception as exc:  # noqa: BLE001 - closing a broken client must not mask why it broke
                log.debug("closing the ARI client: %s", exc)
        if http_client is not None:
            # aioari's close() skips its HTTP session when init() never finished; close it here either way.
            await http_client.close()

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        metrics.CONNECTED.labels("ari").set(1 if value else 0)

    async def stop_accepting(self) -> None:
        """SIGTERM: close the websocket so no new event comes in; in-flight hangups and opt-outs go on."""
        self._accepting = False
        await self._close_client()

    async def drain(self, within: float) -> None:
        """Wait for in-flight opt-out tasks (what does not finish stays journaled)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=within)

    async def _resync(self) -> None:
        """After (re)connecting: track every channel the app holds now."""
        assert self._rest is not None
        async with self._rest.get(f"{self._url}/ari/applications/{self._app}") as resp:
            resp.raise_for_status()
            app = await resp.json()
        ids = set(app.get("channel_ids") or [])
        for gone in set(self._channels) - ids:
            self._channels.pop(gone, None)
        for chan_id in ids - set(self._channels):
            async with self._rest.get(f"{self._url}/ari/channels/{chan_id}") as resp:
                if resp.status == 200:
                    self._track(await resp.json())

    # --- events (synchronous: never wait inside the websocket reader) --------------------------------
    def _on_event(self, event: Any, *args: Any) -> None:
        try:
            self._dispatch(event)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("skipped a malformed ARI event: %s: %s", type(exc).__name__, exc,
                        extra={"event_type": event.get("type") if isinstance(event, dict) else None})

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "StasisStart":
            self._track(event["channel"])
        elif kind == "ChannelDtmfReceived":
            self._on_dtmf(event)
        elif kind in HANGUP_EVENTS:
            chan_id = event["channel"]["id"]
            chan = self._channels.get(chan_id)
            if chan is None:
                return
            if chan.hangup_seen is not None and not chan.hangup_seen.done():
                chan.hangup_seen.set_result(parse_ari_time(event["timestamp"]))
            if kind != "ChannelHangupRequest":
                self._channels.pop(chan_id, None)
        # Every other event type is of no interest and is ignored.

    def _track(self, channel: dict[str, Any]) -> Channel:
        facts = facts_from_ari(channel)
        chan = self._channels.get(facts.uniqueid)
        if chan is None:
            chan = self._channels[facts.uniqueid] = Channel(facts.uniqueid, facts)
        return chan

    def _on_dtmf(self, event: dict[str, Any]) -> None:
        if event["digit"] != self._digit:
            return
        chan_id = event["channel"]["id"]
        chan = self._channels.get(chan_id)
        if chan is None:
            # A press on a channel we never saw start (e.g. events lost across a reconnect): still honour it.
            log.warning("opt-out digit on a channel the agent had not tracked; handling it", extra={"channel": chan_id})
            chan = self._track(event["channel"])
        if chan.opted_out:
            return  # a second press, or "99": one opt-out
        chan.opted_out = True
        pressed_at = parse_ari_time(event["timestamp"])
        chan.hangup_seen = asyncio.get_running_loop().create_future()
        self._hangups_in_flight += 1
        self._no_hangup_in_flight.clear()
        record = call_record(chan.facts, origin=Origin.ARI, digit=self._digit, pressed_at=pressed_at,
                             region=self._region)

        async def terminate() -> HangupInfo:
            # The pipeline calls this as soon as the opt-out is in the journal.
            info = await self._hangup(chan, pressed_at)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_hangup_in_flight.wait(), HANGUP_PRIORITY_WAIT)
            return info

        self._spawn(self._record(record, terminate, chan), name=f"ari-optout-{chan_id}")

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _hangup(self, chan: Channel, pressed_at: datetime) -> HangupInfo:
        assert self._rest is not None
        chan.hangup_sent = True
        requested = datetime.now(UTC)
        started = time.perf_counter()
        try:
            async with self._rest.delete(
                f"{self._url}/ari/channels/{chan.id}", params={"reason_code": "16"}
            ) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.error("hangup request failed: %s", exc, extra={"channel": chan.id})
            return HangupInfo(requested_at=requested, method="ari", result=f"error: {exc}"[:200])
        finally:
            self._hangups_in_flight -= 1
            if self._hangups_in_flight == 0:
                self._no_hangup_in_flight.set()
        metrics.PRESS_TO_HANGUP.labels("ari").observe(max(0.0, (datetime.now(UTC) - pressed_at).total_seconds()))
        result = "ok" if status == 204 else ("gone" if status == 404 else f"http {status}")
        log.debug("hangup %s: %s, requested %.1f ms after the press, answered in %.1f ms", chan.id, result,
                  (requested - pressed_at).total_seconds() * 1000, (time.perf_counter() - started) * 1000)
        hungup_at = None
        if chan.hangup_seen is not None:
            with contextlib.suppress(TimeoutError):
                hungup_at = await asyncio.wait_for(asyncio.shield(chan.hangup_seen), 1.0)
        return HangupInfo(requested_at=requested, hungup_at=hungup_at, method="ari", result=result)

    async def _record(self, record: OptOutRecord, terminate: Terminator, chan: Channel) -> None:
        try:
            await self._pipeline.submit(record, terminate=terminate)
        except JournalError as exc:
            log.critical("opt-out could not be journaled: %s", exc, extra={"event_id": record.event_id})
        except Exception:
            log.exception("opt-out pipeline failed; ending the call anyway", extra={"event_id": record.event_id})
        finally:
            if not chan.hangup_sent:  # the pipeline never got to it: the call still ends
                await self._hangup(chan, record.pressed_at or datetime.now(UTC))

    # --- the termination endpoint ----------------------------------------------------------------------
    async def terminate_call(self, call_id: str) -> bool:
        """Hang up every tracked channel whose CALL_ID is `call_id`; False when there is none."""
        assert self._rest is not None
        matches = [c for c in self._channels.values() if c.facts.var("CALL_ID") == call_id]
        done = False
        for chan in matches:
            async with self._rest.delete(f"{self._url}/ari/channels/{chan.id}", params={"reason_code": "16"}) as r:
                await r.read()
                done = done or r.status in (204, 404)
        return done
