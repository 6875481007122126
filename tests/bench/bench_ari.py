"""ARI path benchmark from Asterisk's own event timestamps (figures only, no assertions).

Steady load: SIP test calls with a bounded number in flight and spread arrivals; press -> ChannelHangupRequest,
press -> number visible in Redis (keyspace notification), and the agent's CPU time per call.
Burst: N Local-channel callers pressing within a few ms, alternating the agent and a bare hang-up-only
client (tests/bench/bare_hangup.py) in the same run.

Needs the sandbox up and ARI_* in the environment (`make bench` does both).
Usage: python tests/bench/bench_ari.py [steady_calls] [in_flight] [burst_size] [burst_rounds]
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent.testcall import CallObserver, CallResult  # noqa: E402
from tests.bench.common import machine, summary  # noqa: E402

PG = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/optout_test")
REDIS = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


class Agent:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**env, "AGENT_HTTP_PORT": str(self.port),
                    "LOG_LEVEL": os.environ.get("BENCH_AGENT_LOG_LEVEL", "WARNING")}
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent"], env=self.env, cwd=REPO)
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("agent did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


class Bare:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/bench/bare_hangup.py")], env=self.env,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        await asyncio.to_thread(self.proc.stdout.readline)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


async def watch_redis(seen: dict[str, float], stop: asyncio.Event) -> None:
    r = aioredis.Redis.from_url(REDIS, decode_responses=True)
    db = REDIS.rsplit("/", 1)[-1]
    await r.config_set("notify-keyspace-events", "K$")
    pubsub = r.pubsub()
    await pubsub.psubscribe(f"__keyspace@{db}__:blacklist:+*")
    try:
        while not stop.is_set():
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg and msg["data"] == "set":
                seen.setdefault(msg["channel"].split("blacklist:", 1)[1], time.time())
    finally:
        await pubsub.aclose()
        await r.config_set("notify-keyspace-events", "")
        await r.aclose()


def number() -> str:
    return f"+97250{uuid.uuid4().int % 10_000_000:07d}"


async def steady(obs: CallObserver, calls: int, in_flight: int) -> list[CallResult]:
    sem = asyncio.Semaphore(in_flight)
    results: list[CallResult] = []

    async def one() -> None:
        async with sem:
            call = await obs.place(number(), press="9", via="sip", hold_seconds=10)
            results.append(await obs.wait(call, timeout=20))

    tasks = []
    for _ in range(calls):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(random.uniform(0.0, 0.06))
    await asyncio.gather(*tasks)
    return results


async def burst(obs: CallObserver, size: int) -> list[float]:
    calls = await asyncio.gather(*(obs.place(number(), press="9", via="local", hold_seconds=10) for _ in range(size)))
    await asyncio.gather(*(obs.wait(c, timeout=20) for c in calls))
    spread = [c.pressed_at for c in calls if c.pressed_at]
    if spread:
        print(f"    presses spread over {(max(spread) - min(spread)).total_seconds() * 1000:.1f} ms; "
              f"hung up {sum(c.hung_up for c in calls)}/{size}")
    return [c.press_to_hangup_ms for c in calls if c.press_to_hangup_ms is not None]


async def main(calls: int = 500, in_flight: int = 50, burst_size: int = 50, rounds: int = 3) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "DATABASE_URL": f"{PG}?options=-csearch_path%3D{schema}", "REDIS_URL": REDIS,
           "OPTOUT_JOURNAL_PATH": f"{tmp}/journal.db", "OPTOUT_DEFAULT_REGION": "IL"}
    agent, bare = Agent(env), Bare(env)
    print(f"machine: {machine()}")
    try:
        await agent.start()
        async with CallObserver(ari_url=env.get("ARI_URL", "http://127.0.0.1:8088"),
                                username=env.get("ARI_USERNAME", "optout"), password=env["ARI_PASSWORD"]) as obs:
            seen: dict[str, float] = {}
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_redis(seen, stop))
            await asyncio.sleep(0.3)
            assert agent.proc is not None
            cpu0, t0 = cpu_seconds(agent.proc.pid), time.perf_counter()
            results = await steady(obs, calls, in_flight)
            await asyncio.sleep(1.0)
            cpu = cpu_seconds(agent.proc.pid) - cpu0
            elapsed = time.perf_counter() - t0
            stop.set()
            await watcher
            hangups = [r.press_to_hangup_ms for r in results if r.press_to_hangup_ms is not None]
            to_redis = [(seen[r.number] - r.pressed_at.timestamp()) * 1000 for r in results
                        if r.pressed_at and r.number in seen]
            if calls:
                print(f"steady: {calls} SIP calls, {in_flight} in flight, {calls / elapsed:.1f} calls/s; hung up "
                      f"{sum(r.hung_up for r in results)}, in Redis {len(to_redis)}; agent CPU "
                      f"{cpu / calls * 1000:.2f} ms per call")
                print("  " + summary("press -> ChannelHangupRequest", hangups))
                print("  " + summary("press -> number in Redis", to_redis))
            if calls:
                agent.stop()
                await bare.start()
                bare_steady = await steady(obs, calls, in_flight)
                bare.stop()
                await agent.start()
                print("  " + summary("bare client, same load: press -> ChannelHangupRequest",
                                     [r.press_to_hangup_ms for r in bare_steady if r.press_to_hangup_ms is not None]))
            agent_b: list[float] = []
            bare_b: list[float] = []
            for i in range(rounds):
                print(f"  burst round {i + 1}: agent")
                agent_b += await burst(obs, burst_size)
                agent.stop()
                await bare.start()
                print(f"  burst round {i + 1}: bare client")
                bare_b += await burst(obs, burst_size)
                bare.stop()
                await agent.start()
            print(f"burst: {burst_size} Local-channel callers at once, {rounds} rounds each, alternating")
            print("  " + summary("agent press -> hangup request", agent_b))
            print("  " + summary("bare  press -> hangup request", bare_b))
            if bare_b and agent_b:
                import statistics

                from tests.bench.common import pct
                print(f"  agent/bare: p50 x{statistics.median(agent_b) / statistics.median(bare_b):.2f}, "
                      f"p99 x{pct(agent_b, 99) / pct(bare_b, 99):.2f}")
    finally:
        agent.stop()
        bare.stop()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
        print(f"finished {datetime.now(UTC).isoformat(timespec='seconds')}")


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no agent left behind
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(*args))
