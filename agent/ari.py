"""The ARI way in: channels in the Stasis app, the opt-out digit from their events, hangups over REST.

Protocol only; the press sequence is agent/intake.py's. aioari (the design's library) opens the websocket
and reads events; its known limits are contained here:
- `run()` returns when the socket closes and never reconnects: `AriAgent.run` reconnects with backoff and,
  since Asterisk does not replay events sent while no socket was connected, lists the app's channels again.
- it awaits listeners inside the socket reader, and Asterisk drops a reader stalled over 100 ms: the one
  listener here is synchronous and only updates memory and starts tasks; nothing in it waits on I/O.
- `aioari.connect` puts the password in the URL (api_key): the client is built with HTTP Basic auth instead.
The hangup itself (`DELETE /channels/{id}`) goes over one kept-alive connection pool of our own, sized
small on purpose: under a burst, requests queued on warm connections beat opening dozens of new ones.
For a call without OPTOUT_NUMBER, the number Asterisk dialled is read once (two `GET .../variable`) when
the channel enters the app, so it is known by the time the callee presses (agent/telephony.py says why).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import logging
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aioari
import aiohttp
from aioswagger11.http_client import AsynchronousHttpClient, BasicAuthenticator

from agent import metrics
from agent.backoff import Backoff
from agent.constants import Origin
from agent.errors import TelephonyError
from agent.intake import Intake
from agent.lifecycle import Resource, within
from agent.optout import HangupInfo
from agent.telephony import CHANNEL_VARS, REMOTE_URI, REQUEST_URI, ChannelFacts, dialled_number, parse_ari_time

log = logging.getLogger("agent.ari")

HANGUP_EVENTS = frozenset({"ChannelHangupRequest", "StasisEnd", "ChannelDestroyed"})
LOOKUP_WAIT = 0.5
"""How long a press waits for the dialled-number lookup of a call without OPTOUT_NUMBER (seconds)."""
_REST_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError)
"""What one ARI REST call raises: the transport failed, it took too long, or the body is not JSON."""


@dataclass
class Channel:
    """A channel in the app, as the agent tracks it."""

    id: str
    facts: ChannelFacts
    lookup: asyncio.Task[str | None] | None = None
    pressing: bool = False


class CallWatcher(Protocol):
    """Something that follows the app's calls without taking part in the press path (agent/speech's
    listener). Its methods are called inside the websocket reader: they must not wait."""

    def owns(self, channel_id: str) -> bool:
        """Whether the channel is one the watcher created (its events are not calls)."""

    def call_started(self, facts: ChannelFacts) -> None:
        """A call entered the app."""

    def call_ended(self, channel_id: str) -> None:
        """A call left the app (or was found gone after a reconnect)."""


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
        self, *, url: str, username: str, password: str, app: str, intake: Intake, hangup_connections: int = 4,
        request_timeout: float = 2.0,
    ) -> None:
        self._url = url.rstrip("/")
        self._username = username
        self._password = password
        self._app = app
        self._intake = intake
        self._hangup_connections = hangup_connections
        self._timeout = request_timeout
        self._channels: dict[str, Channel] = {}
        self._lookups: set[asyncio.Task[Any]] = set()
        self._rest: aiohttp.ClientSession | None = None
        self._client: Any = None
        self._http_client: _HeaderAuthHttpClient | None = None
        self._accepting = True
        self.connected = False
        self.watcher: CallWatcher | None = None
        """Told of every call that enters and leaves the app (spoken opt-out); None: nobody."""

    # --- lifecycle ---------------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the kept-alive REST pool the hangups use (the websocket is `run()`'s)."""
        self._rest = aiohttp.ClientSession(
            headers={"Authorization": basic_auth(self._username, self._password)},
            connector=aiohttp.TCPConnector(limit=self._hangup_connections, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
        )

    async def close(self) -> None:
        """Close the websocket and the REST pool (after the intake drained). Safe to call twice."""
        self._accepting = False
        await self._close_client()
        for task in list(self._lookups):
            task.cancel()
        if self._rest is not None:
            rest, self._rest = self._rest, None
            await rest.close()

    async def stop_accepting(self) -> None:
        """SIGTERM: close the websocket so no new event comes in; in-flight hangups go on."""
        self._accepting = False
        await self._close_client()

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
        except _REST_ERRORS as exc:
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

    async def _resync(self) -> None:
        """After (re)connecting: track every channel the app holds now."""
        assert self._rest is not None
        async with self._rest.get(f"{self._url}/ari/applications/{self._app}") as resp:
            resp.raise_for_status()
            app = await resp.json()
        ids = set(app.get("channel_ids") or [])
        if self.watcher is not None:
            ids = {i for i in ids if not self.watcher.owns(i)}
        for gone in set(self._channels) - ids:
            self._channels.pop(gone, None)
            if self.watcher is not None:
                self.watcher.call_ended(gone)
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
        if self.watcher is not None and "channel" in event and self.watcher.owns(event["channel"]["id"]):
            return  # the watcher's own channels (snoop, external media) are not calls
        if kind == "StasisStart":
            self._track(event["channel"])
        elif kind == "ChannelDtmfReceived":
            self._on_dtmf(event)
        elif kind in HANGUP_EVENTS:
            chan_id = event["channel"]["id"]
            self._intake.hangup_seen(chan_id, parse_ari_time(event.get("timestamp")) or datetime.now(UTC))
            if kind != "ChannelHangupRequest":
                if self.watcher is not None:
                    self.watcher.call_ended(chan_id)
                chan = self._channels.pop(chan_id, None)
                if chan is not None and chan.lookup is not None and not chan.pressing:
                    chan.lookup.cancel()
        # Every other event type is of no interest and is ignored.

    def _track(self, channel: dict[str, Any]) -> Channel:
        facts = facts_from_ari(channel)
        chan = self._channels.get(facts.uniqueid)
        if chan is None:
            chan = self._channels[facts.uniqueid] = Channel(facts.uniqueid, facts)
            self._intake.arrived(facts, Origin.ARI)
            if self.watcher is not None:
                self.watcher.call_started(facts)
            if facts.var("OPTOUT_NUMBER") is None:
                chan.lookup = self._spawn(self._dialled(facts.uniqueid), name=f"ari-dialled-{facts.uniqueid}")
        return chan

    def _on_dtmf(self, event: dict[str, Any]) -> None:
        if event["digit"] != self._intake.digit:
            return
        chan_id = event["channel"]["id"]
        if self._intake.seen(chan_id):
            return  # a second press, or "99": one opt-out
        chan = self._channels.get(chan_id)
        if chan is None:
            # A press on a channel we never saw start (e.g. events lost across a reconnect): still honour it.
            log.warning("opt-out digit on a channel the agent had not tracked; handling it", extra={"channel": chan_id})
            chan = self._track(event["channel"])
        pressed_at = parse_ari_time(event.get("timestamp")) or datetime.now(UTC)
        if chan.lookup is not None and chan.lookup.done() and not chan.lookup.cancelled():
            if not chan.lookup.exception() and (dialled := chan.lookup.result()):
                chan.facts = dataclasses.replace(chan.facts, dialled=dialled)
            chan.lookup = None
        if chan.lookup is None:
            self._press(chan, pressed_at)
        elif not chan.pressing:
            chan.pressing = True
            self._intake.arriving(self._spawn(self._press_after_lookup(chan, pressed_at), name=f"ari-press-{chan_id}"))

    def _press(self, chan: Channel, pressed_at: datetime, received_at: datetime | None = None) -> None:
        chan_id = chan.id
        self._intake.press(chan.facts, origin=Origin.ARI, pressed_at=pressed_at, received_at=received_at,
                           hang_up=lambda: self.hang_up_channel(chan_id))

    async def _press_after_lookup(self, chan: Channel, pressed_at: datetime) -> None:
        assert chan.lookup is not None
        received_at = datetime.now(UTC)
        dialled = None
        try:
            dialled = await within(asyncio.shield(chan.lookup), LOOKUP_WAIT)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if this is not None and this.cancelling():
                self._press(chan, pressed_at, received_at)  # the agent is closing: the press is still journaled
                raise
        if dialled:
            chan.facts = dataclasses.replace(chan.facts, dialled=dialled)
        self._press(chan, pressed_at, received_at)

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        return task

    async def _dialled(self, chan_id: str) -> str | None:
        """The number Asterisk dialled on the channel, when it is an outbound PJSIP one."""
        request_uri, remote_uri = await asyncio.gather(self._variable(chan_id, REQUEST_URI),
                                                       self._variable(chan_id, REMOTE_URI))
        return dialled_number(request_uri, remote_uri)

    async def _variable(self, chan_id: str, name: str) -> str | None:
        """A channel variable or function; None when it cannot be read (not that channel type, gone)."""
        if self._rest is None:
            return None
        try:
            async with self._rest.get(f"{self._url}/ari/channels/{chan_id}/variable",
                                      params={"variable": name}) as resp:
                if resp.status != 200:
                    return None
                value = (await resp.json()).get("value")
                return value if isinstance(value, str) else None
        except _REST_ERRORS as exc:
            log.debug("reading %s of %s failed: %s", name, chan_id, exc)
            return None

    # --- hanging up ----------------------------------------------------------------------------------------
    async def hang_up_channel(self, chan_id: str) -> HangupInfo:
        """`DELETE /channels/{id}`; never raises (a failure comes back in the result)."""
        requested = datetime.now(UTC)
        if self._rest is None:
            return HangupInfo(requested_at=requested, method="ari", result="error: ARI client closed")
        try:
            async with self._rest.delete(f"{self._url}/ari/channels/{chan_id}", params={"reason_code": "16"}) as resp:
                await resp.read()
                status = resp.status
        except _REST_ERRORS as exc:
            log.error("hangup request failed: %s", exc or type(exc).__name__, extra={"channel": chan_id})
            return HangupInfo.failed("ari", exc, requested_at=requested)
        result = "ok" if status == 204 else ("gone" if status == 404 else f"http {status}")
        return HangupInfo(requested_at=requested, method="ari", result=result)

    async def hang_up_call(self, call_id: str) -> list[HangupInfo]:
        """Hang up every tracked channel whose CALL_ID is `call_id` (the hangup endpoint); [] when none."""
        matches = [c.id for c in self._channels.values() if c.facts.var("CALL_ID") == call_id]
        return list(await asyncio.gather(*(self.hang_up_channel(chan_id) for chan_id in matches)))

    # --- placing calls (the dial guard's originate) --------------------------------------------------------
    async def originate(self, endpoint: str, variables: dict[str, str], caller_id: str | None) -> str:
        """Originate a call into the app with `variables` set; returns the channel id. Raises TelephonyError."""
        if self._rest is None or not self.connected:
            raise TelephonyError("ARI is not connected: the call cannot be placed")
        params = {"endpoint": endpoint, "app": self._app, **({"callerId": caller_id} if caller_id else {})}
        try:
            async with self._rest.post(f"{self._url}/ari/channels", params=params,
                                       json={"variables": variables}) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise TelephonyError(f"Asterisk refused the originate: HTTP {resp.status} {text[:200]}")
                channel_id = str((await resp.json()).get("id"))
        except _REST_ERRORS as exc:
            raise TelephonyError(f"originate over ARI failed: {exc or type(exc).__name__}") from exc
        return channel_id
