"""Against moto in server mode: the agent publishing its outbox, SNS -> SQS delivery with the filter policy,
and the bridge's SQS poller writing the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis
from conftest import EVENT, Wiring, WorkerServer, drain_queue, event_json, make_queue

from agent.constants import BLACKLIST_SET, Origin
from agent.errors import PublishUnavailable
from agent.journal import Journal
from agent.publisher import SnsPublisher
from agent.store_postgres import PostgresStore
from sns_bridge.handler import BridgeHandler
from sns_bridge.sqs import SqsPoller, unwrap
from tests.conftest import make_record
from tests.tcp_proxy import TcpProxy

E164 = EVENT["phoneNumber"]


async def eventually(check: Callable[[], Any], *, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within}s: {check.__name__}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(coro: Any, name: str) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest_asyncio.fixture
async def outbox(tmp_path: Any) -> AsyncIterator[Journal]:
    """The agent's journal, opened as the agent opens it when publishing is on."""
    async with Journal(tmp_path / "agent-journal.db", publish=True) as journal:
        yield journal


def publisher_for(outbox: Journal, topic_arn: str, endpoint_url: str, **kwargs: Any) -> SnsPublisher:
    return SnsPublisher(journal=outbox, topic_arn=topic_arn, region="us-east-1", endpoint_url=endpoint_url,
                        poll_interval=0.2, connect_timeout=0.5, read_timeout=1.0, max_attempts=1, **kwargs)


# --- SNS -> SQS -> poller -> blacklist ---------------------------------------------------------


async def test_published_optout_reaches_the_blacklist_through_sqs_poller(
    sns: Any, sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler, redis_sync: redis.Redis,
    pg_store: PostgresStore,
) -> None:
    await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(),
                      MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                       allowed_topic_arns=frozenset({wiring.topic_arn}))

    deleted = await poller.poll_once()

    assert deleted == 1
    assert redis_sync.sismember(BLACKLIST_SET, E164)
    [row] = await pg_store.history(E164)
    assert row.origin == "sns"
    assert await drain_queue(sqs, wiring.queue_url, rounds=1) == []


async def test_raw_delivery_is_applied(
    sns: Any, sqs: Any, bridge_handler: BridgeHandler, pg_store: PostgresStore, wiring: Wiring,
) -> None:
    await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(),
                      MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.audit_url, wait_seconds=1)

    assert await poller.poll_once() == 1
    assert await pg_store.blacklisted([E164]) == {E164}


async def test_poison_message_is_left_for_the_redrive_policy(
    sns: Any, sqs: Any, bridge_handler: BridgeHandler, written: Callable[[], Any], wiring: Wiring,
) -> None:
    dlq_url, dlq_arn = await make_queue(sqs, f"dlq-{wiring.topic_arn[-10:]}")
    await sqs.set_queue_attributes(QueueUrl=wiring.queue_url, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"}),
    })
    await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(phoneNumber="12"),
                      MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                       visibility_timeout=1)

    assert await poller.poll_once() == 0
    await asyncio.sleep(1.2)
    assert await poller.poll_once(wait_seconds=0) == 0  # moved to the dead-letter queue, not received again

    [dead] = await drain_queue(sqs, dlq_url, rounds=1)
    assert json.loads(unwrap(dead["Body"], None).message)["phoneNumber"] == "12"
    assert written().actions == 0


async def test_message_is_kept_invisible_while_slow_work_runs(
    sns: Any, sqs: Any, bridge_handler: BridgeHandler, wiring: Wiring, worker: WorkerServer,
) -> None:
    worker.delay = 1.7  # the bridge gives up on it after 1.5 s: work that outlasts the visibility timeout
    await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(),
                      MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                       visibility_timeout=1)

    async with running(poller.poll_once(), "poll") as polling:
        await asyncio.sleep(1.4)  # past the first visibility timeout
        peek = await sqs.receive_message(QueueUrl=wiring.queue_url, WaitTimeSeconds=0, VisibilityTimeout=0)
        assert peek.get("Messages", []) == []
        assert await polling == 1


# --- loop prevention: the filter policy ---------------------------------------------------------


async def test_filter_policy_keeps_the_agents_own_events_away_from_the_bridge_queue(
    sqs: Any, wiring: Wiring, outbox: Journal, moto_url: str,
) -> None:
    records = [make_record(f"+97250123456{i}", origin=Origin.ARI) for i in range(3)]
    for record in records:
        await outbox.append(record)

    async with publisher_for(outbox, wiring.topic_arn, moto_url) as publisher:
        assert await publisher.publish_pending() == 3

    assert await drain_queue(sqs, wiring.queue_url, rounds=2) == []
    seen = await drain_queue(sqs, wiring.audit_url)
    assert sorted(json.loads(m["Body"])["eventId"] for m in seen) == sorted(r.event_id for r in records)
    for message in seen:
        assert message["MessageAttributes"]["origin"]["StringValue"] == "optout-agent"
        assert message["MessageAttributes"]["eventType"]["StringValue"] == "optout"
    assert await outbox.unpublished() == []


async def test_publisher_sends_the_event_json(sqs: Any, wiring: Wiring, outbox: Journal, moto_url: str) -> None:
    record = make_record(origin=Origin.AGI)
    await outbox.append(record)

    async with publisher_for(outbox, wiring.topic_arn, moto_url) as publisher:
        await publisher.publish_pending()

    [message] = await drain_queue(sqs, wiring.audit_url)
    assert json.loads(message["Body"]) == record.event_json()


async def test_sns_origin_records_are_not_published_again(
    sqs: Any, wiring: Wiring, outbox: Journal, moto_url: str,
) -> None:
    await outbox.append(make_record(origin=Origin.SNS))

    async with publisher_for(outbox, wiring.topic_arn, moto_url) as publisher:
        assert await publisher.publish_pending() == 0

    assert await outbox.unpublished() == []
    assert await drain_queue(sqs, wiring.audit_url, rounds=2) == []


async def test_publishing_off_without_a_topic(outbox: Journal) -> None:
    await outbox.append(make_record())
    async with SnsPublisher(journal=outbox, topic_arn=None, region="us-east-1") as publisher:
        assert not publisher.enabled
        await asyncio.wait_for(publisher.run(), 1.0)  # returns at once
    assert len(await outbox.unpublished()) == 1


# --- SNS unreachable ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def sns_proxy(moto_url: str) -> AsyncIterator[TcpProxy]:
    target = urlsplit(moto_url)
    assert target.hostname is not None and target.port is not None
    proxy = await TcpProxy(target.hostname, target.port).start()
    yield proxy
    await proxy.stop()


async def test_outbox_is_published_once_sns_comes_back_and_each_event_arrives_once(
    sqs: Any, wiring: Wiring, outbox: Journal, sns_proxy: TcpProxy,
) -> None:
    records = [make_record(f"+97250765432{i}") for i in range(12)]
    sns_proxy.cut()
    publisher = publisher_for(outbox, wiring.topic_arn, f"http://127.0.0.1:{sns_proxy.port}")
    async with publisher:
        await outbox.append(records[0])
        with pytest.raises(PublishUnavailable):
            await publisher.publish_pending()
        async with running(publisher.run(), "sns-publisher"):
            for record in records[1:]:
                await outbox.append(record)
                publisher.wake()
            await asyncio.sleep(0.5)
            assert len(await outbox.unpublished()) == 12  # still waiting: SNS is unreachable
            sns_proxy.restore()

            async def outbox_empty() -> bool:
                return await outbox.unpublished() == []

            await eventually(outbox_empty, within=10.0)

    seen = [json.loads(m["Body"])["eventId"] for m in await drain_queue(sqs, wiring.audit_url)]
    assert sorted(seen) == sorted(r.event_id for r in records)


async def test_outbox_survives_a_restart(sqs: Any, wiring: Wiring, tmp_path: Any, moto_url: str) -> None:
    path = tmp_path / "restart-journal.db"
    record = make_record()
    async with Journal(path, publish=True) as journal:
        await journal.append(record)  # the agent stops before publishing

    async with Journal(path, publish=True) as journal, publisher_for(journal, wiring.topic_arn, moto_url) as pub:
        assert await pub.publish_pending() == 1

    [message] = await drain_queue(sqs, wiring.audit_url)
    assert json.loads(message["Body"])["eventId"] == record.event_id


# --- hardening: one bad message never stalls a batch; no loops ------------------------------------------


async def test_a_message_that_breaks_the_handler_does_not_stop_its_batch_and_is_never_deleted(
    sns: Any, sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler, pg_store: PostgresStore,
) -> None:
    from sns_bridge.sqs import POISON_RECEIVES

    numbers = [f"+1415555012{n}" for n in range(3)]
    broken = numbers[1]
    for number in numbers:
        await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(phoneNumber=number),
                          MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
    apply = bridge_handler.apply

    async def flaky(**kwargs: Any) -> Any:
        if broken in kwargs["message"]:
            raise RuntimeError("a bug in the handler")  # a valid opt-out: it must never be deleted
        return await apply(**kwargs)

    bridge_handler.apply = flaky  # type: ignore[method-assign]
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                       visibility_timeout=1)
    deleted = 0
    for _ in range(POISON_RECEIVES + 2):
        deleted += await poller.poll_once(wait_seconds=1)
        await asyncio.sleep(1.1)
    assert deleted == 2
    assert await pg_store.blacklisted(numbers) == {numbers[0], numbers[2]}
    attrs = (await sqs.get_queue_attributes(QueueUrl=wiring.queue_url, AttributeNames=["All"]))["Attributes"]
    kept = int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])
    assert kept == 1, "the message the handler failed on stays in the queue (parked, or for a retry)"


async def test_a_poison_message_without_a_redrive_policy_is_deleted_after_a_few_receives(
    sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler,
) -> None:
    from sns_bridge.sqs import POISON_RECEIVES

    await sqs.send_message(QueueUrl=wiring.queue_url, MessageBody=event_json(phoneNumber="12"))
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                       visibility_timeout=1)
    deleted = 0
    for _ in range(POISON_RECEIVES + 2):
        deleted += await poller.poll_once(wait_seconds=2)
        if deleted:
            break
        await asyncio.sleep(1.1)
    assert deleted == 1
    assert await drain_queue(sqs, wiring.queue_url, rounds=1) == []


async def test_an_envelope_without_topic_arn_is_refused_when_an_allow_list_is_set(
    sqs: Any, wiring: Wiring, bridge_handler: BridgeHandler, pg_store: PostgresStore,
) -> None:
    envelope = {"Type": "Notification", "MessageId": "2b1a8a1e-0000-4000-8000-000000000009",
                "Message": event_json(), "Timestamp": "2026-11-25T12:00:00.000Z"}
    await sqs.send_message(QueueUrl=wiring.queue_url, MessageBody=json.dumps(envelope))
    poller = SqsPoller(handler=bridge_handler, client=sqs, queue_url=wiring.queue_url, wait_seconds=1,
                       allowed_topic_arns=frozenset({wiring.topic_arn}))
    assert await poller.poll_once() == 0
    assert await pg_store.blacklisted([E164]) == set()


async def test_a_press_without_a_number_is_published_as_its_own_event_type(
    sqs: Any, wiring: Wiring, outbox: Journal, moto_url: str,
) -> None:
    record = make_record(origin=Origin.ARI).model_copy(update={"phone_number": None})
    await outbox.append(record)
    async with publisher_for(outbox, wiring.topic_arn, moto_url) as publisher:
        assert await publisher.publish_pending() == 1
    [message] = await drain_queue(sqs, wiring.audit_url)
    assert message["MessageAttributes"]["eventType"]["StringValue"] == "optout_number_unknown"
    body = json.loads(message["Body"])
    assert "phoneNumber" not in body and body["callId"] == record.call_id and body["eventId"] == record.event_id


async def test_an_entry_sns_refuses_for_good_is_set_aside_and_blocks_nothing(
    sqs: Any, wiring: Wiring, outbox: Journal, moto_url: str,
) -> None:
    good = make_record("+972501234561", origin=Origin.AMI)
    refused = make_record("+972501234562", origin=Origin.AMI).model_copy(update={"call_id": "x" * 128})
    for record in (good, refused):
        await outbox.append(record)
    async with publisher_for(outbox, wiring.topic_arn, moto_url) as publisher:
        real = publisher._client.publish_batch

        async def sender_fault(**kwargs: Any) -> Any:
            entries = kwargs["PublishBatchRequestEntries"]
            bad = [e for e in entries if json.loads(e["Message"])["callId"] == "x" * 128]
            ok = [e for e in entries if e not in bad]
            response = await real(**{**kwargs, "PublishBatchRequestEntries": ok}) if ok else {"Successful": []}
            response["Failed"] = [{"Id": e["Id"], "Code": "InvalidParameter", "SenderFault": True,
                                   "Message": "refused"} for e in bad]
            return response

        publisher._client.publish_batch = sender_fault
        assert await publisher.publish_pending() == 1
        assert await publisher.publish_pending() == 0, "the refused one is not retried forever"
    assert await outbox.unpublished() == []
    [parked] = await outbox.parked()
    assert parked.event_id == refused.event_id and parked.kind == "sns"
