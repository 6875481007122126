"""The dial guard: the pre-dial check with a record of every call it stops.

Both guarded ways to place a call use it: the FastAGI `precheck` route (a dialplan `Gosub` before `Dial()`)
and the agent's `POST /calls` (which originates only once the number is cleared). A stopped call is
counted (`optout_prevented_calls_total`) and written to the audit trail as its own action (outcome
`prevented`), so the operator can show that no call followed an opt-out.

The guard dials what it checked: `POST /calls` builds the endpoint from the checked number and the
operator's template (OPTOUT_DIAL_ENDPOINT, e.g. `PJSIP/{number}@trunk`), never from an endpoint the caller
sends. Checking a caller's endpoint for "the same number" cannot be done: a Local channel, a dialplan lookup
or a SIP URI's parameters can lead anywhere, and trunk names and hosts hold digits of their own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from agent import metrics
from agent.constants import Origin, Outcome
from agent.errors import InvalidPhoneNumber, OptOutError
from agent.lifecycle import within
from agent.lookup import BlacklistChecker
from agent.optout import clean_id
from agent.phone import mask
from agent.store import Store, admin_row

log = logging.getLogger("agent.dial_guard")


PLACEHOLDERS = {"{number}": "the number in E.164 (+15551234567)", "{digits}": "its digits (15551234567)"}
_TEMPLATE = re.compile(r"[A-Za-z0-9_-]{1,32}/[^\s,\"'\\(){}\[\]^|]*(?:\{number\}|\{digits\})[^\s,\"'\\(){}\[\]^|]*")


def dial_template_problem(template: str) -> str | None:
    """Why `template` cannot be OPTOUT_DIAL_ENDPOINT (None when it can): it must be `TECH/RESOURCE` holding
    exactly one placeholder ({number} or {digits}) and nothing else in braces, quotes, brackets or spaces."""
    if sum(template.count(p) for p in PLACEHOLDERS) != 1:
        return "must hold exactly one of {number} and {digits}"
    if not _TEMPLATE.fullmatch(template):
        return "must look like TECH/RESOURCE (e.g. PJSIP/{number}@trunk), without spaces, quotes or brackets"
    return None


def dial_endpoint(template: str, number: str) -> str:
    """The endpoint that dials `number` (E.164, as the guard checked it) through `template`."""
    return template.replace("{number}", number).replace("{digits}", number.removeprefix("+"))


class Verdict(Enum):
    CLEAR = "clear"
    BLACKLISTED = "blacklisted"
    INVALID = "invalid"
    UNKNOWN = "unknown"
    """Nobody could answer: fail closed."""


@dataclass(frozen=True)
class GuardAnswer:
    verdict: Verdict
    number: str | None = None
    """E.164, when the number could be read."""
    problem: str | None = None


class DialGuard:
    """`check()` a number before dialling it; a blacklisted one is audited as a prevented call."""

    def __init__(self, *, checker: BlacklistChecker, store: Store, timeout: float = 2.0) -> None:
        self._checker = checker
        self._store = store
        self._timeout = timeout
        self._writes: set[asyncio.Task[None]] = set()

    async def check(self, raw: str | None, *, via: Origin, field: str = "number", call_id: str | None = None,
                    campaign_id: str | None = None, contact_id: str | None = None) -> GuardAnswer:
        """Never raises: a bad number is INVALID (with the problem), a failed lookup UNKNOWN."""
        if not raw or not raw.strip():
            return GuardAnswer(Verdict.INVALID, problem=f"field {field}: is missing")
        try:
            [number] = self._checker.normalise([raw])
        except InvalidPhoneNumber as exc:
            return GuardAnswer(Verdict.INVALID, problem=f"field {field}: {exc.problem}")
        try:
            [answer] = await within(self._checker.check([number]), self._timeout)
        except (OptOutError, TimeoutError) as exc:
            log.error("pre-dial check of %s could not be answered: %s", mask(number), str(exc) or type(exc).__name__)
            answer = None
        if answer is None:
            return GuardAnswer(Verdict.UNKNOWN, number, "the blacklist cannot be read now")
        if not answer:
            return GuardAnswer(Verdict.CLEAR, number)
        metrics.PREVENTED.labels(via.value).inc()
        log.info("call to %s prevented: the number is blacklisted", mask(number), extra={"via": via.value})
        self._audit(number, via=via, ids=(call_id, campaign_id, contact_id))
        return GuardAnswer(Verdict.BLACKLISTED, number)

    def _audit(self, number: str, *, via: Origin, ids: tuple[str | None, ...]) -> None:
        now = datetime.now(UTC)
        call_id, campaign_id, contact_id = (clean_id(i) for i in ids)
        row = admin_row(event_id=f"prevented-{uuid.uuid4()}", phone_number=number, outcome=Outcome.PREVENTED,
                        at=now, recorded_at=now, actor=None, reason="call to a blacklisted number prevented",
                        origin=via.value, call_id=call_id, campaign_id=campaign_id, contact_id=contact_id)
        task = asyncio.get_running_loop().create_task(self._write(row), name="prevented-call-record")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, row: dict[str, Any]) -> None:
        try:
            await self._store.append_action(row)
        except OptOutError as exc:
            log.error("could not record a prevented call in the audit trail: %s", exc)

    async def drain(self, within: float) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=within)
