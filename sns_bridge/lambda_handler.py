"""The SNS -> Lambda way in: `sns_bridge.lambda_handler.handler(event, context)`.

Takes the event Lambda builds for an SNS trigger, `{"Records": [{"Sns": {"Message": "<event json>",
"MessageId": ..., "TopicArn": ..., "MessageAttributes": {...}}}]}`, and applies every record through the
pipeline (origin sns), opening the core from Settings for each invocation (`asyncio.run`).

Trust: Lambda invokes the function only for the topics its resource policy and trigger allow, so the
signature is not checked here (BRIDGE_TOPIC_ARNS, when set, is still enforced: a record without a TopicArn is
refused then). A record that is not a
valid opt-out is logged and counted in the summary: retrying cannot fix it. The journal lives in /tmp,
which does not survive a cold start, so the invocation succeeds only once every opt-out is in the store;
otherwise it raises (NotStored, JournalError) and Lambda retries it, finding the earlier ones as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

from agent.core import open_core
from agent.errors import StoreUnavailable
from agent.pipeline import Replayer
from agent.settings import Settings
from sns_bridge.app import open_handler
from sns_bridge.errors import EventRejected, NotStored
from sns_bridge.handler import attribute_values

log = logging.getLogger("sns_bridge.lambda")


def handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """Lambda entry point. Returns a summary; raises when an opt-out is not stored, so Lambda retries."""
    return asyncio.run(handle_event(event, Settings()))


async def handle_event(event: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """Apply every record of an SNS Lambda event; see the module docstring for what raises."""
    summary: dict[str, Any] = {"records": 0, "applied": 0, "duplicate": 0, "skipped": 0, "rejected": []}
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack)
        bridge = await open_handler(settings, core, stack)
        allowed = settings.topic_allow_list
        for index, record in enumerate(event.get("Records") or []):
            summary["records"] += 1
            sns = record.get("Sns") if isinstance(record, Mapping) else None
            if not isinstance(sns, Mapping) or not isinstance(sns.get("Message"), str):
                summary["rejected"].append({"record": index, "error": "no Sns.Message string"})
                continue
            topic_arn = sns.get("TopicArn")
            if allowed and topic_arn not in allowed:
                why = (f"topic {topic_arn!r} not in BRIDGE_TOPIC_ARNS" if topic_arn
                       else "no TopicArn, and BRIDGE_TOPIC_ARNS is set")
                log.error("SNS record %d refused: %s", index, why)
                summary["rejected"].append({"record": index, "error": why})
                continue
            message_id = sns.get("MessageId")
            try:
                handled = await bridge.apply(
                    message_id=message_id if isinstance(message_id, str) else None,
                    message=sns["Message"],
                    attributes=attribute_values(sns.get("MessageAttributes")),
                )
            except EventRejected as exc:
                log.error("SNS record %d (MessageId %s) is not a valid opt-out: %s", index, message_id, exc)
                summary["rejected"].append({"record": index, "messageId": message_id, "error": str(exc)})
                continue
            summary[handled.disposition.value] += 1
        try:
            await Replayer(core.pipeline).drain()
        except StoreUnavailable as exc:
            raise NotStored(f"the store is unavailable; Lambda will retry: {exc}") from exc
        if (left := await core.journal.depth()) > 0:
            raise NotStored(f"{left} opt-outs are journaled but not stored; Lambda will retry")
    log.info("SNS Lambda event applied", extra={"summary": summary})
    return summary
