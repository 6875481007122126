"""Scenario 5: SNS unreachable for 30 s while the agent publishes opt-outs.

moto runs in server mode; the agent's AWS_ENDPOINT_URL points at a TcpProxy in front of it, with dummy
credentials. The topic (OPTOUT_EVENTS_TOPIC_ARN) has an SQS queue subscribed with raw delivery as the
consumer; a task keeps draining it and counts eventIds. 20 SIP calls first, all delivered; then the proxy
cuts SNS off (while the publisher is idle, so no request is half done) for 30 s, during which 40 more calls
press 9 and are stored while their events wait in the journal's outbox. Once SNS is reachable again
every one of the 60 events must reach the consumer exactly once per eventId, and the outbox must be empty.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from agent.testcall import CallObserver, CallResult
from tests.faults.conftest import AgentFactory, stop_proxy
from tests.faults.harness import (
    Figures,
    RedisServer,
    agent_hung_up,
    end_leftovers,
    eventually,
    journal_counts,
    numbers,
    place_calls,
    start_agent,
    wait_stored,
)
from tests.tcp_proxy import TcpProxy

OUTAGE_SECONDS = 30.0
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def moto_server() -> Iterator[tuple[str, int]]:
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield host, port
    server.stop()


@pytest.fixture
async def sns_proxy(moto_server: tuple[str, int]) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy(*moto_server).start()
    yield proxy
    await stop_proxy(proxy)


@pytest.fixture
async def aws(moto_server: tuple[str, int]) -> AsyncIterator[tuple[Any, Any]]:
    """SNS and SQS clients straight to moto (the consumer's side, never through the proxy)."""
    url = f"http://{moto_server[0]}:{moto_server[1]}"
    config = AioConfig(connect_timeout=1.0, read_timeout=5.0, retries={"mode": "standard", "max_attempts": 2})
    session = get_session()
    async with session.create_client("sns", region_name=REGION, endpoint_url=url, config=config,
                                     **CREDENTIALS) as sns, \
            session.create_client("sqs", region_name=REGION, endpoint_url=url, config=config, **CREDENTIALS) as sqs:
        yield sns, sqs


async def consume(sqs: Any, queue_url: str, seen: Counter[str], stop: asyncio.Event) -> None:
    """The consumer: receive, count each message's eventId, delete; until stopped and the queue is empty."""
    while True:
        batch = (await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=0 if stop.is_set() else 1)).get("Messages", [])
        if not batch:
            if stop.is_set():
                return
            continue
        for message in batch:
            seen[json.loads(message["Body"])["eventId"]] += 1
        await sqs.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)])


async def event_ids(pg_dsn: str, campaign: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT event_id FROM optout_actions WHERE campaign_id = %s", (campaign,))
        return {str(r[0]) for r in await cur.fetchall()}


async def test_sns_unreachable_for_30s(
    make_agent: AgentFactory, pg_dsn: str, redis_server: RedisServer, observer: CallObserver, campaign: str,
    sns_proxy: TcpProxy, aws: tuple[Any, Any],
) -> None:
    sns, sqs = aws
    tag = uuid.uuid4().hex[:10]
    topic_arn = (await sns.create_topic(Name=f"optout-events-{tag}"))["TopicArn"]
    queue_url = (await sqs.create_queue(QueueName=f"consumer-{tag}"))["QueueUrl"]
    queue_arn = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"]))[
        "Attributes"]["QueueArn"]
    await sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
                        Attributes={"RawMessageDelivery": "true"})
    agent = make_agent(OPTOUT_EVENTS_TOPIC_ARN=topic_arn, AWS_ENDPOINT_URL=f"http://127.0.0.1:{sns_proxy.port}",
                       AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, AWS_ACCESS_KEY_ID="testing",
                       AWS_SECRET_ACCESS_KEY="testing")
    await start_agent(agent, pg_dsn)
    seen: Counter[str] = Counter()
    stop = asyncio.Event()
    consumer = asyncio.create_task(consume(sqs, queue_url, seen, stop))
    calls: list[CallResult] = []
    try:
        async with asyncio.timeout(200):
            calls = await place_calls(observer, numbers(20), campaign=campaign, concurrency=20, over=2.0)

            async def all_delivered() -> bool:
                return set(seen) >= await event_ids(pg_dsn, campaign) and len(seen) >= len(calls)

            assert await eventually(all_delivered, within=30.0), "the first 20 events were not delivered"
            sns_proxy.cut()
            cut = time.monotonic()
            calls += await place_calls(observer, numbers(40, first=2_000_000), campaign=campaign, concurrency=30,
                                       over=8.0)
            expected = {c.number for c in calls if c.pressed_at is not None}
            got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=60.0)
            assert time.monotonic() - cut < OUTAGE_SECONDS, "the calls outlasted the outage"
            held = journal_counts(agent.journal_path)["unpublished"]
            await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - cut))
            sns_proxy.restore()
            restored = time.monotonic()
            delivered = await eventually(all_delivered, within=90.0, every=0.05)
            delivered_after = time.monotonic() - restored
            await asyncio.sleep(2.0)  # anything published twice arrives now
            stop.set()
            await consumer
        ids = await event_ids(pg_dsn, campaign)
        twice = {i: n for i, n in seen.items() if n > 1}
        outbox = journal_counts(agent.journal_path)["unpublished"]
        figures = Figures("5 sns-outage", calls, expected, got,
                          f"SNS cut {OUTAGE_SECONDS:.0f}s with {held} events held in the outbox; delivered "
                          f"{len(seen)} eventIds in {sum(seen.values())} messages, the last "
                          f"{delivered_after:.1f}s after SNS came back; redelivered={len(twice)}; outbox left={outbox}")
        figures.report()
        assert held > 0, "no event waited for SNS: the outage did not meet the publishing"
        assert delivered, f"events missing at the consumer: {len(ids - set(seen))}"
        assert set(seen) == ids and len(ids) == len(expected), "eventIds at the consumer differ from the store"
        assert not twice, f"eventIds delivered more than once: {twice}"
        assert outbox == 0
        assert figures.hung_up == len(calls), [c.call_id for c in calls if not agent_hung_up(c)]
        assert figures.lost == 0 and got.duplicated == 0
        assert got.in_redis == expected, sorted(expected - got.in_redis)
    finally:
        stop.set()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await end_leftovers(observer, calls)
