"""The one handler the three ways in call (HTTP endpoint, SQS poller, Lambda): an SNS opt-out into the pipeline.

    MessageId seen?          -> duplicate    (Redis SET with a TTL, and an in-memory LRU)
    Message -> OptOutEvent   -> published by an agent? skipped (loop prevention, see below)
                             -> invalid number: EventRejected; invalid optional field: dropped and reported
    pipeline.submit(record, hang_up=the worker's endpoint)   not durable -> JournalError

Loop prevention. Agents publish their own opt-outs to the same topic; the body carries the record's
`eventId` and its `origin` (`ari`, `agi`, `ami`, `admin`). The bridge skips a body that has both: such an
event was journaled and stored by the agent that published it (publishing runs from its journal), so the
bridge has nothing to add. The decision is taken from the body, which SNS signs, never from the message
attributes, which it does not: an `origin=optout-agent` attribute alone skips nothing. (The subscription's
filter policy on that attribute still keeps most agent events away before they reach the bridge.)
A redelivered message is not applied twice, and its call is not hung up again: the pipeline ends a call
only for an opt-out it sees for the first time.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis

from agent import metrics
from agent.cache import redis_errors
from agent.constants import SNS_MESSAGE_TTL_SECONDS, Origin, sns_message_key
from agent.errors import CacheUnavailable, InvalidInput
from agent.optout import ID_MAX, HangupInfo, clean_text, parse_event, record_from_event
from agent.pipeline import HangUp, OptOutPipeline, Status
from sns_bridge.errors import EventRejected
from sns_bridge.hangup import WorkerHangup

log = logging.getLogger("sns_bridge.handler")

AGENT_ORIGINS = frozenset({Origin.ARI, Origin.AGI, Origin.AMI, Origin.ADMIN})


class Disposition(StrEnum):
    APPLIED = "applied"
    """Stored, or journaled for the replayer (durable either way)."""
    DUPLICATE = "duplicate"
    """The MessageId or the eventId was seen before; nothing changed."""
    SKIPPED = "skipped"
    """Published by an agent: stored at its source already (loop prevention)."""


@dataclass(frozen=True)
class Handled:
    disposition: Disposition
    event_id: str | None = None
    status: Status | None = None
    dropped: list[str] = field(default_factory=list)
    """Optional fields left out because they were invalid ("field X: problem")."""


def attribute_values(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """Flatten message attributes from any way in to `{name: value}`.

    SNS (HTTP, SQS envelope, Lambda) sends `{"Type": "String", "Value": v}`, SQS raw delivery
    `{"DataType": "String", "StringValue": v}`. Binary and malformed attributes are left out.
    """
    values: dict[str, str] = {}
    if not isinstance(attributes, Mapping):
        return values
    for name, attr in attributes.items():
        if isinstance(attr, str):
            values[name] = attr
        elif isinstance(attr, Mapping):
            value = attr.get("Value", attr.get("StringValue"))
            if isinstance(value, str):
                values[name] = value
    return values


class MessageIdDedupe:
    """Remembers applied SNS MessageIds: in Redis (shared by every bridge) when given, always in a local LRU.

    Redis failures are logged and the LRU answers: a miss only costs one more pass through the pipeline,
    which recognises the event id anyway.
    """

    def __init__(self, *, redis: aioredis.Redis | None, ttl_seconds: int = SNS_MESSAGE_TTL_SECONDS,
                 memory_size: int = 10_000) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._size = memory_size
        self._memory: OrderedDict[str, None] = OrderedDict()

    async def seen(self, message_id: str) -> bool:
        if message_id in self._memory:
            self._memory.move_to_end(message_id)
            return True
        if self._redis is None:
            return False
        try:
            with redis_errors("reading an SNS message id"):
                return bool(await self._redis.exists(sns_message_key(message_id)))
        except CacheUnavailable as exc:
            log.warning("Redis MessageId lookup failed (the pipeline still dedupes by eventId): %s", exc)
            return False

    async def remember(self, message_id: str) -> None:
        self._memory[message_id] = None
        self._memory.move_to_end(message_id)
        while len(self._memory) > self._size:
            self._memory.popitem(last=False)
        if self._redis is None:
            return
        try:
            with redis_errors("remembering an SNS message id"):
                await self._redis.set(sns_message_key(message_id), "1", ex=self._ttl)
        except CacheUnavailable as exc:
            log.warning("Redis MessageId write failed (kept in memory only): %s", exc)


def published_by_agent(body: Mapping[str, Any]) -> bool:
    """True for an event an opt-out agent published (see the module docstring): decided from the body. Any
    JSON value may stand in either field (a list, an object): only two strings can skip."""
    origin = body.get("origin")
    return isinstance(body.get("eventId"), str) and isinstance(origin, str) and origin in AGENT_ORIGINS


class BridgeHandler:
    """Applies SNS-originated opt-outs through the pipeline. Safe to call concurrently."""

    def __init__(
        self, *, pipeline: OptOutPipeline, region: str, dedupe: MessageIdDedupe, worker: WorkerHangup | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._region = region
        self._dedupe = dedupe
        self._worker = worker

    async def apply(self, *, message_id: str | None, message: str, attributes: Mapping[str, str]) -> Handled:
        """Apply one notification's Message (the event JSON). `attributes` are informational only.

        Raises EventRejected when it is not a valid opt-out (permanent) and the agent's JournalError
        when it could not be made durable (retry later).
        """
        if message_id and await self._dedupe.seen(message_id):
            metrics.DUPLICATES.labels(Origin.SNS.value).inc()
            return Handled(Disposition.DUPLICATE)
        body = self._load(message)
        if published_by_agent(body):
            log.info("skipping opt-out %.128r: published by an agent (origin %s)", body["eventId"], body["origin"])
            return Handled(Disposition.SKIPPED, event_id=clean_text(body["eventId"], ID_MAX))
        try:
            parsed = parse_event(body)
            record = record_from_event(parsed.event, origin=Origin.SNS, region=self._region)
        except InvalidInput as exc:
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected(exc.field, exc.problem) from None
        dropped = [str(problem) for problem in parsed.dropped]
        if dropped:
            metrics.FIELDS_DROPPED.labels(Origin.SNS.value).inc(len(dropped))
            log.warning("SNS message %s: invalid fields left out, the opt-out still applies: %s", message_id,
                        "; ".join(dropped), extra={"event_id": record.event_id})
        result = await self._pipeline.submit(record, hang_up=self._hang_up_for(parsed.event.call_id))
        if message_id and result.status is Status.STORED:
            # Only what the store holds: a JOURNALED copy may sit in a journal that never comes back (a Lambda's
            # /tmp), and a pipeline DUPLICATE may be one of those; their redeliveries go through the pipeline.
            await self._dedupe.remember(message_id)
        kind = Disposition.DUPLICATE if result.status is Status.DUPLICATE else Disposition.APPLIED
        return Handled(kind, event_id=record.event_id, status=result.status, dropped=dropped)

    def _hang_up_for(self, call_id: str | None) -> HangUp | None:
        worker = self._worker
        if worker is None or not call_id:
            return None

        async def hang_up() -> HangupInfo:
            return await worker.hang_up(call_id)

        return hang_up

    @staticmethod
    def _load(message: str) -> dict[str, Any]:
        try:
            body = json.loads(message)
        except json.JSONDecodeError as exc:
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected("Message", f"not JSON ({exc.msg} at position {exc.pos})") from None
        except (ValueError, RecursionError) as exc:
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected("Message", f"JSON that cannot be read ({type(exc).__name__})") from None
        if not isinstance(body, dict):
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected("Message", f"expected a JSON object, got {type(body).__name__}")
        return body
