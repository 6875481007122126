"""What the fault scenarios share: the agent as a real subprocess, a Redis server of our own, SIP call load,
counting what was stored, and the one figure line each scenario prints.

Everything here drives real systems; the only seam is tests/tcp_proxy.py between the agent and a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import redis.asyncio as aioredis

from agent.constants import BLACKLIST_LEASE, BLACKLIST_SET
from agent.testcall import CallObserver, CallResult

REPO = Path(__file__).resolve().parents[2]

HOLD_SECONDS = 12
"""How long a test caller stays on after pressing. The agent hangs up within milliseconds; a call still up
AGENT_HANGUP_LIMIT_MS after the press was ended by the caller, not by the agent."""
AGENT_HANGUP_LIMIT_MS = (HOLD_SECONDS - 4) * 1000.0

FIGURES: list[str] = []
"""Every scenario's figure line, printed again in the terminal summary (conftest.py)."""

# Settings the scenarios set themselves; inherited values must not leak into the agent under test.
_AGENT_OWNED_PREFIXES = ("OPTOUT_", "AWS_", "DATABASE_URL", "REDIS_", "AGENT_HTTP_", "AMI_", "AGI_", "LOG_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dsn_through(dsn: str, port: int) -> str:
    """`dsn` with its host:port replaced by 127.0.0.1:`port` (a TcpProxy in front of the same server)."""
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def host_port(dsn: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


# --- the agent --------------------------------------------------------------------------------------


class AgentProcess:
    """`python -m agent` as a subprocess, restartable with the same environment (same journal, same port).

    Its log (JSON lines, LOG_LEVEL=WARNING unless FAULTS_AGENT_LOG_LEVEL says otherwise) goes to `log_path`.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(_AGENT_OWNED_PREFIXES)}
        self.env = {**inherited, "AGENT_HTTP_HOST": "127.0.0.1", "AGENT_HTTP_PORT": str(self.port),
                    "LOG_LEVEL": os.environ.get("FAULTS_AGENT_LOG_LEVEL", "WARNING"), "OPTOUT_DEFAULT_REGION": "IL",
                    # The scenarios drive the ARI path; no FastAGI listener of ours next to other test runs.
                    "AGI_ENABLED": "false", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def journal_path(self) -> Path:
        return Path(self.env["OPTOUT_JOURNAL_PATH"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, *, ready_within: float = 30.0) -> None:
        """Start the agent and wait until /ready answers 200. Raises RuntimeError with the log's tail."""
        assert not self.running, "the agent is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} at {datetime.now(UTC).isoformat()}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "agent"], env=self.env, cwd=REPO,
                                         stdout=log, stderr=subprocess.STDOUT)
        if not await self.wait_ready(within=ready_within):
            raise RuntimeError(f"the agent did not become ready within {ready_within}s:\n{self.log_tail()}")

    async def ready(self, client: httpx.AsyncClient) -> bool:
        try:
            return (await client.get(f"{self.url}/ready", timeout=1.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, *, within: float, every: float = 0.02) -> bool:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if not self.running:
                    return False
                if await self.ready(client):
                    return True
                await asyncio.sleep(every)
        return False

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self, *, within: float = 30.0) -> int:
        """SIGTERM and wait for the exit; returns the exit code (SIGKILLs and raises after `within` s)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise RuntimeError(f"the agent did not exit within {within}s of SIGTERM:\n{self.log_tail()}") from None

    async def stop(self) -> None:
        """Teardown: SIGTERM, SIGKILL if it hangs. Safe to call twice."""
        if self.running:
            with contextlib.suppress(RuntimeError):
                await self.terminate(within=20.0)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no agent log)"


# --- a Redis server of our own ----------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server (no persistence): killed and restarted empty by the Redis scenario."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client: aioredis.Redis = aioredis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError, aioredis.RedisError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


# --- calls ------------------------------------------------------------------------------------------


def numbers(count: int, *, first: int = 1_000_000) -> list[str]:
    """Distinct Israeli mobile numbers (each scenario has its own schema and Redis: no clash across runs)."""
    return [f"+97250{first + i:07d}" for i in range(count)]


def agent_hung_up(call: CallResult) -> bool:
    """Asterisk saw the hangup request soon after the press: the agent ended the call, not the caller."""
    ms = call.press_to_hangup_ms
    return call.pressed_at is not None and ms is not None and ms < AGENT_HANGUP_LIMIT_MS


async def place_calls(
    obs: CallObserver, phone_numbers: Iterable[str], *, campaign: str, concurrency: int, over: float = 0.0,
    on_placed: Callable[[CallResult], None] | None = None,
) -> list[CallResult]:
    """SIP test calls pressing 9, at most `concurrency` up at once, starts spread evenly over `over` seconds.

    Returns when every call is over (the IVR leg destroyed, or HOLD_SECONDS + 15 s). A refused originate
    raises TelephonyError.
    """
    todo = list(phone_numbers)
    sem = asyncio.Semaphore(concurrency)
    results: list[CallResult] = []

    async def one(number: str) -> None:
        async with sem:
            call = await obs.place(number, press="9", via="sip", campaign_id=campaign, hold_seconds=HOLD_SECONDS)
            results.append(call)
            if on_placed is not None:
                on_placed(call)
            await obs.wait(call, timeout=HOLD_SECONDS + 15)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, number in enumerate(todo):
            delay = t0 + i * over / max(1, len(todo)) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(number), name=f"call-{number}"))
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return results


async def end_leftovers(obs: CallObserver, calls: Iterable[CallResult]) -> int:
    """Hang up what is still up after a scenario (so the next one starts on a quiet Asterisk)."""
    left = 0
    for call in calls:
        if not call.done.is_set():
            left += 1
            with contextlib.suppress(Exception):  # Asterisk may already have ended it
                await obs.hangup_all(call)
    return left


async def wait_for_presses(calls: list[CallResult], count: int, *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if sum(c.pressed_at is not None for c in calls) >= count:
            return True
        await asyncio.sleep(0.005)
    return False


# --- what was stored --------------------------------------------------------------------------------


@dataclass
class Stored:
    rows: dict[str, int]
    """Audit rows per phone number (opt-outs of this scenario's campaign)."""
    campaign_count: int
    in_redis: set[str] = field(default_factory=set)

    @property
    def numbers(self) -> set[str]:
        return set(self.rows)

    @property
    def duplicated(self) -> int:
        """Audit rows beyond one per call, plus campaign counts beyond the calls stored."""
        return sum(n - 1 for n in self.rows.values()) + max(0, self.campaign_count - len(self.rows))


async def stored(pg_dsn: str, redis_url: str | None, campaign: str, expected: Iterable[str] = ()) -> Stored:
    """What PostgreSQL (directly, not through the proxy) and Redis hold for `campaign`."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT phone_number, count(*) FROM optout_actions WHERE campaign_id = %s AND origin = 'ari'"
            " GROUP BY phone_number", (campaign,))
        rows = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
        cur = await conn.execute("SELECT optouts FROM campaign_optouts WHERE campaign_id = %s", (campaign,))
        row = await cur.fetchone()
    result = Stored(rows, int(row[0]) if row else 0)
    wanted = sorted(set(expected) | set(rows))
    if redis_url is not None and wanted:
        client: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            member = await client.smismember(BLACKLIST_SET, wanted)
            result.in_redis = {n for n, m in zip(wanted, member, strict=True) if m}
        finally:
            await client.aclose()
    return result


async def wait_stored(
    pg_dsn: str, redis_url: str | None, campaign: str, expected: set[str], *, within: float,
) -> tuple[Stored, float]:
    """Poll until every expected number is stored once and in Redis (or `within` s); returns it and the wait."""
    started = time.monotonic()
    while True:
        got = await stored(pg_dsn, redis_url, campaign, expected)
        in_redis_ok = redis_url is None or expected <= got.in_redis
        if (expected <= got.numbers and in_redis_ok) or elapsed_since(started) > within:
            return got, elapsed_since(started)
        await asyncio.sleep(0.2)


async def migrated(pg_dsn: str) -> bool:
    """Whether the agent has created its schema (it migrates in the background after start)."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT to_regclass('optout_schema_version') IS NOT NULL")
        row = await cur.fetchone()
        if not row or not row[0]:
            return False
        cur = await conn.execute("SELECT count(*) FROM optout_schema_version")
        row = await cur.fetchone()
        return bool(row and row[0])


async def start_agent(agent: AgentProcess, pg_dsn: str) -> None:
    """Start the agent and wait until it is ready and has migrated its schema. When its ARI websocket cannot
    connect (Asterisk 22.10.1 can leave an app name stuck after a websocket died mid-write, until it
    restarts), the sandbox is restarted once."""
    try:
        await agent.start()
    except RuntimeError:
        await agent.stop()
        script = str(REPO / "asterisk-docker" / "sandbox")
        await asyncio.to_thread(subprocess.run, [script, "down"], check=False, capture_output=True, timeout=120)
        await asyncio.to_thread(subprocess.run, [script, "up"], check=True, capture_output=True, timeout=120)
        await agent.start()
    if not await eventually(lambda: migrated(pg_dsn), within=30.0):
        raise RuntimeError(f"the agent did not migrate its schema:\n{agent.log_tail()}")


async def redis_synced(redis_url: str) -> bool:
    """Whether the view is current: the lease is there (and not held after a rebuild)."""
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5)
    try:
        lease = await client.get(BLACKLIST_LEASE)
        return lease is not None and lease != b"hold"
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


async def eventually(probe: Callable[[], Awaitable[bool]], *, within: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + within
    while True:
        if await probe():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)


def journal_counts(path: Path) -> dict[str, int]:
    """Rows of the agent's journal by state (read-only; the journal is SQLite in WAL mode)."""
    if not path.exists():
        return {"rows": 0, "unstored": 0, "unpublished": 0}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        total, unstored, unpublished = db.execute(
            "SELECT count(*), coalesce(sum(store_state != 'STORED'), 0), coalesce(sum(publish_state = 'PENDING'), 0)"
            " FROM journal"
        ).fetchone()
    return {"rows": int(total), "unstored": int(unstored), "unpublished": int(unpublished)}


def journal_numbers(path: Path) -> dict[str, bool]:
    """Phone number -> stored flag, for every opt-out the journal holds."""
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        rows = db.execute(
            "SELECT json_extract(record, '$.phoneNumber'), store_state = 'STORED' FROM journal").fetchall()
    return {str(number): bool(flag) for number, flag in rows if number}


# --- the figure line --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


@dataclass
class Figures:
    """calls, opt-outs pressed, hung up, stored, in Redis, lost, duplicated, press->hangup p50/p99."""

    scenario: str
    calls: list[CallResult]
    expected: set[str]
    """Numbers that must be stored: every opt-out whose press reached the agent."""
    got: Stored
    note: str = ""

    @property
    def pressed(self) -> int:
        return sum(c.pressed_at is not None for c in self.calls)

    @property
    def hung_up(self) -> int:
        return sum(agent_hung_up(c) for c in self.calls)

    @property
    def lost(self) -> int:
        return len(self.expected - self.got.numbers)

    @property
    def line(self) -> str:
        ms = [c.press_to_hangup_ms for c in self.calls if agent_hung_up(c) and c.press_to_hangup_ms is not None]
        timing = (f"press->hangup p50={statistics.median(ms):.1f}ms p99={percentile(ms, 99):.1f}ms" if ms
                  else "press->hangup: no samples")
        return (f"[{self.scenario}] calls={len(self.calls)} pressed={self.pressed} hung_up={self.hung_up} "
                f"stored={len(self.got.numbers)} "
                f"in_redis={len(self.got.in_redis)} lost={self.lost} duplicated={self.got.duplicated} {timing}"
                + (f" | {self.note}" if self.note else ""))

    def report(self) -> None:
        FIGURES.append(self.line)
        print(self.line)
