"""Fixtures on the real Asterisk sandbox (`make test` starts it: asterisk-docker/sandbox up).

ARI_URL, ARI_USERNAME, ARI_PASSWORD come from the environment (`make test` sources .run/test.env).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.ari import AriAgent
from agent.errors import TelephonyError
from agent.intake import Intake
from agent.pipeline import OptOutPipeline
from agent.testcall import CallObserver

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class AriEnv:
    url: str
    username: str
    password: str
    app: str


@pytest.fixture(scope="session")
def ari_env() -> AriEnv:
    env = AriEnv(
        url=os.environ.get("ARI_URL", "http://127.0.0.1:8088"),
        username=os.environ.get("ARI_USERNAME", "optout"),
        password=os.environ.get("ARI_PASSWORD", ""),
        app=os.environ.get("ARI_APP", "optout-agent"),
    )
    if not env.password:
        pytest.fail("ARI_PASSWORD is not set: run the suite with `make test` (it starts the Asterisk sandbox)")
    try:
        resp = httpx.get(f"{env.url}/ari/asterisk/info", auth=(env.username, env.password), timeout=3)
    except httpx.HTTPError as exc:
        pytest.fail(f"Asterisk ARI at {env.url} does not answer ({exc}): run `make test`")
    if resp.status_code != 200:
        pytest.fail(f"Asterisk ARI at {env.url} answered HTTP {resp.status_code}: not the sandbox credentials")
    return env


def sandbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "asterisk-docker" / "sandbox"), *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """Redis database 13 for the Asterisk tests, flushed around each (other suites use 15)."""
    import redis

    url = "redis://127.0.0.1:6379/13"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
async def calls(ari_env: AriEnv) -> AsyncIterator[Any]:
    """Calls placed over ARI and followed over AMI (tests/asterisk/test_agi.py: AsteriskCalls)."""
    from tests.asterisk.test_agi import AsteriskCalls

    watch = AsteriskCalls(ari_env)
    await watch.start()
    yield watch
    await watch.close()


@pytest.fixture
async def observer(ari_env: AriEnv) -> AsyncIterator[CallObserver]:
    obs = CallObserver(ari_url=ari_env.url, username=ari_env.username, password=ari_env.password,
                       connect_timeout=5.0)
    try:
        await obs.open()
    except TelephonyError:  # the same stuck-websocket case as in wait_connected
        await asyncio.to_thread(restart_sandbox)
        await obs.open()
    try:
        yield obs
    finally:
        await quiet(ari_env)
        await obs.close()


async def wait_connected(agent: AriAgent, within: float = 10.0) -> None:
    """Until the agent's websocket is up. Asterisk 22.10.1 has been seen to leave an app name stuck after a
    websocket died while it was writing events ("Replacing Stasis app" then a connect that hangs, until
    Asterisk restarts): then the sandbox is restarted once, as an operator would."""
    for attempt in range(2):
        deadline = asyncio.get_running_loop().time() + within / 2
        while not agent.connected:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        if agent.connected:
            return
        if attempt == 0:
            restarted = await asyncio.to_thread(restart_sandbox)
            assert restarted.returncode == 0, restarted.stderr
    pytest.fail("the ARI agent did not connect, even after Asterisk restarted")


def restart_sandbox() -> subprocess.CompletedProcess[str]:
    sandbox("down")
    return sandbox("up")


async def quiet(ari_env: AriEnv, within: float = 10.0) -> None:
    """Wait until Asterisk has no channels left, so no websocket closes while events are being written."""
    async with httpx.AsyncClient(auth=(ari_env.username, ari_env.password)) as client:
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            try:
                if not (await client.get(f"{ari_env.url}/ari/channels", timeout=2)).json():
                    return
            except (httpx.HTTPError, ValueError):
                return
            await asyncio.sleep(0.1)


@pytest.fixture
async def intake(pipeline: OptOutPipeline) -> AsyncIterator[Intake]:
    """One intake per test, shared by every way in the test runs (as in the agent)."""
    taken = Intake(pipeline=pipeline, digit="9", region="IL")
    yield taken
    await taken.drain(within=5.0)


@contextlib.asynccontextmanager
async def serving_ari(ari_env: AriEnv, intake: Intake) -> AsyncIterator[AriAgent]:
    """A running ARI agent on the sandbox; on the way out its presses are drained and the sandbox is quiet."""
    async with AriAgent(url=ari_env.url, username=ari_env.username, password=ari_env.password, app=ari_env.app,
                        intake=intake) as agent:
        task = asyncio.create_task(agent.run(), name="ari-listener")
        await wait_connected(agent)
        try:
            yield agent
        finally:
            await intake.drain(within=5.0)
            await quiet(ari_env)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def ari_agent(ari_env: AriEnv, intake: Intake) -> AsyncIterator[AriAgent]:
    """A running ARI agent on the sandbox, storing into real PostgreSQL + Redis."""
    async with serving_ari(ari_env, intake) as agent:
        yield agent


async def eventually(probe, *, within: float = 5.0, every: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll an async probe until it returns something truthy (or fail after `within` seconds)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(every)
