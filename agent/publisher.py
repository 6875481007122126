"""Publishing opt-outs to SNS from the journal (the outbox): at least once, never on the hangup path.

Every record the journal holds unpublished (the agent opens it with `publish=True`) goes to
OPTOUT_EVENTS_TOPIC_ARN as the event JSON (`OptOutRecord.event_json()`) with the message attributes
`origin=optout-agent` and `eventType`, ten to a PublishBatch, and is marked published once SNS has accepted
it. `eventType=optout` events follow the producers' schema (an E.164 `phoneNumber`, `callId`,
`campaignId`, `contactId`, `dtmfInput`, `timestamp`, plus `eventId`); a press on a call whose number could
not be proven is published as `eventType=optout_number_unknown`, without `phoneNumber`, so that the dialer
can find the contact by its ids. While SNS is unreachable the rows stay and the publisher retries with
Backoff; after a restart it carries on from the journal. A row whose response was lost is published again:
consumers dedupe by eventId. An entry SNS refuses for good (a sender fault) is set aside in the journal
(`optout parked` lists it), logged at ERROR and counted; it never blocks the outbox. SNS-origin records are
marked published without being sent (no loops).

One aiobotocore client for the publisher's life, with short timeouts and botocore's standard retries;
AWS_ENDPOINT_URL (Settings.aws_endpoint_url) points it at an emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import ClientError

from agent import metrics
from agent.backoff import Backoff
from agent.constants import EVENT_TYPE_NUMBER_UNKNOWN, EVENT_TYPE_OPTOUT, SNS_ORIGIN_ATTRIBUTE, Origin
from agent.errors import AWS_ERRORS, PublishUnavailable
from agent.journal import Journal, PublishState
from agent.lifecycle import Resource, within
from agent.optout import OptOutRecord, clean_text

log = logging.getLogger("agent.publisher")

_BATCH_MAX = 10  # SNS PublishBatch takes at most ten entries


class SnsPublisher(Resource):
    """Drains the journal's outbox into an SNS topic (async context manager; `run()` until cancelled).

    With `topic_arn=None` publishing is off: `run()` says so once and returns.
    """

    def __init__(
        self,
        *,
        journal: Journal,
        topic_arn: str | None,
        region: str,
        endpoint_url: str | None = None,
        poll_interval: float = 5.0,
        parallel_batches: int = 4,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 3,
        session: AioSession | None = None,
    ) -> None:
        self._journal = journal
        self._topic_arn = topic_arn
        self._region = region
        self._endpoint_url = endpoint_url
        self._poll_interval = poll_interval
        self._parallel = max(1, parallel_batches)
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
        )
        self._session = session
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self._topic_arn is not None

    async def open(self) -> None:
        """Create the SNS client (no network yet). Does nothing when publishing is off."""
        if self._stack is not None or self._topic_arn is None:
            return
        stack = AsyncExitStack()
        session = self._session or get_session()
        self._client = await stack.enter_async_context(
            session.create_client(
                "sns", region_name=self._region, endpoint_url=self._endpoint_url, config=self._config
            )
        )
        self._stack = stack

    async def close(self) -> None:
        """Close the client. Safe to call twice."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            self._client = None
            await stack.aclose()

    def wake(self) -> None:
        """Publish now rather than at the next poll (the agent calls this after each opt-out)."""
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled: on wake(), every poll interval, and with backoff while SNS is unreachable."""
        if self._topic_arn is None:
            return
        if self._client is None:
            raise RuntimeError("SnsPublisher.run() before open()")
        log.info("publishing opt-outs to %s", self._topic_arn)
        backoff = Backoff("SNS publish", initial=0.5, maximum=30.0, logger=log)
        while True:
            self._wake.clear()
            try:
                await self.publish_pending()
            except PublishUnavailable as exc:
                # Not cut short by wake(): every new opt-out would otherwise hammer an SNS that is down.
                await asyncio.sleep(backoff.delay(exc))
                continue
            except Exception as exc:  # the publisher must outlive whatever a pass meets (JournalError included)
                metrics.ISOLATED.labels("publisher").inc()
                log.exception("publishing pass failed; retrying")
                await asyncio.sleep(backoff.delay(f"{type(exc).__name__}: {exc}"))
                continue
            backoff.reset()
            with contextlib.suppress(TimeoutError):
                await within(self._wake.wait(), self._poll_interval)

    async def publish_one(self, message: dict[str, Any], event_type: str) -> bool:
        """Publish one message outside the outbox, once (speech candidates: their audit row is the durable
        record). False when publishing is off or SNS did not take it."""
        if self._client is None:
            return False
        try:
            await self._client.publish(TopicArn=self._topic_arn, **_message(message, event_type))
        except AWS_ERRORS as exc:
            metrics.PUBLISH_ERRORS.inc()
            log.warning("publishing a %s event failed: %s", event_type, exc)
            return False
        metrics.PUBLISHED.inc()
        return True

    async def publish_pending(self) -> int:
        """Publish everything the outbox holds; returns how many SNS accepted. Raises PublishUnavailable."""
        done = 0
        while True:
            records = await self._journal.unpublished(_BATCH_MAX * self._parallel)
            if not records:
                return done
            own = [r.event_id for r in records if r.origin is Origin.SNS]
            if own:
                await self._journal.mark(own, PublishState.PUBLISHED)
            outgoing: list[OptOutRecord] = []
            unsendable: list[str] = []
            for record in (r for r in records if r.origin is not Origin.SNS):
                try:  # a record that cannot even be written out is set aside, never retried
                    self._entry(0, record)
                    outgoing.append(record)
                except Exception as exc:  # noqa: BLE001 - isolated to this record
                    self._refuse(record.event_id, f"cannot be written as an event: {type(exc).__name__}: {exc}")
                    unsendable.append(record.event_id)
            batches = [outgoing[i : i + _BATCH_MAX] for i in range(0, len(outgoing), _BATCH_MAX)]
            results = await asyncio.gather(*(self._publish_isolated(b) for b in batches), return_exceptions=True)
            accepted = [event_id for r in results if isinstance(r, tuple) for event_id in r[0]]
            refused = [*unsendable, *(event_id for r in results if isinstance(r, tuple) for event_id in r[1])]
            if accepted:
                await self._journal.mark(accepted, PublishState.PUBLISHED)
                metrics.PUBLISHED.inc(len(accepted))
                done += len(accepted)
            if refused:
                metrics.PUBLISH_REFUSED.inc(len(refused))
                await self._journal.mark(refused, PublishState.REFUSED)
            failures = [r for r in results if isinstance(r, BaseException)]
            for failure in failures:
                if not isinstance(failure, PublishUnavailable):
                    raise failure
            handled = len(accepted) + len(refused) - len(unsendable)
            if failures or handled < len(outgoing):
                raise PublishUnavailable(f"{len(outgoing) - handled} of {len(outgoing)} not accepted: {failures}")

    @staticmethod
    def _entry(i: int, record: OptOutRecord) -> dict[str, Any]:
        event_type = EVENT_TYPE_OPTOUT if record.phone_number else EVENT_TYPE_NUMBER_UNKNOWN
        # entry ids must be unique in a batch and [A-Za-z0-9_-]: event ids need not be
        return {"Id": f"m{i}", **_message(record.event_json(), event_type)}

    @staticmethod
    def _refuse(event_id: str, why: str) -> None:
        metrics.ISOLATED.labels("publisher").inc()
        log.error("opt-out %s set aside, not published: %s (`optout parked` lists it)", event_id,
                  clean_text(why, 300), extra={"event_id": event_id})

    async def _publish_isolated(self, records: Sequence[OptOutRecord]) -> tuple[list[str], list[str]]:
        """`_publish_batch`, narrowed down when SNS refuses the whole batch for its content (a 4xx that is
        not throttling): each record alone, and one refused alone is set aside. Raises PublishUnavailable."""
        try:
            return await self._publish_batch(records)
        except _BatchRefused as exc:
            if len(records) == 1:
                self._refuse(records[0].event_id, str(exc))
                return [], [records[0].event_id]
            log.warning("SNS refused a batch of %d (%s): publishing them one by one", len(records), exc)
        alone = [await self._publish_isolated([record]) for record in records]
        return [i for ok, _ in alone for i in ok], [i for _, no in alone for i in no]

    async def _publish_batch(self, records: Sequence[OptOutRecord]) -> tuple[list[str], list[str]]:
        """PublishBatch one chunk; returns the event ids SNS accepted and those it refused for good. Raises
        _BatchRefused when SNS refuses the whole request for its content, PublishUnavailable otherwise."""
        entries = [self._entry(i, record) for i, record in enumerate(records)]
        try:
            response = await self._client.publish_batch(TopicArn=self._topic_arn, PublishBatchRequestEntries=entries)
        except AWS_ERRORS as exc:
            metrics.PUBLISH_ERRORS.inc()
            if isinstance(exc, ClientError) and _refused_for_content(exc):
                raise _BatchRefused(f"PublishBatch refused: {exc}") from exc
            raise PublishUnavailable(f"PublishBatch to {self._topic_arn} failed: {exc}") from exc
        by_id = {f"m{i}": record.event_id for i, record in enumerate(records)}
        refused: list[str] = []
        for failed in response.get("Failed", []):
            metrics.PUBLISH_ERRORS.inc()
            event_id = by_id.get(failed.get("Id", ""))
            permanent = bool(failed.get("SenderFault"))
            log.error(
                "SNS refused opt-out %s: %s %s (%s)", event_id, failed.get("Code"), failed.get("Message"),
                "a sender fault: set aside, not retried" if permanent else "retried",
            )
            if permanent and event_id is not None:
                metrics.ISOLATED.labels("publisher").inc()
                refused.append(event_id)
        return [by_id[ok["Id"]] for ok in response.get("Successful", []) if ok.get("Id") in by_id], refused


def _message(body: dict[str, Any], event_type: str) -> dict[str, Any]:
    """One SNS message, published alone or in a batch: its compact JSON and its two attributes."""
    attributes = {"origin": SNS_ORIGIN_ATTRIBUTE, "eventType": event_type}
    return {"Message": json.dumps(body, separators=(",", ":")),
            "MessageAttributes": {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}}


class _BatchRefused(Exception):
    """SNS refused a whole PublishBatch for what it holds (not for being unreachable or busy)."""


_TRANSIENT_CODES = frozenset({"Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
                              "TooManyRequestsException", "KMSThrottlingException", "RequestTimeout"})


def _refused_for_content(exc: ClientError) -> bool:
    """A 4xx answer that is about the request's content: retrying the same batch cannot help. Credentials,
    permissions, a missing topic and throttling are the deployment's or SNS's state: those are retried."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = str(error.get("Code", ""))
    if code in _TRANSIENT_CODES or code.startswith(("AccessDenied", "AuthorizationError", "InvalidClientTokenId",
                                                    "NotFound", "ExpiredToken", "SignatureDoesNotMatch")):
        return False
    return isinstance(status, int) and 400 <= status < 500
