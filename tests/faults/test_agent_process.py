"""The agent process itself dying or told to stop in the middle of the work.

Scenario 3, test_sigkill_mid_run: 120 SIP calls, at most 30 up at once, starts spread over 14 s. Once 45
presses have been seen the agent gets SIGKILL (no shutdown code runs) and is started again at once with
the same journal. Every opt-out whose call the agent hung up must be stored after the restart (journal
replay), once. Presses that reach Asterisk while no agent is connected are not seen by anyone (Asterisk
does not replay ARI events); those calls end when the caller hangs up, and the figure line counts them.
Every call pressed while an agent was connected must have been hung up by it.

Scenario 6, test_sigterm_during_burst: 40 SIP calls placed within 3 s (a burst of presses); PostgreSQL is slowed
(1 s per chunk each way) so store transactions are still running when, after 15 presses, the agent gets
SIGTERM. It must exit 0; every call it hung up must be in PostgreSQL or in its journal at exit (in-flight
opt-outs finish or stay journaled), every call pressed before the signal must have been hung up by it, no
call may be left up, and a restart must store the rest. Presses that arrive after the signal find the
ARI socket closed (the agent stops taking events first); the figure line counts those calls, which end
when the caller hangs up.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from agent.testcall import CallObserver, CallResult
from tests.faults.conftest import AgentFactory
from tests.faults.harness import (
    Figures,
    RedisServer,
    agent_hung_up,
    end_leftovers,
    journal_numbers,
    numbers,
    place_calls,
    start_agent,
    stored,
    wait_for_presses,
    wait_stored,
)
from tests.tcp_proxy import TcpProxy


def drop_connections_of_dead_agent(proxy: TcpProxy) -> None:
    """What the kernel does for an exited process: its sockets close and PostgreSQL ends its sessions.

    The proxy does not pass a close on by itself; a session left open would keep its transaction's row
    locks, and the restarted agent (it sets no lock or statement timeout) would wait on them indefinitely.
    """
    proxy.cut()
    proxy.restore()


def pressed_between(call: CallResult, start: datetime, end: datetime) -> bool:
    return call.pressed_at is not None and start <= call.pressed_at <= end


async def test_sigkill_mid_run(
    make_agent: AgentFactory, pg_dsn: str, pg_proxy: TcpProxy, redis_server: RedisServer, observer: CallObserver,
    campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    placed: list[CallResult] = []
    calls: list[CallResult] = []
    try:
        async with asyncio.timeout(180):
            load = asyncio.create_task(place_calls(observer, numbers(120), campaign=campaign, concurrency=30,
                                                   over=14.0, on_placed=placed.append))
            assert await wait_for_presses(placed, 45, within=60.0), "the calls did not press"
            agent.kill()
            killed_at = datetime.now(UTC)
            down = time.monotonic()
            drop_connections_of_dead_agent(pg_proxy)
            await agent.start()
            back_at, down_for = datetime.now(UTC), time.monotonic() - down
            calls = await load
            expected = {c.number for c in calls if agent_hung_up(c)}
            got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=60.0)
        unseen = [c for c in calls if pressed_between(c, killed_at, back_at)]
        # A press in the last moments before the kill may have been read and not acted on: not an agent fault.
        while_up = [c for c in calls if c.pressed_at is not None and not pressed_between(
            c, killed_at - timedelta(milliseconds=500), back_at)]
        figures = Figures("3 agent-sigkill", calls, expected, got,
                          f"down {down_for:.1f}s; {len(unseen)} presses while no agent was connected "
                          f"(ended by the caller); {sum(c.pressed_at is None for c in calls)} calls met no agent "
                          "(Stasis failed, no press)")
        figures.report()
        assert [c.call_id for c in while_up if not agent_hung_up(c)] == []
        lost = [(c.number, c.pressed_at, c.hangup_requested_at) for c in calls if c.number in expected - got.numbers]
        assert figures.lost == 0, f"hung up but not stored (number, press, hangup; killed at {killed_at}): {lost}"
        assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
        assert expected <= got.in_redis, sorted(expected - got.in_redis)
        # The journal is written before the hangup, so a press journaled just before the kill is stored even
        # though its call was ended by the caller: more may be stored than hung up, never an unpressed number.
        assert got.in_redis <= {c.number for c in calls if c.pressed_at is not None}
        assert all(c.done.is_set() for c in calls), "calls left up"
    finally:
        await end_leftovers(observer, calls or placed)


async def test_sigterm_during_burst(
    make_agent: AgentFactory, pg_dsn: str, pg_proxy: TcpProxy, redis_server: RedisServer, observer: CallObserver,
    campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    placed: list[CallResult] = []
    calls: list[CallResult] = []
    try:
        async with asyncio.timeout(180):
            pg_proxy.delay = 1.0
            load = asyncio.create_task(place_calls(observer, numbers(40), campaign=campaign, concurrency=40,
                                                   over=3.0, on_placed=placed.append))
            assert await wait_for_presses(placed, 15, within=60.0), "the calls did not press"
            signalled_at = datetime.now(UTC)
            started = time.monotonic()
            code = await agent.terminate(within=60.0)
            exit_after = time.monotonic() - started
            in_store = (await stored(pg_dsn, None, campaign)).numbers
            in_journal = journal_numbers(agent.journal_path)
            pg_proxy.delay = 0.0
            drop_connections_of_dead_agent(pg_proxy)
            await agent.start()
            calls = await load
            handled = {c.number for c in calls if agent_hung_up(c)}
            got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, handled, within=60.0)
        journaled_only = {n for n, done in in_journal.items() if not done} - in_store
        # A press in the last moments before the signal may still have been on the wire when the socket closed.
        before_signal = [c for c in calls
                         if c.pressed_at is not None and c.pressed_at < signalled_at - timedelta(milliseconds=200)]
        after_signal = [c for c in calls if c.pressed_at is not None and c.pressed_at >= signalled_at]
        figures = Figures("6 agent-sigterm", calls, handled, got,
                          f"exit {code} {exit_after:.1f}s after SIGTERM with {len(in_store & handled)} stored and "
                          f"{len(journaled_only)} still journaled; presses before the signal {len(before_signal)}, "
                          f"after it {len(after_signal)} (of which ended by the caller "
                          f"{sum(not agent_hung_up(c) for c in after_signal)}); restart stored the rest")
        figures.report()
        assert code == 0, agent.log_tail()
        assert handled <= in_store | set(in_journal), f"neither stored nor journaled: {handled - in_store}"
        assert [c.call_id for c in before_signal if not agent_hung_up(c)] == []
        assert figures.lost == 0, sorted(handled - got.numbers)
        assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
        assert got.in_redis == handled, sorted(handled - got.in_redis)
        assert all(c.done.is_set() for c in calls), "calls left up"
    finally:
        pg_proxy.delay = 0.0
        await end_leftovers(observer, calls or placed)
