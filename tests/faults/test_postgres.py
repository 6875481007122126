"""PostgreSQL failing under a running agent, reached through a TcpProxy in its DATABASE_URL.

Scenario 1, test_postgres_outage: 300 SIP calls pressing 9, at most 30 up at once, their starts spread over
36 s; 8 s in, the proxy drops every connection and refuses new ones for 20 s, then lets them through again.
Every call must still be hung up by the agent (the hangup never waits for the store); every opt-out must be
in Redis within 1 s of its press (Asterisk's timestamp), outage or not; `optout check` (the CLI, as an
operator runs it, its DATABASE_URL through the cut proxy) must answer BLACKLISTED for every number pressed
over a second before, all through the outage; and once PostgreSQL is back every one of the 300 opt-outs
must be stored exactly once (the ones that met the outage come from the journal, through the replayer).

Scenario 8, test_second_writer_without_redis: the agent runs with its Redis; another writer (`optout add`,
as a person or a script would, with a REDIS_URL that does not answer) stores numbers in PostgreSQL. Each
must reach the agent's Redis within 2 s (the agent's cache keeper follows the store's change feed), and
`optout check` right after each add, against the agent's Redis, must never say "clear".

Scenario 7, test_slow_postgres: the proxy holds every chunk 1 s each way, so every round trip (a statement)
takes about 2 s and a store transaction several. 60 calls, 30 up at once: the figure line reports
press->hangup p50/p99, which must not depend on the store; every opt-out is stored in the end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime

import psycopg
import redis.asyncio as aioredis

from agent.constants import BLACKLIST_SET
from agent.testcall import CallObserver, CallResult
from tests.conftest import PG_BASE
from tests.faults.conftest import AgentFactory
from tests.faults.harness import (
    REPO,
    AgentProcess,
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


def optout_check(agent: AgentProcess, numbers_: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`optout check` as an operator runs it, with the agent's settings (and `env` on top)."""
    return subprocess.run([sys.executable, "-m", "agent.cli", "check", *numbers_], env={**agent.env, **env},
                          cwd=REPO, capture_output=True, text=True, timeout=60)


async def watch_visibility(redis_url: str, calls: list[CallResult], seen: dict[str, float],
                           stop: asyncio.Event) -> None:
    """When each pressed number first shows in Redis (wall clock, the machine Asterisk shares)."""
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        while not stop.is_set():
            waiting = [c.number for c in list(calls) if c.pressed_at is not None and c.number not in seen]
            if waiting:
                now = time.time()
                for number, member in zip(waiting, await client.smismember(BLACKLIST_SET, waiting), strict=True):
                    if member:
                        seen[number] = now
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def check_through_outage(agent: AgentProcess, calls: list[CallResult], cut: asyncio.Event,
                               stop: asyncio.Event, tally: dict[str, int]) -> None:
    """While PostgreSQL is cut: `optout check` every number pressed over a second before, over and over."""
    while not stop.is_set():
        if cut.is_set():
            now = datetime.now(UTC)
            due = [c.number for c in list(calls) if c.pressed_at is not None
                   and (now - c.pressed_at).total_seconds() > 1.0]
            if due:
                out = await asyncio.to_thread(optout_check, agent, due[-40:])
                tally["rounds"] += 1
                tally["numbers"] += len(due[-40:])
                lines = out.stdout.splitlines()
                tally["not_blacklisted"] += sum(not line.endswith("BLACKLISTED") for line in lines)
                tally["not_blacklisted"] += max(0, len(due[-40:]) - len(lines))  # no answer is no "blacklisted"
                if out.returncode != 1:
                    tally["bad_exit"] += 1
        await asyncio.sleep(1.0)


async def test_postgres_outage(
    make_agent: AgentFactory, pg_proxy: TcpProxy, pg_dsn: str, redis_server: RedisServer,
    observer: CallObserver, campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    calls: list[CallResult] = []
    seen: dict[str, float] = {}
    tally = {"rounds": 0, "numbers": 0, "not_blacklisted": 0, "bad_exit": 0}
    stop, cut = asyncio.Event(), asyncio.Event()
    watchers = [asyncio.create_task(watch_visibility(redis_server.url, calls, seen, stop)),
                asyncio.create_task(check_through_outage(agent, calls, cut, stop, tally))]
    try:
        async with asyncio.timeout(240):
            load = asyncio.create_task(place_calls(observer, numbers(300), campaign=campaign, concurrency=30,
                                                   over=36.0, on_placed=calls.append))
            await asyncio.sleep(8.0)
            pg_proxy.cut()
            cut.set()
            cut_at = datetime.now(UTC)
            await asyncio.sleep(OUTAGE_SECONDS)
            pg_proxy.restore()
            cut.clear()
            restored_at, restored = datetime.now(UTC), time.monotonic()
            calls = await load
            expected = {c.number for c in calls if c.pressed_at is not None}
            got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=90.0)
            back_after = time.monotonic() - restored
        stop.set()
        await asyncio.gather(*watchers)
        during = sum(c.pressed_at is not None and cut_at <= c.pressed_at <= restored_at for c in calls)
        to_redis = sorted(seen[c.number] - c.pressed_at.timestamp() for c in calls
                          if c.pressed_at is not None and c.number in seen)
        journal = journal_counts(agent.journal_path)
        figures = Figures("1 postgres-outage", calls, expected, got,
                          f"PostgreSQL cut {OUTAGE_SECONDS:.0f}s with {during} presses inside; press->Redis "
                          f"max {max(to_redis) * 1000:.0f}ms for {len(to_redis)} numbers; `optout check` "
                          f"{tally['rounds']} rounds in the outage, {tally['numbers']} numbers, not blacklisted "
                          f"{tally['not_blacklisted']}; all stored {back_after:.1f}s after it came back; "
                          f"journal unstored={journal['unstored']}")
        figures.report()
        assert len(calls) == 300
        assert during > 0, "the outage did not overlap the presses"
        assert figures.pressed == 300, "some test calls never pressed 9 (Asterisk side)"
        assert figures.hung_up == 300, [c.call_id for c in calls if not agent_hung_up(c)]
        assert figures.lost == 0, sorted(expected - got.numbers)
        assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
        assert got.in_redis == expected, sorted(expected - got.in_redis)
        assert len(to_redis) == len(expected) and max(to_redis) <= 1.0, f"press -> Redis up to {max(to_redis)}s"
        assert tally["rounds"] >= 5, "optout check did not run through the outage"
        assert tally["not_blacklisted"] == 0 and tally["bad_exit"] == 0, tally
    finally:
        stop.set()
        await asyncio.gather(*watchers, return_exceptions=True)
        await end_leftovers(observer, calls)


async def test_second_writer_without_redis(
    make_agent: AgentFactory, pg_dsn: str, redis_server: RedisServer,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    # Same store as the agent; a Redis that does not answer; a journal of its own.
    writer_env = {"REDIS_URL": "redis://127.0.0.1:1/0", "OPTOUT_JOURNAL_PATH": f"{agent.journal_path}.writer"}
    client: aioredis.Redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    waits: list[float] = []
    unsafe = 0
    try:
        for n in numbers(10, first=2_000_000):
            added = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent.cli", "add", n],
                                            env={**agent.env, **writer_env}, cwd=REPO, capture_output=True,
                                            text=True, timeout=60)
            assert added.returncode == 0, added.stderr
            done = time.monotonic()
            check = asyncio.create_task(asyncio.to_thread(optout_check, agent, [n]))
            while not await client.sismember(BLACKLIST_SET, n) and time.monotonic() - done < 10:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            waits.append(time.monotonic() - done)
            unsafe += (await check).returncode != 1
    finally:
        await client.aclose()
    line = (f"[8 second-writer] numbers=10 stored=10 in agent's Redis within max {max(waits):.2f}s "
            f"(p50 {sorted(waits)[5]:.2f}s) of the writer's exit; `optout check` right after: not blacklisted={unsafe}")
    from tests.faults.harness import FIGURES

    FIGURES.append(line)
    print(line)
    assert max(waits) <= 2.0, waits
    assert unsafe == 0


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
