"""The AMI agent: watches DTMFEnd on plain-dialplan IVRs and hangs the channel up on the opt-out digit.

For IVRs that neither hand the channel to Stasis nor call AGI (`optout-plain-ivr`): the agent logs in with
read=call,dtmf and write=call only (never originate: CVE-2024-42365) and, for a `DTMFEnd` with
`Direction: Received` of the opt-out digit on a channel whose `Context` is one of AMI_DTMF_CONTEXTS, sends the
`Hangup` action at once and records the opt-out (origin ami) from the event's own headers (`ChanVariable`
carries CALL_ID etc.: manager.conf `channelvars`). Filtering by context matters: on a Local or SIP test call
the other half of the call reports the same digit as received too.

panoramisk (the design's library) reads the socket; its known limits are contained here:
- it reconnects on a fixed 2 s timer and its pinger never reads the reply: both are switched off in
  `_Manager`; `AmiAgent.run` reconnects with the shared backoff and pings with a reply deadline, so a
  connection that went silent is noticed and `connected` (for /ready) tells the truth.
- it runs coroutine callbacks as fire-and-forget tasks and lets a callback's exception break the socket
  reader: the callbacks here are synchronous, catch everything, and start tasks the agent owns.
AMI events carry Asterisk's own `Timestamp` only with manager.conf `timestampevents = yes`; without it the
agent's receive time stands in for the press and hangup times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from panoramisk import Manager

from agent import metrics
from agent.backoff import Backoff
from agent.constants import Origin
from agent.errors import JournalError, TelephonyError
from agent.lifecycle import Resource
from agent.optout import HangupInfo, OptOutRecord
from agent.pipeline import OptOutPipeline, Terminator
from agent.telephony import CHANNEL_VARS, ChannelFacts, call_record

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
        variables=variables, connected_number=_known(event.get("ConnectedLineNum")),
        caller_number=_known(event.get("CallerIDNum")), exten=_known(event.get("Exten")),
        context=event.get("Context") or None,
    )


def _known(value: Any) -> str | None:
    return None if not value or value in ("<unknown>", "unknown") else str(value)


class AmiAgent(Resource):
    """One AMI connection; `run()` until cancelled. Off unless AMI_HOST/AMI_USERNAME/AMI_SECRET are set."""

    def __init__(
        self, *, host: str, port: int, username: str, secret: str, contexts: frozenset[str], digit: str,
        region: str, pipeline: OptOutPipeline, ping_interval: float = 5.0, action_timeout: float = 2.0,
        remember_seconds: float = 3600.0,
    ) -> None:
        if not contexts:
            raise TelephonyError("the AMI agent needs at least one context to watch (AMI_DTMF_CONTEXTS)")
        self._host = host
        self._port = port
        self._username = username
        self._secret = secret
        self._contexts = contexts
        self._digit = digit
        self._region = region
        self._pipeline = pipeline
        self._ping_interval = ping_interval
        self._timeout = action_timeout
        self._remember = remember_seconds
        self._manager: _Manager | None = None
        self._opted_out: OrderedDict[str, float] = OrderedDict()
        self._hangup_seen: dict[str, asyncio.Future[datetime]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = True
        self.connected = False

    # --- lifecycle ---------------------------------------------------------------------------------
    async def close(self) -> None:
        """Log off and close the socket. Safe to call twice."""
        self._accepting = False
        self._close_manager()

    async def stop_accepting(self) -> None:
        """SIGTERM: no new presses are taken; in-flight hangups and opt-outs go on."""
        self._accepting = False
        self._close_manager()

    async def drain(self, within: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=within)

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
            while self._accepting:
                try:
                    await self._session_once(backoff)
                except (OSError, TelephonyError, TimeoutError) as exc:
                    self._close_manager()
                    if self._accepting:
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
        await asyncio.wait_for(manager.connect(), self._timeout)
        deadline = time.monotonic() + self._timeout
        while not manager.authenticated:
            if manager.lost.is_set() or time.monotonic() > deadline:
                raise TelephonyError(f"AMI at {self._host}:{self._port} refused the login of {self._username!r}")
            await asyncio.sleep(0.01)
        await self._ping(manager)
        self._set_connected(True)
        backoff.reset()
        log.info("AMI connected", extra={"host": self._host, "port": self._port})
        while self._accepting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(manager.lost.wait(), self._ping_interval)
            if manager.lost.is_set():
                raise TelephonyError("AMI connection lost")
            await self._ping(manager)

    async def _ping(self, manager: _Manager) -> None:
        try:
            reply = await asyncio.wait_for(manager.send_action({"Action": "Ping"}), self._timeout)
        except TimeoutError as exc:
            raise TelephonyError(f"AMI did not answer Ping within {self._timeout}s") from exc
        if not reply.success:
            raise TelephonyError(f"AMI answered Ping with {reply.get('Response')}: {reply.get('Message')}")

    # --- events (synchronous: an exception here would break panoramisk's reader) ------------------------
    def _on_dtmf(self, manager: Any, event: Any) -> None:
        try:
            if (event.get("Direction") != "Received" or event.get("Digit") != self._digit
                    or event.get("Context") not in self._contexts or not self._accepting):
                return
            facts = facts_from_ami(event)
            if not self._first_press(facts.uniqueid):
                return  # a second press, "99", or a press already being handled: one opt-out per channel
            pressed_at = event_time(event)
            self._hangup_seen[facts.uniqueid] = asyncio.get_running_loop().create_future()
            hangup: asyncio.Task[HangupInfo] = self._spawn(self._hangup(facts, pressed_at),
                                                           name=f"ami-hangup-{facts.uniqueid}")
            record = call_record(facts, origin=Origin.AMI, digit=self._digit, pressed_at=pressed_at,
                                 region=self._region)

            async def terminate() -> HangupInfo:
                return await hangup

            self._spawn(self._record(record, terminate), name=f"ami-optout-{facts.uniqueid}")
        except Exception:
            log.exception("could not handle a DTMFEnd event", extra={"uniqueid": event.get("Uniqueid")})

    def _on_hangup(self, manager: Any, event: Any) -> None:
        try:
            seen = self._hangup_seen.get(str(event.get("Uniqueid")))
            if seen is not None and not seen.done():
                seen.set_result(event_time(event))
        except Exception:
            log.exception("could not handle a hangup event")

    def _first_press(self, uniqueid: str) -> bool:
        now = time.monotonic()
        while self._opted_out and next(iter(self._opted_out.values())) < now - self._remember:
            self._opted_out.popitem(last=False)
        if uniqueid in self._opted_out:
            return False
        self._opted_out[uniqueid] = now
        return True

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _hangup(self, facts: ChannelFacts, pressed_at: datetime) -> HangupInfo:
        requested = datetime.now(UTC)
        manager = self._manager
        try:
            if manager is None:
                raise TelephonyError("AMI is not connected")
            reply = await asyncio.wait_for(
                manager.send_action({"Action": "Hangup", "Channel": facts.name, "Cause": "16"}), self._timeout
            )
        except (TelephonyError, TimeoutError, OSError) as exc:
            log.error("AMI Hangup failed: %s", exc or "timeout", extra={"channel": facts.name})
            self._hangup_seen.pop(facts.uniqueid, None)
            return HangupInfo(requested_at=requested, method="ami", result=f"error: {exc or 'timeout'}"[:200])
        metrics.PRESS_TO_HANGUP.labels("ami").observe(max(0.0, (datetime.now(UTC) - pressed_at).total_seconds()))
        ok = bool(reply.success)
        result = "ok" if ok else ("gone" if "No such channel" in str(reply.get("Message")) else
                                  f"refused: {reply.get('Message')}"[:200])
        hungup_at = None
        seen = self._hangup_seen.get(facts.uniqueid)
        if ok and seen is not None:
            with contextlib.suppress(TimeoutError):
                hungup_at = await asyncio.wait_for(asyncio.shield(seen), 1.0)
        self._hangup_seen.pop(facts.uniqueid, None)
        return HangupInfo(requested_at=requested, hungup_at=hungup_at, method="ami", result=result)

    async def _record(self, record: OptOutRecord, terminate: Terminator) -> None:
        try:
            await self._pipeline.submit(record, terminate=terminate)
        except JournalError as exc:
            log.critical("opt-out could not be journaled: %s", exc, extra={"event_id": record.event_id})
        except Exception:
            log.exception("opt-out pipeline failed", extra={"event_id": record.event_id})
