"""Issue 20 at the SNS ways in: any JSON value in any field of the event or of the envelope, through the real
bridge (signed HTTP deliveries, moto's SQS, the Lambda handler) into the real PostgreSQL and Redis. Wrong
input answers 400 (SQS: deleted after a few receives or left for the dead-letter queue; Lambda: a batch item
failure), never 500, and no record stops a loop."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from botocore.exceptions import ClientError
from conftest import EVENT, Endpoint, Wiring, event_json, make_queue, open_endpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from signing import SigningIdentity, ToLocalServer, notification, sign

from agent.cache import RedisCache
from agent.constants import Origin
from agent.journal import Journal
from agent.pipeline import OptOutPipeline, Replayer
from agent.publisher import SnsPublisher
from agent.settings import Settings
from agent.store_postgres import PostgresStore
from sns_bridge.handler import BridgeHandler, MessageIdDedupe
from sns_bridge.lambda_handler import handle_event
from sns_bridge.sqs import POISON_RECEIVES, SqsPoller
from tests.conftest import make_record

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
EVENT_FIELDS = ("callId", "campaignId", "contactId", "phoneNumber", "dtmfInput", "timestamp", "eventId", "origin")
ENVELOPE_FIELDS = ("Type", "MessageId", "TopicArn", "Subject", "Message", "Timestamp", "SignatureVersion",
                   "Signature", "SigningCertURL", "MessageAttributes", "UnsubscribeURL")
MISSING = object()
CRM = {"origin": {"DataType": "String", "StringValue": "crm"}}


def events() -> st.SearchStrategy[dict[str, Any]]:
    """An event whose every field may hold any JSON value (or be left out)."""
    return st.fixed_dictionaries({f: st.one_of(st.just(EVENT[f]), JSON) for f in EVENT if f != "phoneNumber"},
                                 optional={"phoneNumber": st.one_of(st.just(EVENT["phoneNumber"]), JSON),
                                           "eventId": JSON, "origin": JSON})


def signed(identity: SigningIdentity, message: str, **overrides: Any) -> dict[str, Any]:
    return sign(notification(Message=message, MessageId=str(uuid.uuid4()), MessageAttributes={}, **overrides),
                identity)


# --- 1 (end to end): an unrepresentable timestamp blocks no neighbour ----------------------------------------------
@pytest_asyncio.fixture
async def store_down_endpoint(journal: Journal, cache: RedisCache, transport: ToLocalServer) -> AsyncIterator[Endpoint]:
    async with PostgresStore("postgresql://postgres@127.0.0.1:1/x", timeout=0.5) as dead:
        pipeline = OptOutPipeline(journal=journal, store=dead, cache=cache)
        handler = BridgeHandler(pipeline=pipeline, region="US", dedupe=MessageIdDedupe(redis=cache.client))
        async for ep in open_endpoint(handler, transport, journal):
            yield ep


async def test_a_dotnet_min_or_max_timestamp_is_dropped_by_name_and_every_neighbour_is_stored(
    store_down_endpoint: Endpoint, identity: SigningIdentity, journal: Journal, cache: RedisCache,
    pg_store: PostgresStore,
) -> None:
    """The store is down (an outage journals everything); the odd events sit among the others in the journal."""
    stamps = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00.0000000+02:00"]
    numbers = [f"+1202555{i:04d}" for i in range(9)]
    for i, number in enumerate(numbers):
        stamp = stamps[i // 3] if i % 3 == 1 else EVENT["timestamp"]
        response = await store_down_endpoint.post(signed(identity, event_json(phoneNumber=number, timestamp=stamp)))
        assert response.status_code == 200, response.text
        if i % 3 == 1:
            assert response.json()["dropped"][0].startswith("field timestamp:"), response.json()
        again = await store_down_endpoint.post(signed(identity, event_json(phoneNumber=number, timestamp=stamp)))
        assert again.status_code == 200 and again.json()["result"] == "duplicate"
    replayer = Replayer(OptOutPipeline(journal=journal, store=pg_store, cache=cache), batch=4)
    assert await replayer.drain() == len(numbers)
    assert await pg_store.blacklisted(numbers) == set(numbers)
    assert await journal.depth() == 0


# --- 3. any JSON value in any field: HTTP --------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(event=events())
async def test_any_json_value_in_any_event_field_answers_200_or_400_over_http(
    endpoint: Endpoint, identity: SigningIdentity, pg_store: PostgresStore, event: dict[str, Any],
) -> None:
    response = await endpoint.post(signed(identity, json.dumps(event)))
    assert response.status_code in (200, 400), response.text
    body = response.json()
    number = event.get("phoneNumber")
    if response.status_code == 400:
        assert body["error"].startswith("Message field "), body
        return
    if isinstance(event.get("eventId"), str) and event.get("origin") in ("ari", "agi", "ami", "admin"):
        assert body["result"] == "skipped"
        return
    assert body["result"] in ("applied", "duplicate")
    assert isinstance(number, str) and await pg_store.blacklisted([number]) == {number}


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(ENVELOPE_FIELDS), value=st.one_of(JSON, st.just(MISSING)), resign=st.booleans())
async def test_any_json_value_in_any_envelope_field_answers_4xx_never_5xx(
    endpoint: Endpoint, identity: SigningIdentity, field: str, value: Any, resign: bool,
) -> None:
    envelope = signed(identity, event_json())
    if value is MISSING:
        del envelope[field]
    else:
        envelope[field] = value
    if resign and field not in ("Signature", "SignatureVersion"):
        try:
            envelope = sign(envelope, identity)
        except (KeyError, TypeError, AttributeError):
            pass  # a signed field that is not a string: nothing can sign it
    response = await endpoint.post(envelope)
    assert response.status_code in (200, 400, 403), (field, value, response.text)
    assert "error" in response.json() or response.status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=JSON)
async def test_any_json_body_answers_4xx(endpoint: Endpoint, body: Any) -> None:
    response = await endpoint.post(json.dumps(body))
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("origin", [["ari"], {"a": 1}, 7, None, True])
async def test_an_origin_of_any_json_type_neither_crashes_nor_skips(
    endpoint: Endpoint, identity: SigningIdentity, pg_store: PostgresStore, origin: Any,
) -> None:
    response = await endpoint.post(signed(identity, event_json(eventId="ev-1", origin=origin)))
    assert response.status_code == 200, response.text
    assert response.json()["result"] == "applied"
    assert await pg_store.blacklisted([EVENT["phoneNumber"]]) == {EVENT["phoneNumber"]}


# --- 3. SQS: deleted after a few receives, or moved to the dead-letter queue ----------------------------------------
HOSTILE = [
    {**EVENT, "origin": ["ari"], "eventId": "x"}, {**EVENT, "origin": {"o": 1}}, {**EVENT, "phoneNumber": ["+1"]},
    {**EVENT, "phoneNumber": {"n": 1}}, {**EVENT, "callId": {"a": [1]}}, {**EVENT, "timestamp": [2024]},
    {**EVENT, "timestamp": "0001-01-01T00:00:00+01:00"}, {**EVENT, "phoneNumber": 12025550123},
    [EVENT], "just text", None, 3.5,
]


async def poll_until_empty(poller: SqsPoller, sqs: Any, url: str, *, rounds: int) -> int:
    deleted = 0
    for _ in range(rounds):
        deleted += await poller.poll_once(wait_seconds=0)
        attrs = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))["Attributes"]
        if int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"]) == 0:
            break
        await asyncio.sleep(1.05)  # the visibility timeout (1 s) passes: the next receive counts one more
    return deleted


async def test_sqs_messages_of_any_json_shape_are_applied_or_deleted_after_a_few_receives(
    sns: Any, sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler, pg_store: PostgresStore,
) -> None:
    for body in HOSTILE:
        await sns.publish(TopicArn=wiring.topic_arn, Message=json.dumps(body), MessageAttributes=CRM)
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=0,
                       visibility_timeout=1)
    deleted = await poll_until_empty(poller, sqs, wiring.queue_url, rounds=POISON_RECEIVES + 3)
    assert deleted == len(HOSTILE)
    assert await pg_store.blacklisted([EVENT["phoneNumber"]]) == {EVENT["phoneNumber"]}


async def test_sqs_messages_of_the_wrong_type_go_to_the_dead_letter_queue_where_one_is_configured(
    sns: Any, sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler,
) -> None:
    dlq_url, dlq_arn = await make_queue(sqs, f"dlq-{uuid.uuid4().hex[:8]}")
    await sqs.set_queue_attributes(QueueUrl=wiring.queue_url, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})})
    wrong = [{**EVENT, "phoneNumber": ["+12025550123"]}, {**EVENT, "phoneNumber": {"n": 1}}, [EVENT]]
    for body in wrong:
        await sns.publish(TopicArn=wiring.topic_arn, Message=json.dumps(body), MessageAttributes=CRM)
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=0,
                       visibility_timeout=1)
    assert await poll_until_empty(poller, sqs, wiring.queue_url, rounds=POISON_RECEIVES + 3) == 0
    dead = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"]))["Attributes"]
    assert int(dead["ApproximateNumberOfMessages"]) == len(wrong)


async def test_a_message_that_keeps_failing_is_parked_in_the_queue_not_deleted_nor_received_again(
    sns: Any, sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler, pg_store: PostgresStore,
) -> None:
    """A failure no rule foresaw (a bug) may hide a valid opt-out: without a dead-letter queue it is parked."""
    await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(), MessageAttributes=CRM)

    async def broken(**kwargs: Any) -> Any:
        raise KeyError("a bug in the handler")

    bridge_handler.apply = broken  # type: ignore[method-assign]
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=0,
                       visibility_timeout=1)
    receives = 0
    for _ in range(POISON_RECEIVES + 3):
        response = await sqs.get_queue_attributes(QueueUrl=wiring.queue_url, AttributeNames=["All"])
        if int(response["Attributes"]["ApproximateNumberOfMessages"]) == 1:
            receives += 1
        assert await poller.poll_once(wait_seconds=0) == 0
        await asyncio.sleep(1.05)
    attrs = (await sqs.get_queue_attributes(QueueUrl=wiring.queue_url, AttributeNames=["All"]))["Attributes"]
    assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == ("0", "1")
    assert receives == POISON_RECEIVES, "received until it was parked, then no more"


# --- 3. Lambda: a batch item failure, never a crash -----------------------------------------------------------------
@pytest.fixture
def lambda_settings(pg_store: PostgresStore, pg_dsn: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=SecretStr(pg_dsn), redis_url=SecretStr(redis_url),
                    optout_journal_path=tmp_path / "lambda.db", asterisk_worker_url=None, bridge_topic_arns="")


def sns_record(message: Any, message_id: Any) -> dict[str, Any]:
    return {"EventSource": "aws:sns", "Sns": {"Type": "Notification", "MessageId": message_id, "Message": message,
                                              "TopicArn": "arn:aws:sns:us-east-1:123456789012:optout-events"}}


def sqs_record(body: Any, message_id: Any, receives: Any = "1") -> dict[str, Any]:
    return {"eventSource": "aws:sqs", "messageId": message_id, "body": body,
            "attributes": {"ApproximateReceiveCount": receives}}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(records=st.lists(st.one_of(
    st.builds(sns_record, st.one_of(events().map(json.dumps), JSON), st.one_of(st.uuids().map(str), JSON)),
    st.builds(sqs_record, st.one_of(events().map(json.dumps), JSON), st.uuids().map(str),
              st.one_of(JSON, st.just("9"))),
    JSON), min_size=1, max_size=4), wrap=st.booleans())
async def test_any_json_in_a_lambda_event_is_reported_never_raised(
    lambda_settings: Settings, pg_store: PostgresStore, records: list[Any], wrap: bool,
) -> None:
    event: Any = {"Records": records} if wrap else records
    summary = await handle_event(event, lambda_settings)
    failures = {f["itemIdentifier"] for f in summary["batchItemFailures"]}
    if not wrap:
        assert summary["records"] == 0 and summary["rejected"]
        return
    assert summary["records"] == len(records)
    assert summary["applied"] + summary["duplicate"] + summary["skipped"] + len(summary["rejected"]) == len(records)
    assert len(failures) <= len(records)
    for rejected in summary["rejected"]:
        assert isinstance(rejected["error"], str)


async def test_a_lambda_record_of_the_wrong_type_is_a_batch_item_failure(
    lambda_settings: Settings, pg_store: PostgresStore,
) -> None:
    event = {"Records": [
        sqs_record(event_json(origin=["ari"], eventId="e"), "m-ok"),
        sqs_record(event_json(phoneNumber={"n": 1}), "m-wrong-type"),
        sqs_record(json.dumps(["not", "an", "event"]), "m-list"),
        sqs_record(event_json(phoneNumber=[1]), "m-seen-often", receives=str(POISON_RECEIVES)),
        sns_record(json.dumps({**EVENT, "phoneNumber": "+12025550124", "origin": {"x": 1}}), "s-ok"),
        sns_record(["a list"], "s-not-a-string"),
    ]}
    summary = await handle_event(event, lambda_settings)
    assert summary["applied"] == 2
    assert {f["itemIdentifier"] for f in summary["batchItemFailures"]} == {"m-wrong-type", "m-list", "s-not-a-string"}
    assert await pg_store.blacklisted([EVENT["phoneNumber"], "+12025550124"]) == {EVENT["phoneNumber"], "+12025550124"}


# --- the publisher: one record SNS refuses with the whole batch never stalls the outbox -----------------------------
async def test_a_batch_sns_refuses_for_one_entry_is_published_one_by_one_and_that_entry_set_aside(
    sqs: Any, wiring: Wiring, tmp_path: Path, moto_url: str,
) -> None:
    async with Journal(tmp_path / "outbox.db", publish=True) as outbox:
        records = [make_record(f"+1202555{i:04d}", origin=Origin.AGI) for i in range(7)]
        poison = records[3].event_id
        for record in records:
            await outbox.append(record)
        async with SnsPublisher(journal=outbox, topic_arn=wiring.topic_arn, region="us-east-1", endpoint_url=moto_url,
                                poll_interval=0.1, connect_timeout=0.5, read_timeout=1.0, max_attempts=1) as publisher:
            real = publisher._client.publish_batch

            async def refuses_the_batch(**kwargs: Any) -> Any:
                if any(poison in e["Message"] for e in kwargs["PublishBatchRequestEntries"]):
                    raise ClientError({"Error": {"Code": "InvalidParameter", "Message": "Invalid parameter: Message"},
                                       "ResponseMetadata": {"HTTPStatusCode": 400}}, "PublishBatch")
                return await real(**kwargs)

            publisher._client.publish_batch = refuses_the_batch
            assert await publisher.publish_pending() == len(records) - 1
            assert await publisher.publish_pending() == 0
        [parked] = await outbox.parked()
        assert parked.event_id == poison and parked.kind == "sns"


async def test_the_publisher_loop_outlives_a_pass_that_raises(
    sqs: Any, wiring: Wiring, tmp_path: Path, moto_url: str,
) -> None:
    async with Journal(tmp_path / "outbox.db", publish=True) as outbox:
        await outbox.append(record := make_record("+12025550999", origin=Origin.AMI))
        async with SnsPublisher(journal=outbox, topic_arn=wiring.topic_arn, region="us-east-1", endpoint_url=moto_url,
                                poll_interval=0.05, connect_timeout=0.5, read_timeout=1.0,
                                max_attempts=1) as publisher:
            real = publisher._client.publish_batch
            calls = 0

            async def crashes_twice(**kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls <= 2:
                    raise AttributeError("'NoneType' object has no attribute 'get'")
                return await real(**kwargs)

            publisher._client.publish_batch = crashes_twice
            task = asyncio.create_task(publisher.run())
            for _ in range(300):
                if not await outbox.unpublished():
                    break
                publisher.wake()
                await asyncio.sleep(0.05)
            assert not task.done(), "the publisher loop must still run"
            task.cancel()
        assert await outbox.unpublished() == []
        assert record.event_id not in {p.event_id for p in await outbox.parked()}


