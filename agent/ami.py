"""The AMI way in: DTMFEnd on plain-dialplan IVRs, the Hangup action on the opt-out digit.

Protocol only; the press sequence is agent/intake.py's. For IVRs that neither hand the channel to Stasis
nor call AGI (`optout-plain-ivr`): the agent logs in with read=call,dtmf and write=call only (never
originate: CVE-2024-42365) and reports a `DTMFEnd` with `Direction: Received` of the opt-out digit on a
channel whose `Context` is one of AMI_DTMF_CONTEXTS, with the event's own headers (`ChanVariable` carries
CALL_ID etc.: manager.conf `channelvars`). Filtering by context matters: on a Local or SIP test call the
other half of the call reports the same digit as received too. For a call without OPTOUT_NUMBER the
number Asterisk dialled is read with two `Getvar` actions first (agent/telephony.py says why).

panoramisk (the design's library) reads the socket; its known limits are contained here:
- it reconnects on a fixed 2 s timer and its pinger never reads the reply: both are switched off in
  `_Manager`; `AmiAgent.run` reconnects with the shared backoff and pings with a reply deadline, so a
  connection that went silent is noticed and `connected` (for /ready) tells the truth.
- it runs coroutine callbacks as fire-and-forget tasks and lets a callback's exception break the socket
  reader: the callbacks here are synchronous, catch everything, and start tasks.
AMI events carry Asterisk's own `Timestamp` only with manager.conf `timestampevents = yes`; without it the
agent's receive time stands in for the press and hangup times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from datetime import UTC, datetime
from typing import Any

from panoramisk import Manager

from agent import metrics
from agent.backoff import Backoff
from agent.constants import Origin
from agent.errors import TelephonyError
from agent.intake import Intake
from agent.lifecycle import Resource, within
from agent.optout import HangupInfo
from agent.telephony import CHANNEL_VARS, REMOTE_URI, REQUEST_URI, ChannelFacts, dialled_number, known

log = logging.getLogger("agent.ami")

HANGUP_EVENTS = ("HangupRequest", "SoftHangupRequest", "Hangup")


class _Manager(Manager):  # type: ignore[misc] # panoramisk ships no types
    """panoramisk's Manager without its own reconnect timer and blind pinger (AmiAgent does both)."""

    pinger: asyncio.TimerHandle | None

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.lost: asyncio.Event = asyncio.Event()

    def ping(self) -> None:
        """Disabled: AmiAgent pings and checks the reply."""

    def connection_made(self, f: asyncio.Future[Any]) -> None:
        if f.cancelled() or f.exception() is not None:
            self.lost.set()  # run() sees the failed connect through the awaited task
            return
        super().connection_made(f)
        if self.pinger is not None:
            self.pinger.cancel()
            self.pinger = None

    def connection_lost(self, exc: Any) -> None:
        self._connected = False
        self.lost.set()


def event_time(event: Any) -> datetime:
    """Asterisk's time of the event (manager.conf timestampevents=yes), else now."""
    stamp = event.get("Timestamp")
    if stamp:
        with contextlib.suppress(ValueError, OverflowError):
            return datetime.fromtimestamp(float(stamp), UTC)
    return datetime.now(UTC)


def facts_from_ami(event: Any) -> ChannelFacts:
    """The facts of a channel event's headers. Raises KeyError when it names no Uniqueid."""
    raw = event.get("ChanVariable") or []
    if isinstance(raw, str):
        raw = [raw]
    variables: dict[str, str] = {}
    for item in raw:
        name, sep, value = str(item).partition("=")
        if sep and name in CHANNEL_VARS and value:
            variables[name] = value
    uniqueid = event.get("Uniqueid")
    if not uniqueid:
        raise KeyError("Uniqueid")
    return ChannelFacts(
        uniqueid=str(uniqueid), name=str(event.get("Channel") or ""), linkedid=event.get("Linkedid") or None,
        variables=variables, connected_number=known(event.get("ConnectedLineNum")),
        caller_number=known(event.get("CallerIDNum")), exten=known(event.get("Exten")),
        context=event.get("Context") or None,
    )


class AmiAgent(Resource):
    """One AMI connection; `run()` until cancelled. Off unless AMI_HOST/AMI_USERNAME/AMI_SECRET are set."""

    def __init__(
        self, *, host: str, port: int, username: str, secret: str, contexts: frozenset[str], intake: Intake,
        ping_interval: float = 5.0, action_timeout: float = 2.0,
    ) -> None:
        if not contexts:
            raise TelephonyError("the AMI agent needs at least one context to watch (AMI_DTMF_CONTEXTS)")
        self._host = host
        self._port = port
        self._username = username
        self._secret = secret
        self._contexts = contexts
        self._intake = intake
        self._ping_interval = ping_interval
        self._timeout = action_timeout
        self._manager: _Manager | None = None
        self._looking_up: dict[str, asyncio.Task[None]] = {}
        self._accepting = True
        self._closed = False
        self.connected = False

    # --- lifecycle ---------------------------------------------------------------------------------
    async def close(self) -> None:
        """Log off and close the socket. Safe to call twice."""
        self._accepting = False
        self._closed = True
        self._close_manager()
        for task in list(self._looking_up.values()):
            task.cancel()

    async def stop_accepting(self) -> None:
        """SIGTERM: no new presses are taken; the connection stays for the hangups of those in flight (the
        AMI Hangup action is sent on it) until `close`."""
        self._accepting = False

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        metrics.CONNECTED.labels("ami").set(1 if value else 0)

    def _close_manager(self) -> None:
        manager, self._manager = self._manager, None
        self._set_connected(False)
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()

    async def run(self) -> None:
        """Connect, log in, watch; reconnect with backoff when the connection drops or stops answering pings."""
        backoff = Backoff("AMI connection", initial=0.2, maximum=5.0, logger=log)
        try:
            while not self._closed:
                try:
                    await self._session_once(backoff)
                except (OSError, TelephonyError, TimeoutError) as exc:
                    self._close_manager()
                    if not self._closed:
                        await asyncio.sleep(backoff.delay(exc))
        finally:
            self._close_manager()

    async def _session_once(self, backoff: Backoff) -> None:
        loop = asyncio.get_running_loop()
        manager = _Manager(host=self._host, port=self._port, username=self._username, secret=self._secret,
                           loop=loop, events="on")
        manager.register_event("DTMFEnd", self._on_dtmf)
        for name in HANGUP_EVENTS:
            manager.register_event(name, self._on_hangup)
        self._manager = manager
        await within(manager.connect(), self._timeout)
        deadline = time.monotonic() + self._timeout
        while not manager.authenticated:
            if manager.lost.is_set() or time.monotonic() > deadline:
                raise TelephonyError(f"AMI at {self._host}:{self._port} refused the login of {self._username!r}")
            await asyncio.sleep(0.01)
        await self._ping(manager)
        self._set_connected(True)
        backoff.reset()
        log.info("AMI connected", extra={"host": self._host, "port": self._port})
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await within(manager.lost.wait(), self._ping_interval)
            if manager.lost.is_set():
                raise TelephonyError("AMI connection lost")
            await self._ping(manager)

    async def _ping(self, manager: _Manager) -> None:
        try:
            reply = await within(manager.send_action({"Action": "Ping"}), self._timeout)
        except TimeoutError as exc:
            raise TelephonyError(f"AMI did not answer Ping within {self._timeout}s") from exc
        if not reply.success:
            raise TelephonyError(f"AMI answered Ping with {reply.get('Response')}: {reply.get('Message')}")

    # --- events (synchronous: an exception here would break panoramisk's reader) ------------------------
    def _on_dtmf(self, manager: Any, event: Any) -> None:
        try:
            if (event.get("Direction") != "Received" or event.get("Digit") != self._intake.digit
                    or event.get("Context") not in self._contexts or not self._accepting):
                return
            facts = facts_from_ami(event)
            if self._intake.seen(facts.uniqueid) or facts.uniqueid in self._looking_up:
                return  # a second press, "99", or a press already being handled: one opt-out per channel
            self._intake.arrived(facts, Origin.AMI)
            pressed_at = event_time(event)
            if facts.var("OPTOUT_NUMBER") is not None:
                self._press(facts, pressed_at)
                return
            task = asyncio.get_running_loop().create_task(self._press_after_lookup(facts, pressed_at),
                                                          name=f"ami-dialled-{facts.uniqueid}")
            self._looking_up[facts.uniqueid] = task
            task.add_done_callback(lambda _: self._looking_up.pop(facts.uniqueid, None))
            self._intake.arriving(task)
        except Exception:
            log.exception("could not handle a DTMFEnd event", extra={"uniqueid": event.get("Uniqueid")})

    def _press(self, facts: ChannelFacts, pressed_at: datetime, received_at: datetime | None = None) -> None:
        self._intake.press(facts, origin=Origin.AMI, pressed_at=pressed_at, received_at=received_at,
                           hang_up=lambda: self._hang_up(facts.name))

    async def _press_after_lookup(self, facts: ChannelFacts, pressed_at: datetime) -> None:
        received_at = datetime.now(UTC)
        request_uri, remote_uri = await asyncio.gather(self._getvar(facts.name, REQUEST_URI),
                                                       self._getvar(facts.name, REMOTE_URI))
        self._press(dataclasses.replace(facts, dialled=dialled_number(request_uri, remote_uri)), pressed_at,
                    received_at)

    async def _getvar(self, channel: str, name: str) -> str | None:
        """A channel variable or function over AMI; None when it cannot be read."""
        manager = self._manager
        if manager is None:
            return None
        try:
            reply = await within(
                manager.send_action({"Action": "Getvar", "Channel": channel, "Variable": name}), self._timeout)
        except (TimeoutError, OSError) as exc:
            log.debug("AMI Getvar %s failed: %s", name, exc)
            return None
        if not reply.success:
            return None
        value = reply.get("Value")
        return "" if value in (None, "(null)") else str(value)

    def _on_hangup(self, manager: Any, event: Any) -> None:
        try:
            uniqueid = event.get("Uniqueid")
            if uniqueid:
                self._intake.hangup_seen(str(uniqueid), event_time(event))
        except Exception:
            log.exception("could not handle a hangup event")

    async def _hang_up(self, channel: str) -> HangupInfo:
        """The Hangup action; never raises."""
        requested = datetime.now(UTC)
        manager = self._manager
        try:
            if manager is None:
                raise TelephonyError("AMI is not connected")
            reply = await within(
                manager.send_action({"Action": "Hangup", "Channel": channel, "Cause": "16"}), self._timeout
            )
        except (TelephonyError, TimeoutError, OSError) as exc:
            log.error("AMI Hangup failed: %s", exc or "timeout", extra={"channel": channel})
            return HangupInfo.failed("ami", exc, requested_at=requested)
        ok = bool(reply.success)
        result = "ok" if ok else ("gone" if "No such channel" in str(reply.get("Message")) else
                                  f"refused: {reply.get('Message')}"[:200])
        return HangupInfo(requested_at=requested, method="ami", result=result)
