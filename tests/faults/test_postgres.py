"""PostgreSQL failing under a running agent, reached through a TcpProxy in its DATABASE_URL.

Scenario 1, test_postgres_outage: 300 SIP calls pressing 9, at most 30 up at once, their starts spread over
36 s; 8 s in, the proxy drops every connection and refuses new ones for 20 s, then lets them through again.
Every call must still be hung up by the agent (the hangup never waits for the store), and once PostgreSQL
is back every one of the 300 opt-outs must be stored exactly once (the ones that met the outage come from
the journal, through the replayer) and be in Redis.

Scenario 7, test_slow_postgres: the proxy holds every chunk 1 s each way, so every round trip (a statement)
takes about 2 s and a store transaction several. 60 calls, 30 up at once: the figure line reports
press->hangup p50/p99, which must not depend on the store; every opt-out is stored in the end.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import psycopg

from agent.testcall import CallObserver
from tests.conftest import PG_BASE
from tests.faults.conftest import AgentFactory
from tests.faults.harness import (
    Figures,
    RedisServer,
    agent_hung_up,
    dsn_through,
    end_leftovers,
    journal_counts,
    numbers,
    place_calls,
    start_agent,
    wait_stored,
)
from tests.tcp_proxy import TcpProxy

OUTAGE_SECONDS = 20.0


async def test_postgres_outage(
    make_agent: AgentFactory, pg_proxy: TcpProxy, pg_dsn: str, redis_server: RedisServer,
    observer: CallObserver, campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    calls = []
    try:
        async with asyncio.timeout(240):
            load = asyncio.create_task(place_calls(observer, numbers(300), campaign=campaign, concurrency=30,
                                                   over=36.0))
            await asyncio.sleep(8.0)
            pg_proxy.cut()
            cut_at = datetime.now(UTC)
            await asyncio.sleep(OUTAGE_SECONDS)
            pg_proxy.restore()
            restored_at, restored = datetime.now(UTC), time.monotonic()
            calls = await load
            expected = {c.number for c in calls if c.pressed_at is not None}
            got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=90.0)
            back_after = time.monotonic() - restored
        during = sum(c.pressed_at is not None and cut_at <= c.pressed_at <= restored_at for c in calls)
        journal = journal_counts(agent.journal_path)
        figures = Figures("1 postgres-outage", calls, expected, got,
                          f"PostgreSQL cut {OUTAGE_SECONDS:.0f}s with {during} presses inside; all stored "
                          f"{back_after:.1f}s after it came back; journal unstored={journal['unstored']}")
        figures.report()
        assert len(calls) == 300
        assert during > 0, "the outage did not overlap the presses"
        assert figures.pressed == 300, "some test calls never pressed 9 (Asterisk side)"
        assert figures.hung_up == 300, [c.call_id for c in calls if not agent_hung_up(c)]
        assert figures.lost == 0, sorted(expected - got.numbers)
        assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
        assert got.in_redis == expected, sorted(expected - got.in_redis)
    finally:
        await end_leftovers(observer, calls)


async def statement_seconds(dsn: str) -> float:
    """How long one `SELECT 1` takes over an open connection (through the slowed proxy)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        started = time.monotonic()
        await conn.execute("SELECT 1")
        return time.monotonic() - started


async def test_slow_postgres(
    make_agent: AgentFactory, pg_proxy: TcpProxy, pg_dsn: str, redis_server: RedisServer,
    observer: CallObserver, campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    pg_proxy.delay = 1.0  # per chunk and direction: a round trip takes about 2 s
    calls = []
    try:
        async with asyncio.timeout(240):
            probe = asyncio.create_task(statement_seconds(dsn_through(PG_BASE, pg_proxy.port)))
            calls = await place_calls(observer, numbers(60), campaign=campaign, concurrency=30, over=4.0)
            expected = {c.number for c in calls if c.pressed_at is not None}
            got, waited = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=150.0)
            statement = await probe
        figures = Figures("7 slow-postgres", calls, expected, got,
                          f"SELECT 1 took {statement:.1f}s through the proxy; all stored {waited:.1f}s after "
                          "the last call ended")
        figures.report()
        assert statement >= 1.5, "the proxy did not slow PostgreSQL down"
        assert figures.pressed == 60, "some test calls never pressed 9 (Asterisk side)"
        assert figures.hung_up == 60, [c.call_id for c in calls if not agent_hung_up(c)]
        assert figures.lost == 0, sorted(expected - got.numbers)
        assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
        assert got.in_redis == expected, sorted(expected - got.in_redis)
    finally:
        pg_proxy.delay = 0.0
        await end_leftovers(observer, calls)
