"""Test calls through Asterisk (`optout call`, the test suite and the benchmarks).

A call is originated over ARI into one of the shipped IVRs, either over a Local channel or as a real SIP
call that Asterisk places to its own loopback transport (PJSIP + RTP, RFC 4733 DTMF); the caller leg sends
the digits. A `CallObserver` watches every channel (an ARI app subscribed to all events) and reports,
from Asterisk's own timestamps, when the IVR leg received the opt-out digit and when its hangup was
requested. Test calls are told apart by their CALL_ID channel variable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import aiohttp

from agent.errors import TelephonyError
from agent.lifecycle import Resource, within
from agent.telephony import parse_ari_time

log = logging.getLogger("agent.testcall")

Via = Literal["sip", "local"]
Ivr = Literal["ari", "agi", "plain"]
IVR_CONTEXTS: dict[str, str] = {"ari": "optout-ivr", "agi": "optout-agi-ivr", "plain": "optout-plain-ivr"}
OBSERVER_APP_PREFIX = "optout-testcall"


@dataclass
class CallResult:
    call_id: str
    number: str
    ivr_channel: str | None = None
    pressed_at: datetime | None = None
    hangup_requested_at: datetime | None = None
    destroyed_at: datetime | None = None
    digits: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    originated: list[str] = field(default_factory=list)

    @property
    def hung_up(self) -> bool:
        return self.hangup_requested_at is not None or self.destroyed_at is not None

    @property
    def press_to_hangup_ms(self) -> float | None:
        end = self.hangup_requested_at or self.destroyed_at
        if self.pressed_at is None or end is None:
            return None
        return (end - self.pressed_at).total_seconds() * 1000.0


class CallObserver(Resource):
    """Places test calls and watches them (async context manager)."""

    def __init__(self, *, ari_url: str, username: str, password: str, digit: str = "9",
                 connect_timeout: float = 10.0) -> None:
        self._connect_timeout = connect_timeout
        self._base = ari_url.rstrip("/")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}"}
        self._digit = digit
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._calls: dict[str, CallResult] = {}
        # One app name per observer: Asterisk lets only one websocket hold an app name.
        self._app = f"{OBSERVER_APP_PREFIX}-{uuid.uuid4().hex[:8]}"

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(headers=self._headers)
        ws_url = self._base.replace("http", "ws", 1) + "/ari/events"
        try:
            self._ws = await within(self._session.ws_connect(
                ws_url, params={"app": self._app, "subscribeAll": "true"}, heartbeat=20
            ), self._connect_timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._session.close()
            raise TelephonyError(f"ARI at {self._base} did not accept the observer's websocket: "
                                 f"{exc or 'no answer within ' + str(self._connect_timeout) + ' s'}") from exc
        self._reader = asyncio.create_task(self._read(), name="testcall-observer")

    async def close(self) -> None:
        reader, ws, session = self._reader, self._ws, self._session
        self._reader = self._ws = self._session = None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if ws is not None:
            await ws.close()
        if session is not None:
            await session.close()

    async def place(
        self, number: str, *, press: str = "9", via: Via = "sip", ivr: Ivr = "ari", campaign_id: str = "test-campaign",
        contact_id: str | None = None, call_id: str | None = None, hold_seconds: int = 15,
    ) -> CallResult:
        """Originate one test call; returns at once with a CallResult that fills in as events arrive."""
        assert self._session is not None
        call_id = call_id or f"test-{uuid.uuid4().hex[:12]}"
        result = CallResult(call_id=call_id, number=number)
        self._calls[call_id] = result
        if via == "sip":
            params = {"endpoint": f"Local/{ivr}@optout-test-sip-out", "context": "optout-test-caller"}
        else:
            params = {"endpoint": "Local/s@optout-test-caller", "context": IVR_CONTEXTS[ivr]}
        params.update(extension="s", priority="1", timeout="30")
        variables = {"PRESS": press, "HOLD": str(hold_seconds), "CALL_ID": call_id, "CAMPAIGN_ID": campaign_id,
                     "CONTACT_ID": contact_id or f"contact-{call_id}", "OPTOUT_NUMBER": number}
        async with self._session.post(
            f"{self._base}/ari/channels", params=params, json={"variables": variables}
        ) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise TelephonyError(f"originate refused: HTTP {resp.status} {body[:200]}")
            result.originated.append(json.loads(body)["id"])
        return result

    async def wait(self, result: CallResult, timeout: float) -> CallResult:  # noqa: ASYNC109 - a plain deadline
        """Wait until the IVR leg is gone, or `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await within(result.done.wait(), timeout)
        return result

    async def hangup_all(self, result: CallResult) -> None:
        """Clean up a call the agent was not supposed to end."""
        assert self._session is not None
        for chan in [*result.originated, *([result.ivr_channel] if result.ivr_channel else [])]:
            async with self._session.delete(f"{self._base}/ari/channels/{chan}") as resp:
                await resp.read()

    async def channel_exists(self, channel_id: str) -> bool:
        assert self._session is not None
        async with self._session.get(f"{self._base}/ari/channels/{channel_id}") as resp:
            await resp.read()
            return resp.status == 200

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            try:
                self._on_event(json.loads(msg.data))
            except (ValueError, KeyError, TypeError) as exc:
                log.debug("observer skipped an event: %s", exc)

    def _on_event(self, event: dict[str, Any]) -> None:
        channel = event.get("channel")
        if not isinstance(channel, dict):
            return
        call_id = (channel.get("channelvars") or {}).get("CALL_ID")
        result = self._calls.get(call_id or "")
        if result is None:
            return
        context = (channel.get("dialplan") or {}).get("context")
        if context not in IVR_CONTEXTS.values() and channel["id"] != result.ivr_channel:
            return
        kind = event.get("type")
        ts = parse_ari_time(event["timestamp"])
        if kind == "ChannelDtmfReceived":
            result.ivr_channel = result.ivr_channel or channel["id"]
            result.digits.append(event["digit"])
            if event["digit"] == self._digit and result.pressed_at is None:
                result.pressed_at = ts
        elif kind == "ChannelHangupRequest" and channel["id"] == result.ivr_channel:
            result.hangup_requested_at = result.hangup_requested_at or ts
        elif kind == "ChannelDestroyed" and channel["id"] == result.ivr_channel:
            result.destroyed_at = ts
            result.done.set()
        elif kind in ("ChannelStateChange", "ChannelVarset", "StasisStart", "ChannelDialplan"):
            result.ivr_channel = result.ivr_channel or channel["id"]
