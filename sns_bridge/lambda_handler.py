"""The Lambda way in: `sns_bridge.lambda_handler.handler(event, context)`.

Takes the event Lambda builds for an SNS trigger, `{"Records": [{"Sns": {"Message": "<event json>",
"MessageId": ..., "TopicArn": ..., "MessageAttributes": {...}}}]}`, or for an SQS trigger (`{"Records":
[{"messageId": ..., "body": "<SNS envelope or raw event>", "attributes": {"ApproximateReceiveCount": ...}}]}`),
and applies every record through the pipeline (origin sns), opening the core from Settings for each
invocation (`asyncio.run`).

Trust: Lambda invokes the function only for the topics (queues) its resource policy and trigger allow, so the
signature is not checked here (BRIDGE_TOPIC_ARNS, when set, is still enforced: a record without a TopicArn is
refused then).

Every record is handled on its own; whatever one record holds (any JSON value in any field) or raises, the
handler returns a summary and never crashes on it. The summary carries Lambda's partial-batch answer,
`batchItemFailures` (`{"itemIdentifier": messageId}`): the records not applied, for SQS to deliver again and,
after maxReceiveCount, move to the dead-letter queue. A record that is not a valid opt-out (the HTTP
endpoint's 400) is listed there too, unless SQS has delivered it POISON_RECEIVES times (then it is consumed:
retrying cannot fix it); it is also listed under `rejected` with its problem. SNS ignores the partial-batch
answer, and the journal lives in /tmp, which does not survive a cold start: so for an SNS trigger the
invocation succeeds only once every opt-out is in the store, and otherwise raises NotStored, a deliberate
retry signal (Lambda retries it, finding the earlier ones as duplicates).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from agent import metrics
from agent.core import open_core
from agent.errors import JournalError, StoreUnavailable
from agent.optout import clean_text
from agent.pipeline import Replayer
from agent.settings import Settings
from sns_bridge.app import open_handler
from sns_bridge.errors import EventRejected, NotStored
from sns_bridge.handler import BridgeHandler, attribute_values
from sns_bridge.sqs import POISON_RECEIVES, receive_count, text_or_none, unwrap

log = logging.getLogger("sns_bridge.lambda")


def handler(event: Any, context: object) -> dict[str, Any]:
    """Lambda entry point. Returns the summary (with `batchItemFailures`); raises NotStored only for an SNS
    trigger whose opt-outs are not in the store yet, so that Lambda retries."""
    return asyncio.run(handle_event(event, Settings()))


@dataclass(frozen=True)
class _Item:
    """One record of the event, whichever trigger built it."""

    message_id: str | None
    message: str
    attributes: dict[str, str]
    topic_arn: str | None
    receives: int | None
    """SQS's ApproximateReceiveCount (None for an SNS trigger)."""


def _ident(index: int, record: object) -> str:
    """The record's identifier for `batchItemFailures`: SQS's messageId, SNS's MessageId, else its index."""
    if isinstance(record, Mapping):
        sns = record.get("Sns")
        found = text_or_none(sns.get("MessageId") if isinstance(sns, Mapping) else record.get("messageId"))
        if found:
            return found
    return str(index)


def _item(index: int, record: object) -> _Item:
    """Read one record. Raises EventRejected naming what is missing or of the wrong type."""
    if not isinstance(record, Mapping):
        raise EventRejected("Records", f"record {index} is a {type(record).__name__}, not an object")
    sns = record.get("Sns")
    if sns is not None:
        if not isinstance(sns, Mapping):
            raise EventRejected("Sns", f"expected an object, got {type(sns).__name__}")
        message = sns.get("Message")
        if not isinstance(message, str):
            raise EventRejected("Sns.Message", "no Sns.Message string")
        return _Item(text_or_none(sns.get("MessageId")), message, attribute_values(sns.get("MessageAttributes")),
                     text_or_none(sns.get("TopicArn")), None)
    body = record.get("body")
    if not isinstance(body, str):
        raise EventRejected("Records", f"record {index} has neither an Sns object nor an SQS body string")
    note = unwrap(body, _sqs_attributes(record.get("messageAttributes")))
    return _Item(note.message_id, note.message, note.attributes,
                 note.topic_arn if note.envelope else None, receive_count(record.get("attributes")))


def _sqs_attributes(value: object) -> dict[str, Any] | None:
    """The Lambda spelling of SQS message attributes (`stringValue`) as the poller's (`StringValue`)."""
    if not isinstance(value, Mapping):
        return None
    return {k: {"StringValue": v.get("stringValue")} for k, v in value.items() if isinstance(v, Mapping)}


async def handle_event(event: Any, settings: Settings) -> dict[str, Any]:
    """Apply every record of a Lambda event; see the module docstring for what it returns and raises."""
    summary: dict[str, Any] = {"records": 0, "applied": 0, "duplicate": 0, "skipped": 0, "rejected": [],
                               "batchItemFailures": []}
    records = event.get("Records") if isinstance(event, Mapping) else None
    if not isinstance(records, list):
        summary["rejected"].append({"record": None, "error": "the event has no Records list"})
        log.error("Lambda event without a Records list: %.200r", event)
        return summary
    sns_trigger = any(isinstance(r, Mapping) and "Sns" in r for r in records)
    applied: list[str] = []
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack)
        bridge = await open_handler(settings, core, stack)
        for index, record in enumerate(records):
            summary["records"] += 1
            if (ident := await _apply(bridge, settings.topic_allow_list, index, record, summary)) is not None:
                applied.append(ident)
        try:
            await Replayer(core.pipeline).drain()
            left = await core.journal.depth()
        except (StoreUnavailable, JournalError) as exc:
            if sns_trigger:
                raise NotStored(f"the store is unavailable; Lambda will retry: {exc}") from exc
            log.error("opt-outs not in the store (%s): reported for a retry", exc)
            left = len(applied)
        if left > 0:
            if sns_trigger:
                raise NotStored(f"{left} opt-outs are journaled but not stored; Lambda will retry")
            # SQS trigger: the journal dies with this container; a redelivery finds the stored ones duplicates.
            summary["batchItemFailures"].extend({"itemIdentifier": i} for i in applied)
    log.info("Lambda event applied", extra={"summary": summary})
    return summary


async def _apply(bridge: BridgeHandler, allowed: frozenset[str], index: int, record: object,
                 summary: dict[str, Any]) -> str | None:
    """Apply one record into `summary`; its identifier when it was applied, None otherwise. Never raises."""
    ident = _ident(index, record)
    receives: int | None = None
    try:
        item = _item(index, record)
        receives = item.receives
        if allowed and item.topic_arn not in allowed:
            raise EventRejected("TopicArn", f"topic {item.topic_arn!r} not in BRIDGE_TOPIC_ARNS" if item.topic_arn
                                else "no TopicArn, and BRIDGE_TOPIC_ARNS is set")
        handled = await bridge.apply(message_id=item.message_id, message=item.message, attributes=item.attributes)
    except EventRejected as exc:
        log.error("Lambda record %d (%s) is not a valid opt-out: %s", index, ident, exc)
        summary["rejected"].append({"record": index, "messageId": ident, "error": str(exc)})
        if receives is None or receives < POISON_RECEIVES:
            summary["batchItemFailures"].append({"itemIdentifier": ident})
        return None
    except JournalError as exc:
        log.error("Lambda record %d (%s) not made durable; reported for a retry: %s", index, ident, exc)
        summary["batchItemFailures"].append({"itemIdentifier": ident})
        return None
    except Exception as exc:  # isolated to this record
        metrics.ISOLATED.labels("lambda").inc()
        log.exception("Lambda record %d (%s) could not be handled; reported for a retry", index, ident)
        summary["rejected"].append({"record": index, "messageId": ident,
                                    "error": clean_text(f"{type(exc).__name__}: {exc}", 300)})
        summary["batchItemFailures"].append({"itemIdentifier": ident})
        return None
    summary[handled.disposition.value] += 1
    return ident

