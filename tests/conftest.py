"""Fixtures on the real PostgreSQL and Redis (started by `make test` through tests/services.sh).

Each test gets its own PostgreSQL schema (dropped afterwards) and Redis database 15, flushed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import redis

from agent.cache import RedisCache
from agent.constants import Origin
from agent.journal import Journal
from agent.optout import OptOutRecord
from agent.pipeline import OptOutPipeline
from agent.store import Store
from agent.store_postgres import PostgresStore
from agent.store_sqlite import SqliteStore

PG_BASE = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/optout_test")
REDIS_URL = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")


def with_schema(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for one test; its DSN is `with_schema(PG_BASE, schema)`."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield schema
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_dsn(pg_schema: str) -> str:
    return with_schema(PG_BASE, pg_schema)


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(params=["postgres", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The same tests run against both backends."""
    s: Store
    if request.param == "postgres":
        s = PostgresStore(request.getfixturevalue("pg_dsn"))
    else:
        s = SqliteStore(tmp_path / "store.db")
    async with s:
        await s.migrate()
        yield s


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(pg_dsn) as s:
        await s.migrate()
        yield s


@pytest.fixture
async def cache(redis_url: str) -> AsyncIterator[RedisCache]:
    async with RedisCache(redis_url) as c:
        yield c


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "journal.db") as j:
        yield j


@pytest.fixture
async def pipeline(journal: Journal, pg_store: PostgresStore, cache: RedisCache) -> OptOutPipeline:
    return OptOutPipeline(journal=journal, store=pg_store, cache=cache)


def make_record(number: str = "+972501234567", *, event_id: str | None = None, campaign: str | None = "camp-1",
                origin: Origin = Origin.ARI, call_id: str | None = "call-1") -> OptOutRecord:
    return OptOutRecord(
        event_id=event_id or f"ev-{uuid.uuid4().hex}",
        phone_number=number,
        call_id=call_id,
        campaign_id=campaign,
        contact_id="contact-1",
        origin=origin,
        digit="9",
        pressed_at=datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        received_at=datetime.now(UTC),
    )


# --- Everything the suite logs, as the agent formats it, for tests/test_zz_logs.py to scan -----------------
SUITE_LOG = Path(__file__).resolve().parents[1] / ".run" / "suite-logs.jsonl"


def pytest_configure(config: pytest.Config) -> None:
    import logging

    from agent.logs import JsonFormatter

    if getattr(config, "workerinput", None) is not None:
        return
    SUITE_LOG.parent.mkdir(exist_ok=True)
    SUITE_LOG.write_text("")
    handler = logging.FileHandler(SUITE_LOG, encoding="utf-8")
    handler.setFormatter(JsonFormatter(full_numbers=False))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
