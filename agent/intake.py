"""The press sequence, written once for every way in (ARI, AMI, FastAGI, and any added later).

A way in keeps only its protocol: it connects, reads a channel's facts, reports a press of the opt-out digit
with a function that sends the hangup (`HangUp`: returns once answered, never raises), and reports the
hangups Asterisk confirms. The intake does the rest, in one order for all:

    first-press guard -> journal -> hang up -> [fsync | Redis | Asterisk's confirmation] -> store

- One opt-out per channel: a second press, "99", the same press seen over ARI and AMI, change nothing. A
  press is marked handled only once its task is running.
- The call always ends: when the pipeline fails, or the opt-out is a duplicate, the hangup is sent anyway.
- The storing work of every call waits (briefly) while other calls' hangups are going out, so a burst of
  presses is hung up before the machine spends time on storing.
- In-flight presses are drained on SIGTERM; what does not finish stays in the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent import metrics
from agent.constants import Origin
from agent.errors import JournalError
from agent.lifecycle import within
from agent.optout import HangupInfo, OptOutRecord, SpeechEvidence, call_event_id
from agent.phone import mask
from agent.pipeline import HangUp, OptOutPipeline
from agent.telephony import ChannelFacts, call_record

log = logging.getLogger("agent.intake")


@dataclass(frozen=True)
class Pressed:
    """A press being handled: `task` ends when it is stored (or journaled); `hung_up` once the hangup went out."""

    task: asyncio.Task[None]
    hung_up: asyncio.Future[None]


class _RateLimited:
    """At most one log line per `every` seconds, saying how many were held back."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._last = -every
        self._held = 0

    def ready(self) -> int | None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held


class Intake:
    """One per agent process, shared by every way in (so one press seen twice is one opt-out)."""

    def __init__(
        self, *, pipeline: OptOutPipeline, digit: str, region: str, remember_seconds: float = 3600.0,
        confirm_within: float = 1.0, hangups_first_within: float = 0.1,
    ) -> None:
        self._pipeline = pipeline
        self.digit = digit
        self.region = region
        self._remember = remember_seconds
        self._confirm_within = confirm_within
        self._hangups_first_within = hangups_first_within
        self._handled: OrderedDict[str, float] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._arriving: set[asyncio.Task[Any]] = set()
        self._confirmations: dict[str, asyncio.Future[datetime]] = {}
        self._hangups_in_flight = 0
        self._no_hangup_in_flight = asyncio.Event()
        self._no_hangup_in_flight.set()
        self._missing_number_log = _RateLimited(60.0)

    # --- what a way in reports ---------------------------------------------------------------------------
    def arrived(self, facts: ChannelFacts, origin: Origin) -> None:
        """A call reached the agent; a dialer that forgets OPTOUT_NUMBER is noticed here."""
        if facts.var("OPTOUT_NUMBER") is None:
            metrics.MISSING_OPTOUT_NUMBER.labels(origin.value).inc()
            held = self._missing_number_log.ready()
            if held is not None:
                log.warning("a call arrived without the OPTOUT_NUMBER channel variable (%d more held back in the "
                            "last minute): the dialer must set it on every call", held,
                            extra={"origin": origin.value, "channel": facts.name, "context": facts.context})

    def seen(self, uniqueid: str) -> bool:
        """Whether a press on this channel was taken already."""
        now = time.monotonic()
        while self._handled and next(iter(self._handled.values())) < now - self._remember:
            self._handled.popitem(last=False)
        return uniqueid in self._handled

    def arriving(self, task: asyncio.Task[Any]) -> None:
        """A press still being read from its channel (the way in looks up what it needs before `press`):
        `drain` waits for it too, so a shutdown never cuts a press off before it is journaled."""
        self._arriving.add(task)
        task.add_done_callback(self._arriving.discard)

    def spoken(self, facts: ChannelFacts, *, evidence: SpeechEvidence, spoken_at: datetime,
               hang_up: HangUp) -> Pressed | None:
        """An utterance agent/speech took as an opt-out (mode `act`): the same sequence as a press, with
        origin `speech`, no digit, and the utterance on the audit row. `spoken_at`: when the speech ended.
        None when the call's opt-out was taken already (a press, or an earlier utterance)."""
        return self.press(facts, origin=Origin.SPEECH, pressed_at=spoken_at, hang_up=hang_up, speech=evidence)

    def press(self, facts: ChannelFacts, *, origin: Origin, pressed_at: datetime | None,
              hang_up: HangUp, received_at: datetime | None = None,
              speech: SpeechEvidence | None = None) -> Pressed | None:
        """Take a press of the opt-out digit. Synchronous (never waits: safe inside an event reader).
        `received_at`: when the press reached the agent, if that was before its lookups (default: now).

        Returns None for a repeat press on the same channel.
        """
        if self.seen(facts.uniqueid):
            return None
        received_at = received_at or datetime.now(UTC)
        try:
            record = call_record(facts, origin=origin, digit=self.digit, pressed_at=pressed_at, region=self.region,
                                 received_at=received_at)
            if speech is not None:
                record = record.model_copy(update={"speech": speech, "digit": None,
                                                   "reason": "callee asked not to be called (spoken)"})
        except Exception:
            log.exception("could not build the opt-out record; auditing the press as number-unknown")
            record = OptOutRecord(event_id=call_event_id(facts.uniqueid, None), phone_number=None, origin=origin,
                                  digit=None if speech else self.digit, pressed_at=pressed_at,
                                  received_at=received_at, speech=speech,
                                  channel={"uniqueid": facts.uniqueid, "name": facts.name})
        if record.phone_number is None:
            metrics.NUMBER_UNKNOWN.labels(origin.value).inc()
            log.warning("opt-out digit pressed on a call whose number is not proven (no valid OPTOUT_NUMBER, not an "
                        "outbound PJSIP channel): hanging up and auditing it as number_unknown",
                        extra={"origin": origin.value, "channel": facts.name, "uniqueid": facts.uniqueid,
                               "raw_number": mask(record.raw_number) if record.raw_number else None})
        loop = asyncio.get_running_loop()
        self._confirmations[facts.uniqueid] = loop.create_future()
        hung_up: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._handle(record, hang_up, facts.uniqueid, hung_up),
                                name=f"{origin.value}-optout-{facts.uniqueid}")
        self._handled[facts.uniqueid] = time.monotonic()  # only once the task exists
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Pressed(task, hung_up)

    def hangup_seen(self, uniqueid: str, at: datetime) -> None:
        """Asterisk reported the channel's hangup (its own timestamp)."""
        fut = self._confirmations.get(uniqueid)
        if fut is not None and not fut.done():
            fut.set_result(at)

    async def drain(self, within: float) -> None:
        """Wait for in-flight presses, and those still arriving (what does not finish stays journaled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (pending := self._tasks | self._arriving) and (left := deadline - loop.time()) > 0:
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    # --- the sequence ----------------------------------------------------------------------------------
    async def _handle(self, record: OptOutRecord, hang_up: HangUp, uniqueid: str,
                      hung_up: asyncio.Future[None]) -> None:
        sent = False
        origin = record.origin.value

        async def send() -> HangupInfo:
            nonlocal sent
            sent = True
            self._hangups_in_flight += 1
            self._no_hangup_in_flight.clear()
            try:
                info = await hang_up()
            finally:
                self._hangups_in_flight -= 1
                if self._hangups_in_flight == 0:
                    self._no_hangup_in_flight.set()
                if not hung_up.done():
                    hung_up.set_result(None)
            since = record.pressed_at or record.received_at
            metrics.PRESS_TO_HANGUP.labels(origin).observe(max(0.0, (datetime.now(UTC) - since).total_seconds()))
            return info

        async def confirm(info: HangupInfo) -> HangupInfo:
            hungup_at = info.hungup_at
            seen = self._confirmations.get(uniqueid)
            if hungup_at is None and info.ok and seen is not None:
                with contextlib.suppress(TimeoutError):
                    hungup_at = await within(asyncio.shield(seen), self._confirm_within)
            with contextlib.suppress(TimeoutError):  # other calls' hangups go out before this one is stored
                await within(self._no_hangup_in_flight.wait(), self._hangups_first_within)
            return info.model_copy(update={"hungup_at": hungup_at})

        try:
            await self._pipeline.submit(record, hang_up=send, confirm=confirm)
        except JournalError as exc:
            log.critical("opt-out could be neither journaled nor stored: %s", exc, extra={"event_id": record.event_id})
        except Exception:
            log.exception("opt-out pipeline failed; the call is ended anyway", extra={"event_id": record.event_id})
        finally:
            try:
                if not sent:  # a duplicate, or the pipeline never got to it: the caller pressed the digit
                    with contextlib.suppress(TimeoutError):
                        await within(send(), 2.0)
            finally:
                self._confirmations.pop(uniqueid, None)
                if not hung_up.done():
                    hung_up.set_result(None)
