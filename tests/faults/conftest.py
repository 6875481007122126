"""Fault injection: the agent as a real process (`python -m agent`) on real PostgreSQL, Redis, Asterisk and an
SNS emulator, while one of them fails. Opt-outs come from real SIP test calls into the ARI IVR pressing 9.

Run with `make faults` (it sources .run/test.env for ARI_* and sets OPTOUT_FAULTS=1); without
OPTOUT_FAULTS=1 every test here is skipped, so a plain `pytest` of tests/ does not run them. They need the
Asterisk sandbox, PostgreSQL and `redis-server` on PATH, and take the `optout-agent` ARI app (one websocket
at a time): do not run them next to another agent on the same sandbox. Scenario 4 restarts the sandbox.

Each scenario gets its own PostgreSQL schema (the agent reaches it through a TcpProxy), its own
redis-server on a free port, its own journal and HTTP port, and prints one figure line: calls, opt-outs
pressed, hung up by the agent, stored, in Redis, lost, duplicated, press->hangup p50/p99 from Asterisk's
own timestamps. The lines are repeated in the terminal summary. No assertion is about speed: the time
limits in the tests only stop a scenario that hangs. The agent runs with its ARI intake only
(AGI_ENABLED=false, no AMI_*): every scenario drives the ARI path.

  1. test_postgres.py::test_postgres_outage: 300 calls, 30 up at once, PostgreSQL cut off for 20 s mid-run.
  2. test_redis.py::test_redis_restarted_empty: Redis killed and restarted empty mid-run; pre-dial checks
     never say "clear" for a stored number; the agent's reconciler refills the set.
  3. test_agent_process.py::test_sigkill_mid_run: the agent SIGKILLed mid-run and restarted (journal replay).
  4. test_asterisk.py::test_asterisk_restart: the sandbox restarted; /ready again after Asterisk answers.
  5. test_sns.py::test_sns_unreachable_for_30s: SNS (moto, server mode) unreachable for 30 s while publishing.
  6. test_agent_process.py::test_sigterm_during_burst: SIGTERM while a burst of presses arrives.
  7. test_postgres.py::test_slow_postgres: every PostgreSQL round trip takes about 2 s.

Each module's docstring says what its scenario does and asserts. FAULTS_AGENT_LOG_LEVEL=INFO makes the
agent log more (its log is agent.log in the test's tmp_path).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import TelephonyError
from agent.testcall import CallObserver
from tests.conftest import PG_BASE
from tests.faults.harness import FIGURES, AgentProcess, RedisServer, dsn_through, host_port
from tests.tcp_proxy import TcpProxy

HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("OPTOUT_FAULTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="fault-injection suite: run it with `make faults` (OPTOUT_FAULTS=1)")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in sorted(FIGURES):  # by scenario number
            terminalreporter.write_line(line)


class AriCredentials:
    def __init__(self) -> None:
        self.url = os.environ.get("ARI_URL", "http://127.0.0.1:8088")
        self.username = os.environ.get("ARI_USERNAME", "optout")
        self.password = os.environ.get("ARI_PASSWORD", "")

    def answers(self, timeout: float = 3.0) -> int | None:
        """HTTP status of GET /ari/asterisk/info, None when nothing answers."""
        try:
            resp = httpx.get(f"{self.url}/ari/asterisk/info", auth=(self.username, self.password), timeout=timeout)
        except httpx.HTTPError:
            return None
        return resp.status_code


@pytest.fixture(scope="session")
def ari() -> AriCredentials:
    creds = AriCredentials()
    if not creds.password:
        pytest.fail("ARI_PASSWORD is not set: run `make faults` (it sources .run/test.env)")
    status = creds.answers()
    if status != 200:
        pytest.fail(f"Asterisk ARI at {creds.url} answered {status}: start the sandbox (`make asterisk`)")
    return creds


@pytest.fixture
def campaign() -> str:
    return f"faults-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    """A TcpProxy in front of the real PostgreSQL: the agent's DATABASE_URL goes through it."""
    proxy = await TcpProxy(*host_port(PG_BASE, 5432)).start()
    yield proxy
    await stop_proxy(proxy)


async def stop_proxy(proxy: TcpProxy) -> None:
    """Stop a TcpProxy and let its connection handlers see their sockets go (stop() does not wait for them;
    handlers still pending when the test's loop closes are logged as errors)."""
    await proxy.stop()
    await asyncio.sleep(0.2)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this scenario's own (never the shared one: it is killed and restarted)."""
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    server.kill()


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
async def make_agent(
    pg_schema: str, pg_proxy: TcpProxy, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[AgentFactory]:
    """Builds the agent process: PostgreSQL through `pg_proxy`, this scenario's Redis, a journal in tmp_path.

    Extra keyword arguments are environment variables (e.g. OPTOUT_EVENTS_TOPIC_ARN=...). Every agent built
    here is stopped at teardown, before the schema is dropped.
    """
    agents: list[AgentProcess] = []
    dsn = dsn_through(PG_BASE, pg_proxy.port)
    sep = "&" if "?" in dsn else "?"

    def build(**env: str) -> AgentProcess:
        agent = AgentProcess({
            "DATABASE_URL": f"{dsn}{sep}options=-csearch_path%3D{pg_schema}",
            "REDIS_URL": redis_server.url,
            "OPTOUT_JOURNAL_PATH": str(tmp_path / "journal.db"),
            **env,
        }, tmp_path / "agent.log")
        agents.append(agent)
        return agent

    yield build
    for agent in agents:
        await agent.stop()


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
async def observer(ari: AriCredentials) -> AsyncIterator[CallObserver]:
    obs = CallObserver(ari_url=ari.url, username=ari.username, password=ari.password)
    try:
        await obs.open()
    except TelephonyError:
        # Seen on Asterisk 22.10.1 after the restart scenario: the ARI websocket upgrade hangs for every new
        # app until Asterisk is restarted. The scenarios test the agent, so the sandbox is restarted once.
        await asyncio.to_thread(restart_sandbox)
        await obs.open()
    try:
        yield obs
    finally:
        await obs.close()


def restart_sandbox() -> None:
    import subprocess

    script = str(HERE.parents[1] / "asterisk-docker" / "sandbox")
    subprocess.run([script, "down"], check=False, capture_output=True, timeout=120)
    subprocess.run([script, "up"], check=True, capture_output=True, timeout=120)

