"""Fixtures for the SNS side: signing identities and the certificate host (test_verify), moto in server
mode with a topic and queues, the bridge's HTTP endpoint, the worker's hangup endpoint, and counters
of what the pipeline wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
import redis
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from moto.server import ThreadedMotoServer
from signing import NOW, TOPIC_ARN, CertServer, SigningIdentity, ToLocalServer, make_identity

from agent.journal import Journal
from agent.pipeline import OptOutPipeline
from sns_bridge.handler import BridgeHandler, MessageIdDedupe
from sns_bridge.hangup import WorkerHangup
from sns_bridge.http import BridgeHttp
from sns_bridge.verify import HttpCertificateSource, SnsVerifier, certificate_client


@pytest.fixture(scope="session")
def identity() -> SigningIdentity:
    return make_identity()


@pytest.fixture(scope="session")
def stranger() -> SigningIdentity:
    """A key SNS never used: its signatures must not verify against ``identity``'s certificate."""
    return make_identity()


@pytest_asyncio.fixture
async def cert_server(identity: SigningIdentity) -> AsyncIterator[CertServer]:
    server = CertServer(identity.cert_pem)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def transport(cert_server: CertServer) -> AsyncIterator[ToLocalServer]:
    transport = ToLocalServer(cert_server.base_url)
    yield transport
    await transport.aclose()


@pytest_asyncio.fixture
async def http_client(transport: ToLocalServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


@pytest_asyncio.fixture
async def certificates(http_client: httpx.AsyncClient) -> AsyncIterator[HttpCertificateSource]:
    async with HttpCertificateSource(http_client) as source:
        yield source


@pytest.fixture
def verifier(certificates: HttpCertificateSource) -> SnsVerifier:
    return SnsVerifier(allowed_topic_arns=frozenset({TOPIC_ARN}), certificates=certificates, clock=lambda: NOW)


# --- the bridge: shared by the endpoint, poller, Lambda and publisher tests ---------------------




AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_SESSION_TOKEN": "testing"}
EVENT = {
    "callId": "call-123", "campaignId": "campaign-456", "contactId": "contact-789",
    "phoneNumber": "+972501234567", "dtmfInput": "9", "timestamp": "2024-01-15T10:30:00Z",
}
FILTER_POLICY = {"origin": [{"anything-but": "optout-agent"}]}


def event_json(**overrides: Any) -> str:
    return json.dumps({**EVENT, **overrides})


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials for the whole session (moto accepts anything; real AWS must never be reached)."""
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def moto_url(aws_env: None) -> Iterator[str]:
    """moto in server mode on a free port of 127.0.0.1 (tests use their own topic and queue names)."""
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


AWS_CONFIG = AioConfig(connect_timeout=1.0, read_timeout=5.0, retries={"mode": "standard", "max_attempts": 2})


@pytest_asyncio.fixture
async def sns(moto_url: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "sns", region_name="us-east-1", endpoint_url=moto_url, config=AWS_CONFIG
    ) as client:
        yield client


@pytest_asyncio.fixture
async def sqs(moto_url: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=moto_url, config=AWS_CONFIG
    ) as client:
        yield client


@dataclass
class Wiring:
    topic_arn: str
    queue_url: str
    """The bridge's queue: subscribed with the filter policy."""
    audit_url: str
    """An unfiltered raw-delivery queue: sees everything published."""


async def make_queue(sqs: Any, name: str, **attributes: str) -> tuple[str, str]:
    url = (await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    arn = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    return url, arn


@pytest_asyncio.fixture
async def wiring(sns: Any, sqs: Any) -> Wiring:
    """A fresh topic, the bridge's queue (envelope, filter policy) and an unfiltered raw audit queue."""
    tag = uuid.uuid4().hex[:10]
    topic_arn = (await sns.create_topic(Name=f"optout-events-{tag}"))["TopicArn"]
    queue_url, queue_arn = await make_queue(sqs, f"bridge-{tag}")
    audit_url, audit_arn = await make_queue(sqs, f"audit-{tag}")
    await sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
                        Attributes={"FilterPolicy": json.dumps(FILTER_POLICY)})
    await sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=audit_arn,
                        Attributes={"RawMessageDelivery": "true"})
    return Wiring(topic_arn, queue_url, audit_url)


async def drain_queue(sqs: Any, url: str, *, rounds: int = 3) -> list[dict[str, Any]]:
    """Every message currently in a queue (received and deleted)."""
    got: list[dict[str, Any]] = []
    empty = 0
    while empty < rounds:
        batch = (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                           MessageAttributeNames=["All"])).get("Messages", [])
        if not batch:
            empty += 1
            continue
        got.extend(batch)
        await sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
        )
    return got


# --- what was written ----------------------------------------------------------------------------


@dataclass
class Written:
    actions: int
    blacklisted: int
    redis_keys: int
    journal_rows: int


@pytest.fixture
def written(pg_dsn: str, redis_sync: redis.Redis, tmp_path: Path) -> Any:
    """Counts what the opt-out pipeline has written: audit rows, blacklist rows, Redis keys, journal rows."""

    def count() -> Written:
        with psycopg.connect(pg_dsn) as conn:
            actions = conn.execute("SELECT count(*) FROM optout_actions").fetchone()
            listed = conn.execute("SELECT count(*) FROM blacklist").fetchone()
        journal_path = tmp_path / "journal.db"
        rows = 0
        if journal_path.exists():
            with contextlib.closing(sqlite3.connect(journal_path)) as db:
                rows = db.execute("SELECT count(*) FROM journal").fetchone()[0]
        assert actions is not None and listed is not None
        return Written(actions[0], listed[0], int(redis_sync.dbsize()), rows)

    return count


# --- the worker's hangup endpoint (a seam we own) -------------------------------------------


class WorkerServer:
    """Stands in for the agent's `POST /calls/{callId}/hangup`; records (path, Authorization)."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.requests: list[tuple[str, str | None]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/calls/{call_id}/hangup", self._hangup)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hangup(self, request: web.Request) -> web.Response:
        self.requests.append((request.raw_path, request.headers.get("Authorization")))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"error": "nope"}, status=self.status)
        return web.json_response({"hungUp": True, "callId": request.match_info["call_id"]})


@pytest_asyncio.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    server = WorkerServer()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def worker_hangup(worker: WorkerServer) -> AsyncIterator[WorkerHangup]:
    async with httpx.AsyncClient() as client:
        yield WorkerHangup(base_url=worker.url, token="worker-secret", client=client)


@pytest.fixture
def bridge_handler(pipeline: OptOutPipeline, cache: Any, worker_hangup: WorkerHangup) -> BridgeHandler:
    return BridgeHandler(pipeline=pipeline, region="US", dedupe=MessageIdDedupe(redis=cache.client),
                         worker=worker_hangup)


# --- the HTTP endpoint -------------------------------------------------------------------------

MAX_BODY = 16 * 1024


@dataclass
class Endpoint:
    url: str
    client: httpx.AsyncClient
    journal: Journal

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return await self.client.post(self.url, content=content,
                                      headers={"Content-Type": "text/plain; charset=UTF-8", **(headers or {})})


async def open_endpoint(handler: BridgeHandler, transport: ToLocalServer, journal: Journal) -> AsyncIterator[Endpoint]:
    async with certificate_client(transport=transport) as sns_client, HttpCertificateSource(sns_client) as certs:
        verifier = SnsVerifier(allowed_topic_arns=frozenset({TOPIC_ARN}), certificates=certs, clock=lambda: NOW,
                               max_age=timedelta(hours=1))
        async with BridgeHttp(handler=handler, verifier=verifier, client=sns_client, host="127.0.0.1", port=0,
                              max_body_bytes=MAX_BODY) as http, httpx.AsyncClient() as client:
            yield Endpoint(f"http://127.0.0.1:{http.bound_port}/sns", client, journal)


@pytest_asyncio.fixture
async def endpoint(
    bridge_handler: BridgeHandler, transport: ToLocalServer, journal: Journal
) -> AsyncIterator[Endpoint]:
    async for ep in open_endpoint(bridge_handler, transport, journal):
        yield ep
