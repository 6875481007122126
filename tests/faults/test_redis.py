"""Scenario 2: Redis killed and restarted empty while opt-outs come in and dialers keep asking.

The agent and the test share one redis-server of the test's own (never the shared one). 120 SIP calls
pressing 9, at most 30 up at once, starts spread over 16 s. Meanwhile the test runs pre-dial checks the way a
dialer's process would (agent.lookup.BlacklistChecker on the same PostgreSQL schema and Redis), over and
over, on every number PostgreSQL already held a moment before the check. 6 s in, redis-server is
SIGKILLed; 2 s later a new, empty one starts on the same port. No check may answer "clear" for one of those
numbers at any time (Redis up, down, empty, being rebuilt); the agent's reconciler must rebuild the set
(the `blacklist:synced` marker comes back) and in the end every number is in it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import psycopg

from agent.cache import RedisCache
from agent.lookup import BlacklistChecker
from agent.store_postgres import PostgresStore
from agent.testcall import CallObserver
from tests.faults.conftest import AgentFactory
from tests.faults.harness import (
    Figures,
    RedisServer,
    agent_hung_up,
    end_leftovers,
    eventually,
    numbers,
    place_calls,
    redis_synced,
    start_agent,
    wait_stored,
)

SETTLE = 0.2
"""A number counts as "already stored" once PostgreSQL has held it this long: the agent writes Redis right
after the store's commit, and a check landing inside those milliseconds is not an outage."""


@dataclass
class Checks:
    rounds: int = 0
    numbers_checked: int = 0
    in_gap: int = 0
    """Rounds while Redis was down, empty or being rebuilt."""
    clear_for_stored: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


async def keep_checking(checker: BlacklistChecker, pg_dsn: str, stop: asyncio.Event, gap: asyncio.Event,
                        tally: Checks) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute("SELECT phone_number FROM blacklist")
            known = [str(r[0]) for r in await cur.fetchall()]
            await asyncio.sleep(SETTLE)
            if not known:
                continue
            try:
                answers = await checker.check(known)
            except Exception as exc:  # a check that fails is not "clear"; count it and go on
                tally.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            tally.rounds += 1
            tally.numbers_checked += len(known)
            tally.in_gap += gap.is_set()
            tally.clear_for_stored.update(n for n, listed in zip(known, answers, strict=True) if not listed)


async def test_redis_restarted_empty(
    make_agent: AgentFactory, pg_dsn: str, redis_server: RedisServer, observer: CallObserver, campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    assert await eventually(lambda: redis_synced(redis_server.url), within=15.0), "Redis never marked synced"
    calls = []
    tally, stop, gap = Checks(), asyncio.Event(), asyncio.Event()
    try:
        async with asyncio.timeout(180), PostgresStore(pg_dsn) as store, RedisCache(redis_server.url) as cache:
            checker = BlacklistChecker(store=store, cache=cache, journal=None, region="IL")
            watcher = asyncio.create_task(keep_checking(checker, pg_dsn, stop, gap, tally))
            load = asyncio.create_task(place_calls(observer, numbers(120), campaign=campaign, concurrency=30,
                                                   over=16.0))
            await asyncio.sleep(6.0)
            gap.set()
            redis_server.kill()
            await asyncio.sleep(2.0)
            await redis_server.start()  # same port, empty
            restarted = time.monotonic()
            rebuilt = await eventually(lambda: redis_synced(redis_server.url), within=60.0, every=0.05)
            rebuilt_after = time.monotonic() - restarted
            gap.clear()
            calls = await load
            expected = {c.number for c in calls if c.pressed_at is not None}
            got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=60.0)
            await asyncio.sleep(1.0)  # a few more checks with everything settled
            stop.set()
            await watcher
        figures = Figures(
            "2 redis-restart", calls, expected, got,
            f"Redis down 2.0s then empty; marker back {rebuilt_after:.1f}s after restart; pre-dial checks "
            f"{tally.rounds} rounds ({tally.in_gap} in the gap), {tally.numbers_checked} numbers, "
            f"clear-for-stored={len(tally.clear_for_stored)}, failed={len(tally.errors)}")
        figures.report()
        assert rebuilt, "the agent never rebuilt Redis (no blacklist:synced marker)"
        assert tally.in_gap > 0, "no pre-dial check ran while Redis was down or empty"
        assert not tally.clear_for_stored, f"'clear' for stored numbers: {sorted(tally.clear_for_stored)}"
        assert figures.pressed == 120, "some test calls never pressed 9 (Asterisk side)"
        assert figures.hung_up == 120, [c.call_id for c in calls if not agent_hung_up(c)]
        assert figures.lost == 0, sorted(expected - got.numbers)
        assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
        assert got.in_redis == expected, f"not back in the set: {sorted(expected - got.in_redis)}"
    finally:
        stop.set()
        await end_leftovers(observer, calls)
