"""Scenario 4: Asterisk restarted under a running agent (asterisk-docker/sandbox down, then up).

20 SIP calls pressing 9 first; then the sandbox goes down (the agent's /ready must turn false) and up
again. From the moment ARI answers 200 again, the test polls the agent's /ready every 20 ms and prints how
long the agent took to be ready again (the target is 2 s; the figure is printed, not asserted: speed
belongs to the benchmarks). The agent must reconnect, and 30 calls placed after that must all be hung up
by it and stored. This restarts the shared sandbox: nothing else may be using it meanwhile.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable

import httpx

from agent.testcall import CallObserver, CallResult
from tests.faults.conftest import AgentFactory, AriCredentials
from tests.faults.harness import (
    REPO,
    AgentProcess,
    Figures,
    RedisServer,
    agent_hung_up,
    end_leftovers,
    numbers,
    place_calls,
    start_agent,
    wait_stored,
)

READY_TARGET_SECONDS = 2.0


def sandbox(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "asterisk-docker" / "sandbox"), command], capture_output=True, text=True,
                          timeout=120, check=False)


async def ari_answers(client: httpx.AsyncClient, ari: AriCredentials) -> bool:
    try:
        resp = await client.get(f"{ari.url}/ari/asterisk/info", auth=(ari.username, ari.password), timeout=0.5)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


async def moment_when(probe: Callable[[], Awaitable[bool]], *, within: float, every: float = 0.02) -> float | None:
    """time.monotonic() of the first poll at which `probe()` is true, or None after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await probe():
            return time.monotonic()
        await asyncio.sleep(every)
    return None


async def restart_asterisk(agent: AgentProcess, ari: AriCredentials) -> tuple[float | None, float | None]:
    """Sandbox down, then up; returns (seconds until ARI answered again, agent ready seconds after that)."""
    async with httpx.AsyncClient() as client:
        down = await asyncio.to_thread(sandbox, "down")
        assert down.returncode == 0, down.stderr
        went_down = time.monotonic()

        async def not_ready() -> bool:
            return not await agent.ready(client)

        assert await moment_when(not_ready, within=5.0) is not None, "the agent still said ready with Asterisk down"
        up = asyncio.create_task(asyncio.to_thread(sandbox, "up"))
        answered = await moment_when(lambda: ari_answers(client, ari), within=90.0)
        ready = await moment_when(lambda: agent.ready(client), within=30.0)
        started = await up
        assert started.returncode == 0, started.stderr
    if answered is None:
        return None, None
    return answered - went_down, (ready - answered) if ready is not None else None


async def test_asterisk_restart(
    make_agent: AgentFactory, pg_dsn: str, redis_server: RedisServer, ari: AriCredentials, campaign: str,
) -> None:
    agent = make_agent()
    await start_agent(agent, pg_dsn)
    before: list[CallResult] = []
    after: list[CallResult] = []
    async with asyncio.timeout(240):
        async with CallObserver(ari_url=ari.url, username=ari.username, password=ari.password) as obs:
            before = await place_calls(obs, numbers(20), campaign=campaign, concurrency=20, over=2.0)
            await end_leftovers(obs, before)
        down_for, ready_after = await restart_asterisk(agent, ari)
        assert down_for is not None, "Asterisk did not answer again"
        assert ready_after is not None, f"the agent did not reconnect to Asterisk:\n{agent.log_tail()}"
        async with CallObserver(ari_url=ari.url, username=ari.username, password=ari.password) as obs:
            try:
                after = await place_calls(obs, numbers(30, first=2_000_000), campaign=campaign, concurrency=30,
                                          over=2.0)
            finally:
                await end_leftovers(obs, after)
        calls = before + after
        expected = {c.number for c in calls if c.pressed_at is not None}
        got, _ = await wait_stored(pg_dsn, redis_server.url, campaign, expected, within=60.0)
    verdict = "within" if ready_after <= READY_TARGET_SECONDS else "OVER"
    figures = Figures("4 asterisk-restart", calls, expected, got,
                      f"Asterisk answered {down_for:.1f}s after going down; agent /ready {ready_after:.2f}s later "
                      f"({verdict} the {READY_TARGET_SECONDS:.0f}s target); 20 calls before, 30 after")
    figures.report()
    assert figures.pressed == 50, "some test calls never pressed 9 (Asterisk side)"
    assert figures.hung_up == 50, [c.call_id for c in calls if not agent_hung_up(c)]
    assert figures.lost == 0, sorted(expected - got.numbers)
    assert got.duplicated == 0, {n: k for n, k in got.rows.items() if k > 1}
    assert got.in_redis == expected, sorted(expected - got.in_redis)
