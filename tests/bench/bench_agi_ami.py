"""Benchmark: press -> hangup over FastAGI and AMI, and pre-dial checks per second over FastAGI.

Run from the repository root with the sandbox up and .run/test.env sourced:
    python tests/bench/bench_agi_ami.py [--calls 100] [--inflight 20] [--via sip|local]

Press and hangup times are Asterisk's own, exactly as in bench_ari.py: a CallObserver (an ARI app subscribed
to all events) reports the IVR channel's ChannelDtmfReceived and ChannelHangupRequest timestamps, so the
three paths share one method and one load. The agent's store is an embedded SQLite file and Redis is
off: the figures are the telephony path, not the store. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.agi import AgiServer
from agent.ami import AmiAgent
from agent.constants import Origin
from agent.dial_guard import DialGuard
from agent.intake import Intake
from agent.journal import Journal
from agent.lookup import BlacklistChecker
from agent.optout import OptOutRecord, utcnow
from agent.pipeline import OptOutPipeline
from agent.store_sqlite import SqliteStore
from agent.testcall import CallObserver, Ivr, Via
from tests.asterisk.test_agi import agi_headers


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(name: str, values: list[float], total: int, unit: str = "ms") -> None:
    if not values:
        print(f"{name}: no samples of {total}")
        return
    print(f"{name}: n={len(values)}/{total} p50={pct(values, 50):.1f}{unit} p95={pct(values, 95):.1f}{unit} "
          f"p99={pct(values, 99):.1f}{unit} max={max(values):.1f}{unit} mean={statistics.fmean(values):.1f}{unit}")


async def press_to_hangup(obs: CallObserver, ivr: Ivr, *, n: int, inflight: int, via: Via) -> list[float]:
    gate = asyncio.Semaphore(inflight)
    out: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            number = f"+1202556{i % 10000:04d}"
            call = await obs.wait(await obs.place(number, press="9", ivr=ivr, via=via, hold_seconds=5), timeout=12)
            if call.press_to_hangup_ms is not None:
                out.append(call.press_to_hangup_ms)

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def precheck_direct(port: int, *, n: int, concurrency: int, numbers: list[str]) -> tuple[float, list[float]]:
    """Act as Asterisk over FastAGI: one connection per check, `concurrency` at once."""
    gate = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(agi_headers("precheck", numbers[i % len(numbers)]))
            await writer.drain()
            line = await reader.readline()
            assert line.startswith(b"SET VARIABLE OPTOUT_BLOCKED"), line
            writer.write(b"200 result=1\n")
            await writer.drain()
            await reader.read()
            writer.close()
            lat.append((time.perf_counter() - started) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0), lat


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--inflight", type=int, default=20)
    ap.add_argument("--via", choices=["sip", "local"], default="sip")
    ap.add_argument("--checks", type=int, default=2000)
    args = ap.parse_args()
    env = SimpleNamespace(url=os.environ.get("ARI_URL", "http://127.0.0.1:8088"),
                          username=os.environ.get("ARI_USERNAME", "optout"), password=os.environ["ARI_PASSWORD"])
    port = int(os.environ.get("AGI_PORT", "4573"))
    with tempfile.TemporaryDirectory() as tmp:
        async with Journal(Path(tmp) / "journal.db") as journal, SqliteStore(Path(tmp) / "store.db") as store:
            await store.migrate()
            pipeline = OptOutPipeline(journal=journal, store=store, cache=None)
            checker = BlacklistChecker(store=store, cache=None, journal=None, region="US")
            blocked = [f"+1202557{i:04d}" for i in range(50)]
            await store.write([OptOutRecord(event_id=f"bench-{uuid.uuid4().hex}", phone_number=n, origin=Origin.ADMIN,
                                             received_at=utcnow()) for n in blocked])
            clear = [f"+1202558{i:04d}" for i in range(50)]
            async with CallObserver(ari_url=env.url, username=env.username, password=env.password) as calls:
                intake = Intake(pipeline=pipeline, digit="9", region="US")
                guard = DialGuard(checker=checker, store=store)
                async with AgiServer(host="127.0.0.1", port=port, intake=intake, guard=guard):
                    print(f"press -> hangup, {args.calls} {args.via} calls, {args.inflight} in flight")
                    report("AGI", await press_to_hangup(calls, "agi", n=args.calls, inflight=args.inflight,
                                                         via=args.via), args.calls)
                    for concurrency in (1, 20):
                        rate, lat = await precheck_direct(port, n=args.checks, concurrency=concurrency,
                                                          numbers=blocked + clear)
                        print(f"precheck over FastAGI (local AGI client, {concurrency} at once): {rate:.0f} answers/s")
                        report("  latency", lat, args.checks)
                async with AmiAgent(host=os.environ.get("AMI_HOST", "127.0.0.1"),
                                    port=int(os.environ.get("AMI_PORT", "5038")),
                                    username=os.environ.get("AMI_USERNAME", "optout"), secret=os.environ["AMI_SECRET"],
                                    contexts=frozenset({"optout-plain-ivr"}), intake=intake) as ami:
                    task = asyncio.create_task(ami.run())
                    while not ami.connected:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                    report("AMI", await press_to_hangup(calls, "plain", n=args.calls, inflight=args.inflight,
                                                         via=args.via), args.calls)
                    await intake.drain(5.0)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
