"""The SQS poller: opt-outs from an SNS -> SQS subscription, in envelope or raw delivery.

Long polling, ten messages at a time, handled concurrently, each on its own: one message that cannot be
handled, with any exception, never stops the others or leaves the batch undeleted. A message is deleted
once its opt-out is durable (stored, journaled or a duplicate) or was skipped as an agent's own event.
While a batch is being worked on, its visibility is extended.

A message that fails is retried alone (it comes back after its visibility timeout) and set aside after
POISON_RECEIVES receives, logged once at ERROR and counted:
- where the queue has a redrive policy (a dead-letter queue), it is left to SQS, which moves it there after
  maxReceiveCount receives;
- without one, a message that is not a valid opt-out (any wrong value or JSON type: the 400 of the HTTP
  endpoint) is deleted; one whose handling failed in another way may be a valid opt-out, so it is parked
  in the queue instead: made invisible for what is left of PARK_SECONDS (SQS's maximum, 12 hours from
  its first receive), then retried alone.

Trust: SQS envelopes are not signature-checked. Only principals the queue's IAM policy admits (the
topic, through `aws:SourceArn`) can send to it, so that policy is the trust boundary; a SigningCertURL
could not be fetched from every deployment anyway (emulators point it at real AWS). When
BRIDGE_TOPIC_ARNS is set, envelopes from other topics, or with no TopicArn at all, are refused too, as a
second check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from agent import metrics
from agent.backoff import Backoff
from agent.constants import Origin
from agent.errors import AWS_ERRORS, JournalError
from sns_bridge.errors import EventRejected
from sns_bridge.handler import BridgeHandler, Handled, attribute_values

log = logging.getLogger("sns_bridge.sqs")

POISON_RECEIVES = 5
"""Receives after which a message that keeps failing is set aside (module docstring)."""
PARK_SECONDS = 12 * 3600
"""How long a message is parked in the queue: SQS's longest visibility timeout, counted from the message's
first receive (so what is left of it)."""
REDRIVE_CHECK_SECONDS = 300.0
"""How often the queue's redrive policy is read again (it can be set while the bridge runs)."""


class _Outcome(Enum):
    DELETE = "delete"
    """Handled (durable, a duplicate, or skipped), or not an opt-out and set aside without a dead-letter queue."""
    RETRY = "retry"
    """Left for SQS to deliver again (after its visibility timeout), or for the redrive policy."""
    PARK = "park"
    """Failed too often and may be an opt-out: made invisible for PARK_SECONDS."""


@dataclass(frozen=True)
class Notification:
    """What the handler needs from one SQS message."""

    message_id: str | None
    message: str
    attributes: dict[str, str]
    topic_arn: str | None
    envelope: bool = False
    """An SNS envelope (SNS -> SQS delivery), not raw delivery."""


def text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def receive_count(attributes: object) -> int:
    """SQS's ApproximateReceiveCount from a message's attributes (1 when it is missing or unreadable)."""
    try:
        return int(attributes.get("ApproximateReceiveCount", 1)) if isinstance(attributes, Mapping) else 1
    except (TypeError, ValueError):
        return 1


def unwrap(body: str, sqs_attributes: Mapping[str, Any] | None) -> Notification:
    """Read an SQS body as an SNS envelope (a Notification object) or, failing that, as raw delivery."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return Notification(message_id=text_or_none(data.get("MessageId")), message=data["Message"],
                            attributes=attribute_values(data.get("MessageAttributes")),
                            topic_arn=text_or_none(data.get("TopicArn")), envelope=True)
    # Raw delivery: the body is the event; SNS's attributes arrive as SQS message attributes and the
    # SNS MessageId is gone (the pipeline still dedupes by eventId).
    return Notification(message_id=None, message=body, attributes=attribute_values(sqs_attributes), topic_arn=None)


class SqsPoller:
    """Polls one queue until cancelled. `client` is an aiobotocore SQS client, the caller's to close."""

    def __init__(
        self, *, handler: BridgeHandler, client: Any, queue_url: str, allowed_topic_arns: frozenset[str] = frozenset(),
        wait_seconds: int = 20, visibility_timeout: int = 30, batch_size: int = 10,
    ) -> None:
        self._handler = handler
        self._client = client
        self._queue_url = queue_url
        self._allowed = allowed_topic_arns
        self._wait = wait_seconds
        self._visibility = visibility_timeout
        self._batch = min(10, max(1, batch_size))
        self._redrive: tuple[bool, float] | None = None
        """(the queue has a dead-letter queue, when that was read)."""

    async def run(self) -> None:
        """Receive and handle batches until cancelled, with backoff while SQS is unreachable."""
        backoff = Backoff("SQS receive", initial=0.5, maximum=30.0, logger=log)
        log.info("polling %s", self._queue_url)
        while True:
            try:
                await self.poll_once()
            except AWS_ERRORS as exc:
                await asyncio.sleep(backoff.delay(exc))
                continue
            backoff.reset()

    async def poll_once(self, *, wait_seconds: int | None = None) -> int:
        """Receive one batch and handle it; returns how many messages were deleted. Raises botocore errors."""
        response = await self._client.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=self._batch,
            WaitTimeSeconds=self._wait if wait_seconds is None else wait_seconds,
            VisibilityTimeout=self._visibility,
            MessageAttributeNames=["All"],
            AttributeNames=["ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp"],
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        if not messages:
            return 0
        pending = {m["ReceiptHandle"] for m in messages}
        heartbeat = asyncio.create_task(self._keep_invisible(messages, pending), name="sqs-visibility")
        try:
            outcomes = await asyncio.gather(*(self._handle(m, pending) for m in messages))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        done = [m for m, outcome in zip(messages, outcomes, strict=True) if outcome is _Outcome.DELETE]
        parked = [m for m, outcome in zip(messages, outcomes, strict=True) if outcome is _Outcome.PARK]
        if done:
            await self._delete(done)
        if parked:
            await self._park(parked)
        return len(done)

    async def _handle(self, sqs_message: Mapping[str, Any], pending: set[str]) -> _Outcome:
        """Handle one message: what to do with it. Never raises."""
        message_id = sqs_message.get("MessageId")
        receives = receive_count(sqs_message.get("Attributes"))
        try:
            note = unwrap(str(sqs_message.get("Body", "")), sqs_message.get("MessageAttributes"))
            if self._allowed and note.envelope and note.topic_arn not in self._allowed:
                metrics.REJECTED.labels(Origin.SNS.value).inc()
                raise EventRejected("TopicArn", f"{note.topic_arn!r} is not in BRIDGE_TOPIC_ARNS" if note.topic_arn
                                    else "missing from the SNS envelope, and BRIDGE_TOPIC_ARNS is set")
            handled: Handled = await self._handler.apply(
                message_id=note.message_id, message=note.message, attributes=note.attributes
            )
            log.debug("SQS message %s: %s", message_id, handled.disposition.value)
            return _Outcome.DELETE
        except JournalError as exc:
            log.error("SQS message %s not made durable; SQS redelivers it: %s", message_id, exc)
            return _Outcome.RETRY
        except EventRejected as exc:
            return await self._set_aside(message_id, receives, f"not a valid opt-out: {exc}", invalid=True)
        except Exception as exc:  # isolated to this message
            if receives == 1:
                log.exception("SQS message %s could not be handled; retried alone", message_id)
            return await self._set_aside(message_id, receives, f"{type(exc).__name__}: {exc}", invalid=False)
        finally:
            pending.discard(sqs_message["ReceiptHandle"])

    async def _set_aside(self, message_id: object, receives: int, why: str, *, invalid: bool) -> _Outcome:
        """A message that failed: retried until POISON_RECEIVES receives, then left to the dead-letter queue,
        deleted (not an opt-out) or parked (may be one)."""
        if receives < POISON_RECEIVES:
            log.warning("SQS message %s (receive %d) failed, retried alone: %s", message_id, receives, why)
            return _Outcome.RETRY
        metrics.ISOLATED.labels("sqs").inc()
        if await self.has_dead_letter_queue():
            if receives == POISON_RECEIVES:
                log.error("SQS message %s failed %d times, left for the dead-letter queue: %s", message_id,
                          receives, why)
            return _Outcome.RETRY
        if invalid:
            log.error("SQS message %s deleted after %d receives: %s", message_id, receives, why)
            return _Outcome.DELETE
        log.error("SQS message %s failed %d times and may be an opt-out: parked in the queue for %d s (no "
                  "dead-letter queue): %s", message_id, receives, PARK_SECONDS, why)
        return _Outcome.PARK

    async def has_dead_letter_queue(self) -> bool:
        """Whether the queue has a redrive policy (read again every REDRIVE_CHECK_SECONDS; False when it
        cannot be read)."""
        now = asyncio.get_running_loop().time()
        if self._redrive is None or now - self._redrive[1] > REDRIVE_CHECK_SECONDS:
            try:
                response = await self._client.get_queue_attributes(QueueUrl=self._queue_url,
                                                                   AttributeNames=["RedrivePolicy"])
                found = bool(response.get("Attributes", {}).get("RedrivePolicy"))
            except AWS_ERRORS as exc:
                log.warning("reading the redrive policy of %s failed: %s", self._queue_url, exc)
                found = False
            self._redrive = (found, now)
        return self._redrive[0]

    async def _set_visibility(self, timeouts: Sequence[tuple[Mapping[str, Any], int]], failed: str) -> None:
        """Make each message invisible for its seconds; a failure is only logged (`failed`: count, error)."""
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": seconds}
                   for i, (m, seconds) in enumerate(timeouts)]
        try:
            await self._client.change_message_visibility_batch(QueueUrl=self._queue_url, Entries=entries)
        except AWS_ERRORS as exc:
            log.warning(failed, len(entries), exc)

    async def _park(self, messages: Sequence[Mapping[str, Any]]) -> None:
        await self._set_visibility([(m, _park_for(m)) for m in messages],
                                   "parking %d SQS messages failed (they come back sooner): %s")

    async def _keep_invisible(self, messages: Sequence[Mapping[str, Any]], pending: set[str]) -> None:
        """Every half visibility timeout, extend the visibility of the messages still being worked on."""
        while True:
            await asyncio.sleep(self._visibility / 2)
            still = [(m, self._visibility) for m in messages if m["ReceiptHandle"] in pending]
            if not still:
                return
            await self._set_visibility(still, "extending visibility of %d SQS messages failed: %s")

    async def _delete(self, messages: Sequence[Mapping[str, Any]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        try:
            response = await self._client.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
        except AWS_ERRORS as exc:
            # Durable already: a redelivery is recognised by MessageId / eventId.
            log.warning("deleting %d handled SQS messages failed; they will come back as duplicates: %s",
                        len(entries), exc)
            return
        for failed in response.get("Failed", []):
            log.warning("deleting SQS message %s failed: %s", failed.get("Id"), failed.get("Message"))


def _park_for(message: Mapping[str, Any]) -> int:
    """Seconds a parked message stays invisible: SQS refuses a total past PARK_SECONDS from its first receive."""
    try:
        first = int(message.get("Attributes", {}).get("ApproximateFirstReceiveTimestamp")) / 1000
    except (TypeError, ValueError, AttributeError):
        first = time.time()
    return max(60, min(PARK_SECONDS - 60, int(PARK_SECONDS - (time.time() - first)) - 60))
