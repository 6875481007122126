"""The one handler the three ways in call (HTTP endpoint, SQS poller, Lambda): an SNS opt-out into the pipeline.

    published by an agent? -> skipped      (loop prevention, see below)
    MessageId seen?        -> duplicate    (Redis SET with a TTL, else an in-memory LRU)
    Message -> OptOutEvent -> OptOutRecord (origin sns)      invalid -> EventRejected
    pipeline.submit(record, terminate=the worker's endpoint)  not durable -> JournalError

Loop prevention. Agents publish their own opt-outs to the same topic with the message attribute
`origin=optout-agent`, and the body `origin` is the record's origin (`ari`, `agi`, `ami`, `admin`).
The bridge skips a message when the attribute says `optout-agent`, or, when attributes were lost
(raw delivery without attributes, a re-publish by hand), when the body carries an `eventId` together
with one of those agent origins: such an event was journaled by the agent that published it (publishing
runs from the journal), so the bridge has nothing to add. Events from other producers carry no origin
(or `sns`) and are applied. The subscription's filter policy `{"origin":[{"anything-but":"optout-agent"}]}`
keeps most of them away before they reach the bridge at all.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent import metrics
from agent.constants import SNS_ORIGIN_ATTRIBUTE, Origin
from agent.errors import InvalidInput
from agent.optout import HangupInfo, parse_event, record_from_event
from agent.pipeline import OptOutPipeline, Status, Terminator
from sns_bridge.errors import EventRejected
from sns_bridge.terminate import WorkerTerminator

log = logging.getLogger("sns_bridge.handler")

AGENT_ORIGINS = frozenset({Origin.ARI, Origin.AGI, Origin.AMI, Origin.ADMIN})
MESSAGE_ID_TTL_SECONDS = 24 * 3600


def sns_message_key(message_id: str) -> str:
    """`sns_message:{MessageId}`: an SNS message the bridge has applied (kept MESSAGE_ID_TTL_SECONDS)."""
    return f"sns_message:{message_id}"


class Disposition(StrEnum):
    APPLIED = "applied"
    """Recorded, or journaled for the replayer (durable either way)."""
    DUPLICATE = "duplicate"
    """The MessageId or the eventId was seen before; nothing changed."""
    SKIPPED = "skipped"
    """Published by an agent: recorded at its source already (loop prevention)."""


@dataclass(frozen=True)
class Handled:
    disposition: Disposition
    event_id: str | None = None
    status: Status | None = None


def attribute_values(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """Flatten message attributes from any way in to `{name: value}`.

    SNS (HTTP, SQS envelope, Lambda) sends `{"Type": "String", "Value": v}`, SQS raw delivery
    `{"DataType": "String", "StringValue": v}`. Binary and malformed attributes are left out.
    """
    values: dict[str, str] = {}
    for name, attr in (attributes or {}).items():
        if isinstance(attr, str):
            values[name] = attr
        elif isinstance(attr, Mapping):
            value = attr.get("Value", attr.get("StringValue"))
            if isinstance(value, str):
                values[name] = value
    return values


class MessageIdDedupe:
    """Remembers applied SNS MessageIds: in Redis (shared by every bridge) when given, always in a local LRU.

    Redis failures are logged and the LRU answers: a miss only costs one more pass through the
    pipeline, which recognises the event id anyway.
    """

    def __init__(
        self, *, redis: aioredis.Redis | None, ttl_seconds: int = MESSAGE_ID_TTL_SECONDS, memory_size: int = 10_000
    ) -> None:
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
            return bool(await self._redis.exists(sns_message_key(message_id)))
        except (RedisError, OSError) as exc:
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
            await self._redis.set(sns_message_key(message_id), "1", ex=self._ttl)
        except (RedisError, OSError) as exc:
            log.warning("Redis MessageId write failed (kept in memory only): %s", exc)


def published_by_agent(attributes: Mapping[str, str], body: Mapping[str, Any]) -> bool:
    """True for an event an opt-out agent published (see the module docstring)."""
    if attributes.get("origin") == SNS_ORIGIN_ATTRIBUTE:
        return True
    return isinstance(body.get("eventId"), str) and body.get("origin") in AGENT_ORIGINS


class BridgeHandler:
    """Applies SNS-originated opt-outs through the pipeline. Safe to call concurrently."""

    def __init__(
        self, *, pipeline: OptOutPipeline, region: str, dedupe: MessageIdDedupe,
        terminator: WorkerTerminator | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._region = region
        self._dedupe = dedupe
        self._terminator = terminator

    async def apply(self, *, message_id: str | None, message: str, attributes: Mapping[str, str]) -> Handled:
        """Apply one notification's Message (the event JSON).

        Raises EventRejected when it is not a valid opt-out (permanent) and the agent's JournalError
        when it could not be made durable (retry later).
        """
        if attributes.get("origin") == SNS_ORIGIN_ATTRIBUTE:
            return Handled(Disposition.SKIPPED)
        if message_id and await self._dedupe.seen(message_id):
            metrics.DUPLICATES.labels(Origin.SNS.value).inc()
            return Handled(Disposition.DUPLICATE)
        body = self._load(message)
        if published_by_agent(attributes, body):
            log.info("skipping opt-out %s: published by an agent (origin %s)", body.get("eventId"), body.get("origin"))
            return Handled(Disposition.SKIPPED, event_id=str(body.get("eventId")))
        try:
            event = parse_event(body)
            record = record_from_event(event, origin=Origin.SNS, region=self._region)
        except InvalidInput as exc:
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected(exc.field, exc.problem) from None
        result = await self._pipeline.submit(record, terminate=self._terminate_for(event.call_id))
        if message_id:
            await self._dedupe.remember(message_id)
        kind = Disposition.DUPLICATE if result.status is Status.DUPLICATE else Disposition.APPLIED
        return Handled(kind, event_id=record.event_id, status=result.status)

    def _terminate_for(self, call_id: str | None) -> Terminator | None:
        terminator = self._terminator
        if terminator is None or not call_id:
            return None

        async def terminate() -> HangupInfo:
            return await terminator.terminate(call_id)

        return terminate

    @staticmethod
    def _load(message: str) -> dict[str, Any]:
        try:
            body = json.loads(message)
        except json.JSONDecodeError as exc:
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected("Message", f"not JSON ({exc.msg} at position {exc.pos})") from None
        if not isinstance(body, dict):
            metrics.REJECTED.labels(Origin.SNS.value).inc()
            raise EventRejected("Message", f"expected a JSON object, got {type(body).__name__}")
        return body
