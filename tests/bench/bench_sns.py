"""SNS benchmarks: prints figures, asserts nothing about time.

1. POST /sns: signed notifications per second through signature verification and the full pipeline
   (journal fsync, PostgreSQL, Redis), with p50/p99 response times. The bridge runs in one process and
   the load generator in another (two cores). Messages are signed beforehand; the signing certificate
   is served from memory, as the bridge's certificate cache would after the first fetch.
2. SQS drain rate: opt-outs published to a topic (moto in server mode), drained by the SqsPoller
   through the full pipeline.
3. Publish outbox throughput: journaled opt-outs published to SNS (moto) with PublishBatch.

    python tests/bench/bench_sns.py [--requests 3000] [--concurrency 32] [--sqs 500] [--outbox 3000]

Needs PostgreSQL and Redis as for the tests (DATABASE_URL_TEST, REDIS_URL_TEST).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "sns_bridge")]

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from aiobotocore.config import AioConfig  # noqa: E402
from aiobotocore.session import get_session  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from signing import TOPIC_ARN, make_identity, notification, sign  # noqa: E402

from agent.cache import RedisCache  # noqa: E402
from agent.constants import Origin  # noqa: E402
from agent.journal import Journal  # noqa: E402
from agent.optout import OptOutRecord  # noqa: E402
from agent.pipeline import OptOutPipeline  # noqa: E402
from agent.publisher import SnsPublisher  # noqa: E402
from agent.store_postgres import PostgresStore  # noqa: E402
from sns_bridge.handler import BridgeHandler, MessageIdDedupe  # noqa: E402
from sns_bridge.http import BridgeHttp  # noqa: E402
from sns_bridge.sqs import SqsPoller  # noqa: E402
from sns_bridge.verify import SnsVerifier  # noqa: E402
from tests.conftest import PG_BASE, REDIS_URL, with_schema  # noqa: E402

AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


class MemoryCertificates:
    """The signing certificate from memory (what HttpCertificateSource's cache answers after one fetch)."""

    def __init__(self, pem: bytes) -> None:
        self._pem = pem

    async def fetch(self, url: str) -> bytes:
        return self._pem


def event(i: int, tag: str) -> dict[str, Any]:
    return {"callId": f"call-{tag}-{i}", "campaignId": "bench", "contactId": f"c-{i}",
            "phoneNumber": f"+1415{2_000_000 + i:07d}",
            "dtmfInput": "9", "timestamp": "2026-11-25T12:00:00Z"}


@asynccontextmanager
async def pipeline_on(dsn: str, journal_path: Path) -> AsyncIterator[OptOutPipeline]:
    async with Journal(journal_path) as journal, PostgresStore(dsn) as store, RedisCache(REDIS_URL) as cache:
        await store.migrate()
        yield OptOutPipeline(journal=journal, store=store, cache=cache)


def fresh_schema() -> str:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    redis.Redis.from_url(REDIS_URL).flushdb()
    return schema


def drop_schema(schema: str) -> None:
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
    redis.Redis.from_url(REDIS_URL).flushdb()


def count_actions(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM optout_actions").fetchone()
    return int(row[0]) if row else 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- 1. the HTTP endpoint ------------------------------------------------------------------------


def serve(dsn: str, journal_path: str, pem: bytes, port: Any, ready: MpEvent, stop: MpEvent) -> None:
    async def main() -> None:
        async with pipeline_on(dsn, Path(journal_path)) as pipeline, httpx.AsyncClient() as client:
            handler = BridgeHandler(pipeline=pipeline, region="US",
                                    dedupe=MessageIdDedupe(redis=pipeline.cache.client if pipeline.cache else None))
            verifier = SnsVerifier(allowed_topic_arns=frozenset({TOPIC_ARN}), certificates=MemoryCertificates(pem),
                                   max_age=timedelta(hours=1))
            async with BridgeHttp(handler=handler, verifier=verifier, client=client, host="127.0.0.1", port=0,
                                  max_body_bytes=256 * 1024) as http:
                port.value = http.bound_port
                ready.set()
                while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing event
                    await asyncio.sleep(0.05)

    asyncio.run(main())


async def load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], dict[int, int]]:
    """Post every body with `concurrency` keep-alive connections (aiohttp: the lightest client at hand)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def worker() -> None:
            for body in queue:
                started = time.perf_counter()
                async with client.post(url, data=body, headers={"Content-Type": "text/plain"}) as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, statuses


def bench_http(requests: int, concurrency: int) -> None:
    identity = make_identity()
    schema = fresh_schema()
    dsn = with_schema(PG_BASE, schema)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    tag = uuid.uuid4().hex[:6]
    warmup = 200
    bodies = [
        json.dumps(sign(notification(MessageId=str(uuid.uuid4()), Timestamp=now, MessageAttributes={},
                                     Message=json.dumps(event(i, tag))), identity)).encode()
        for i in range(requests + warmup)
    ]
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    port = ctx.Value("i", 0)
    with tempfile.TemporaryDirectory() as tmp:
        server = ctx.Process(target=serve, args=(dsn, f"{tmp}/journal.db", identity.cert_pem, port, ready, stop))
        server.start()
        try:
            if not ready.wait(30):
                raise RuntimeError("the bridge did not start")
            url = f"http://127.0.0.1:{port.value}/sns"
            asyncio.run(load(url, bodies[:warmup], concurrency))
            elapsed, latencies, statuses = asyncio.run(load(url, bodies[warmup:], concurrency))
        finally:
            stop.set()
            server.join(10)
    recorded = count_actions(dsn)
    drop_schema(schema)
    print(f"POST /sns  {requests} signed notifications, concurrency {concurrency}, bridge and client "
          f"in two processes on {os.cpu_count()} cores")
    print(f"  {requests / elapsed:,.0f} notifications/s   p50 {percentile(latencies, 0.5) * 1000:.1f} ms   "
          f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms   mean {statistics.fmean(latencies) * 1000:.1f} ms")
    print(f"  statuses {statuses}; audit rows written {recorded} (incl. {warmup} warm-up)")


# --- 2 and 3: against moto -----------------------------------------------------------------------


def moto() -> tuple[ThreadedMotoServer, str]:
    os.environ.update(AWS_ENV)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


CONFIG = AioConfig(connect_timeout=2.0, read_timeout=30.0, retries={"mode": "standard", "max_attempts": 3})


async def bench_sqs(endpoint: str, n: int, pollers: int) -> None:
    schema = fresh_schema()
    dsn = with_schema(PG_BASE, schema)
    tag = uuid.uuid4().hex[:8]
    session = get_session()
    async with session.create_client("sns", region_name="us-east-1", endpoint_url=endpoint, config=CONFIG) as sns, \
            session.create_client("sqs", region_name="us-east-1", endpoint_url=endpoint, config=CONFIG) as sqs:
        topic = (await sns.create_topic(Name=f"bench-{tag}"))["TopicArn"]
        queue = (await sqs.create_queue(QueueName=f"bench-{tag}"))["QueueUrl"]
        arn = (await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
        await sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                            Attributes={"FilterPolicy": json.dumps({"origin": [{"anything-but": "optout-agent"}]})})
        for start in range(0, n, 10):
            await sns.publish_batch(TopicArn=topic, PublishBatchRequestEntries=[
                {"Id": f"m{i}", "Message": json.dumps(event(start + i, tag)),
                 "MessageAttributes": {"origin": {"DataType": "String", "StringValue": "crm"}}}
                for i in range(min(10, n - start))
            ])
        with tempfile.TemporaryDirectory() as tmp:
            async with pipeline_on(dsn, Path(tmp) / "journal.db") as pipeline:
                handler = BridgeHandler(pipeline=pipeline, region="US", dedupe=MessageIdDedupe(redis=None))
                tasks = [
                    asyncio.create_task(SqsPoller(handler=handler, client=sqs, queue_url=queue, wait_seconds=1).run())
                    for _ in range(pollers)
                ]
                started = time.perf_counter()
                while count_actions(dsn) < n and time.perf_counter() - started < 300:  # noqa: ASYNC110 - polls the store
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - started
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    done = count_actions(dsn)
    drop_schema(schema)
    print(f"SQS drain  {done}/{n} opt-outs through {pollers} poller(s) (moto server in-process): "
          f"{done / elapsed:,.0f} opt-outs/s")


async def bench_moto_ceiling(endpoint: str, n: int) -> None:
    """Receive + delete with no work at all: what moto itself allows (the drain figure cannot beat it)."""
    tag = uuid.uuid4().hex[:8]
    async with get_session().create_client("sqs", region_name="us-east-1", endpoint_url=endpoint,
                                           config=CONFIG) as sqs:
        queue = (await sqs.create_queue(QueueName=f"ceiling-{tag}"))["QueueUrl"]
        for start in range(0, n, 10):
            await sqs.send_message_batch(QueueUrl=queue, Entries=[
                {"Id": str(i), "MessageBody": json.dumps(event(start + i, tag))} for i in range(min(10, n - start))
            ])
        done = 0
        started = time.perf_counter()
        while done < n:
            batch = (await sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1))
            messages = batch.get("Messages", [])
            if messages:
                await sqs.delete_message_batch(QueueUrl=queue, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
                ])
            done += len(messages)
        elapsed = time.perf_counter() - started
    print(f"  moto's own ceiling: receive + delete of {n} messages with no work: {n / elapsed:,.0f} messages/s")


async def bench_outbox(endpoint: str, n: int) -> None:
    tag = uuid.uuid4().hex[:8]
    session = get_session()
    with tempfile.TemporaryDirectory() as tmp:
        async with Journal(Path(tmp) / "outbox.db", publish=True) as journal:
            now = datetime.now(UTC)
            records = [
                OptOutRecord(event_id=f"ev-{tag}-{i}", phone_number=f"+1415{2_000_000 + i:07d}", call_id=f"call-{i}",
                             campaign_id="bench", origin=Origin.ARI, digit="9", received_at=now)
                for i in range(n)
            ]
            await asyncio.gather(*(journal.append(r) for r in records))
            async with session.create_client("sns", region_name="us-east-1", endpoint_url=endpoint,
                                             config=CONFIG) as sns:
                topic = (await sns.create_topic(Name=f"outbox-{tag}"))["TopicArn"]
            async with SnsPublisher(journal=journal, topic_arn=topic, region="us-east-1",
                                    endpoint_url=endpoint) as publisher:
                started = time.perf_counter()
                published = await publisher.publish_pending()
                elapsed = time.perf_counter() - started
    print(f"outbox     {published}/{n} journaled opt-outs published with PublishBatch (10 per call, 4 calls "
          f"in parallel) to moto: {published / elapsed:,.0f} opt-outs/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sqs", type=int, default=500)
    parser.add_argument("--outbox", type=int, default=3000)
    parser.add_argument("--http-only", action="store_true", help="only the endpoint benchmark")
    args = parser.parse_args()
    bench_http(args.requests, args.concurrency)
    if args.http_only:
        return
    server, endpoint = moto()
    try:
        asyncio.run(bench_sqs(endpoint, args.sqs, pollers=1))
        asyncio.run(bench_sqs(endpoint, args.sqs, pollers=4))
        asyncio.run(bench_moto_ceiling(endpoint, args.sqs))
        asyncio.run(bench_outbox(endpoint, args.outbox))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
