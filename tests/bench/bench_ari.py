"""ARI path benchmark from Asterisk's own event timestamps (figures only, no assertions).

Steady load: SIP test calls with a bounded number in flight and spread arrivals; press -> ChannelHangupRequest,
press -> number visible in Redis (keyspace notification), and the agent's CPU time per call.
Burst: N Local-channel callers pressing within a few ms, alternating the agent and a bare hang-up-only
client (tests/bench/bare_hangup.py) in the same run.

Needs the sandbox up and ARI_* in the environment (`make bench` does both).
Writes tests/bench/results/ari.json (every sample) and ari.png (the distributions side by side); with
BENCH_PROFILE=1 it also samples the agent with py-spy under the SIP load and prints the busiest frames.
Usage: python tests/bench/bench_ari.py [paced_calls] [sip_calls] [in_flight] [burst_size] [burst_rounds]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent.store_postgres import PostgresStore  # noqa: E402
from agent.testcall import CallObserver, CallResult  # noqa: E402
from tests.bench.common import machine, pct, summary  # noqa: E402
from tests.bench.report_screenshot import render  # noqa: E402

PG = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/optout_test")
REDIS = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")
CLK = os.sysconf("SC_CLK_TCK")
RESULTS = REPO / "tests" / "bench" / "results"


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


async def paced(obs: CallObserver, calls: int, every: float, via: str) -> list[CallResult]:
    """One call placed every `every` seconds (each presses 9 a second after it is answered)."""
    async def one() -> CallResult:
        return await obs.wait(await obs.place(number(), press="9", via=via, hold_seconds=10), timeout=20)

    tasks = []
    for _ in range(calls):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(every)
    return list(await asyncio.gather(*tasks))


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


def hangups(results: list[CallResult]) -> list[float]:
    return [r.press_to_hangup_ms for r in results if r.press_to_hangup_ms is not None]


async def loop_lag(agent: Agent) -> str:
    """The agent's own event-loop lag histogram (optout_event_loop_lag_seconds) as p50/p99 bucket bounds."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{agent.port}/metrics")).text
    buckets = [(float(line.split('le="')[1].split('"')[0].replace("+Inf", "inf")), float(line.rsplit(" ", 1)[1]))
               for line in text.splitlines() if line.startswith("optout_event_loop_lag_seconds_bucket")]
    if not buckets or not buckets[-1][1]:
        return "no samples"
    total = buckets[-1][1]
    p50 = next(le for le, n in buckets if n >= 0.5 * total)
    p99 = next(le for le, n in buckets if n >= 0.99 * total)
    return f"{total:.0f} samples, p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms"


class Profiler:
    """py-spy sampling the agent (BENCH_PROFILE=1): the functions most often on the stack."""

    def __init__(self, pid: int, seconds: int) -> None:
        self.out = Path(tempfile.mkdtemp()) / "profile.txt"
        spy = str(Path(sys.executable).with_name("py-spy"))
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate",
                                      "250", "--format", "raw", "--output", str(self.out), "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def report(self, top: int = 15) -> list[tuple[str, float]]:
        """Self time: the innermost frame of each sample, as a share of the samples that were not idle
        (waiting in the event loop's select or a worker thread's queue)."""
        self.proc.wait(timeout=120)
        own: dict[str, int] = {}
        busy = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            leaf = stack.split(";")[-1]
            if "select (selectors.py" in leaf or "_worker (concurrent/futures/thread.py" in leaf or \
                    "wait (threading.py" in leaf:
                continue
            busy += int(count)
            own[leaf] = own.get(leaf, 0) + int(count)
        ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
        return [(frame, 100.0 * n / max(1, busy)) for frame, n in ranked]


async def compare(agent: Agent, bare: Bare,
                  run: Callable[[], Awaitable[list[float]]]) -> tuple[list[float], list[float]]:
    """The same load on the agent, then on the bare client."""
    agent_values = await run()
    agent.stop()
    await bare.start()
    try:
        bare_values = await run()
    finally:
        bare.stop()
        await agent.start()
    return agent_values, bare_values


def chart(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if results[n]["agent"] and results[n]["bare"]]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2))
    for ax, name in zip(axes if len(names) > 1 else [axes], names, strict=True):
        data = [results[name]["agent"], results[name]["bare"]]
        ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 3})
        ax.set_xticks([1, 2], ["agent", "bare client"])
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("press -> hangup request (ms, Asterisk's clock)")
        ax.set_yscale("log")
        for i, values in enumerate(data, start=1):
            ax.annotate(f"p50 {statistics.median(values):.1f}\np99 {pct(values, 99):.1f}", (i + 0.18, pct(values, 99)),
                        fontsize=8)
    fig.suptitle(f"optout-agent vs a bare hang-up client, one run on {machine()}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def main(paced_calls: int = 100, calls: int = 500, in_flight: int = 50, burst_size: int = 50,
               rounds: int = 3) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "DATABASE_URL": f"{PG}?options=-csearch_path%3D{schema}", "REDIS_URL": REDIS,
           "OPTOUT_JOURNAL_PATH": f"{tmp}/journal.db", "OPTOUT_DEFAULT_REGION": "IL",
           # The ARI path alone, as a deployment that uses ARI runs it (AMI would parse every channel event).
           "AGI_ENABLED": "false", "AMI_HOST": ""}
    agent, bare = Agent(env), Bare(env)
    results: dict[str, dict[str, list[float]]] = {}
    figures: dict[str, object] = {"machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    print(f"machine: {machine()}")
    try:
        await agent.start()
        async with CallObserver(ari_url=env.get("ARI_URL", "http://127.0.0.1:8088"),
                                username=env.get("ARI_USERNAME", "optout"), password=env["ARI_PASSWORD"]) as obs:
            seen: dict[str, float] = {}
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_redis(seen, stop))
            await asyncio.sleep(0.3)

            async def paced_run() -> list[float]:
                found = await paced(obs, paced_calls, 0.05, "local")
                to_redis = [(seen[r.number] - r.pressed_at.timestamp()) * 1000 for r in found
                            if r.pressed_at and r.number in seen]
                if to_redis:
                    results.setdefault("press -> Redis, steady", {"agent": to_redis, "bare": []})
                return hangups(found)

            a, b = await compare(agent, bare, paced_run)
            results[f"steady: {paced_calls} Local calls, a press every 50 ms"] = {"agent": a, "bare": b}
            assert agent.proc is not None
            profiler = Profiler(agent.proc.pid, 25) if os.environ.get("BENCH_PROFILE") == "1" else None
            cpu0, t0 = cpu_seconds(agent.proc.pid), time.perf_counter()
            sip = hangups(await steady(obs, calls, in_flight))
            figures["agent_cpu_ms_per_call"] = round((cpu_seconds(agent.proc.pid) - cpu0) / max(1, calls) * 1000, 2)
            figures["sip_calls_per_s"] = round(calls / (time.perf_counter() - t0), 1)
            figures["loop_lag"] = await loop_lag(agent)
            if profiler is not None:
                figures["profile_top"] = profiler.report()
            agent.stop()
            await bare.start()
            bare_sip = hangups(await steady(obs, calls, in_flight))
            bare.stop()
            await agent.start()
            results[f"{calls} SIP calls, {in_flight} in flight"] = {"agent": sip, "bare": bare_sip}
            agent_b: list[float] = []
            bare_b: list[float] = []
            for i in range(rounds):
                print(f"  burst round {i + 1}")
                b1, b2 = await compare(agent, bare, lambda: burst(obs, burst_size))
                agent_b += b1
                bare_b += b2
            results[f"burst: {burst_size} presses at once, {rounds} rounds"] = {"agent": agent_b, "bare": bare_b}
            stop.set()
            await watcher
        agent.stop()
        # The README's report picture: the compliance report of the calls this run made (measured figures).
        async with PostgresStore(env["DATABASE_URL"]) as store:
            await render(store, RESULTS / "report.png", height=1800,
                         title=f"Compliance report of bench_ari.py's own SIP calls, {machine()}")
    finally:
        agent.stop()
        bare.stop()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    for name, pair in results.items():
        print(name)
        for who, values in pair.items():
            if values:
                print("  " + summary(who, values))
        if pair["agent"] and pair["bare"]:
            print(f"  agent/bare: p50 x{statistics.median(pair['agent']) / statistics.median(pair['bare']):.2f}, "
                  f"p99 x{pct(pair['agent'], 99) / pct(pair['bare'], 99):.2f}; agent p50 - bare p50 = "
                  f"{statistics.median(pair['agent']) - statistics.median(pair['bare']):+.2f} ms, p99 difference "
                  f"{pct(pair['agent'], 99) - pct(pair['bare'], 99):+.2f} ms")
    for key in ("agent_cpu_ms_per_call", "sip_calls_per_s", "loop_lag"):
        print(f"{key}: {figures.get(key)}")
    for frame, share in figures.get("profile_top", []):  # type: ignore[attr-defined]
        print(f"  {share:5.1f}%  {frame}")
    summary_json = {**figures, "scenarios": {
        name: {who: {"n": len(v), "p50": statistics.median(v) if v else None, "p99": pct(v, 99) if v else None,
                     "samples": v} for who, v in pair.items()} for name, pair in results.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ari.json").write_text(json.dumps(summary_json, indent=1))
    chart(results, RESULTS / "ari.png")
    print(f"figures: {RESULTS / 'ari.json'}, chart: {RESULTS / 'ari.png'}")


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no agent left behind
    asyncio.run(main(*[int(a) for a in sys.argv[1:]]))
