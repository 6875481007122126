"""`optout import` of N numbers into PostgreSQL + Redis, as the CLI runs it; prints figures, asserts nothing.

    python tests/bench/bench_import.py [N] [e164|national] [RUNS] [keeper]

With `keeper`, an agent's cache keeper (CacheKeeper.run) runs beside the import, as in production, and reports
how many changes it applied to Redis and the CPU it used.

Targets (issue 15): 1,000,000 E.164 rows <= 10 s, 1,000,000 national rows <= 20 s, 10,000,000 E.164 rows
<= 120 s with a peak RSS <= 500 MB (the import process and its workers, sampled from /proc every 50 ms).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import redis

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.common import machine  # noqa: E402

PG = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/optout_test")
REDIS = os.environ.get("REDIS_URL_TEST", "redis://127.0.0.1:6379/15")


KEEPER = """
import asyncio, resource, signal
from contextlib import AsyncExitStack
from agent.core import open_core
from agent.settings import Settings

applied = rounds = 0

async def main() -> None:
    async with AsyncExitStack() as stack:
        core = await open_core(Settings(), stack)
        original, one_round = core.cache.apply, core.keeper.round

        async def counting(token, changes, **kw):
            global applied
            applied += len(changes)
            return await original(token, changes, **kw)

        async def counted_round():
            global rounds
            rounds += 1
            return await one_round()

        core.cache.apply, core.keeper.round = counting, counted_round
        task = asyncio.create_task(core.keeper.run())
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        task.cancel()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"keeper beside it: {rounds} rounds, {applied:,} changes applied, CPU {ru.ru_utime + ru.ru_stime:.1f} s")

asyncio.run(main())
"""


def write_file(path: Path, n: int, kind: str) -> None:
    with path.open("w") as fh:
        fh.write("phone\n")
        for start in range(0, n, 100_000):
            if kind == "national":  # national IL format: every row needs the full parse
                fh.write("".join(f"05{i % 10}{i % 10_000_000:07d}\n" for i in range(start, min(n, start + 100_000))))
            else:
                fh.write("".join(f"+9725{i % 10}{i % 10_000_000:07d}\n" if i < 10_000_000 else f"+1415{i:07d}\n"
                                 for i in range(start, min(n, start + 100_000))))


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the import's workers), in kB."""
    total = 0
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def run_once(path: Path, env: dict[str, str]) -> tuple[float, int, str, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "import", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    return elapsed, peak, (out.strip() or err.strip()[-300:]), proc.returncode


def main(n: int = 1_000_000, kind: str = "e164", runs: int = 3, keeper: bool = False) -> None:
    r = redis.Redis.from_url(REDIS, socket_timeout=60)
    times: list[float] = []
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "numbers.csv"
        write_file(path, n, kind)
        for _ in range(runs):
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")
            r.flushdb(asynchronous=True)
            dsn = f"{PG}?options=-csearch_path%3D{schema}"
            env = {**os.environ, "DATABASE_URL": dsn, "REDIS_URL": REDIS, "OPTOUT_DEFAULT_REGION": "IL",
                   "OPTOUT_JOURNAL_PATH": f"{tmp}/j.db"}
            try:
                subprocess.run([sys.executable, "-m", "agent.cli", "migrate"], env=env, check=True,
                               capture_output=True)
                beside = subprocess.Popen([sys.executable, "-c", KEEPER], env=env, stdout=subprocess.PIPE,
                                          text=True) if keeper else None
                elapsed, peak, out, code = run_once(path, env)
                if beside is not None:
                    time.sleep(1)
                    beside.terminate()
                    print(beside.communicate(timeout=30)[0].strip())
                with psycopg.connect(dsn) as conn:
                    rows = conn.execute("SELECT count(*) FROM blacklist").fetchone()
                times.append(elapsed)
                print(f"optout import of {n:,} {kind} numbers: {elapsed:.1f} s ({n / elapsed:,.0f}/s), peak RSS "
                      f"{peak / 1024:.0f} MB; exit {code}; {out}; PostgreSQL rows {rows[0] if rows else 0:,}; "
                      f"Redis set {r.scard('blacklist:numbers'):,}, "
                      f"view at change {int(r.hget('blacklist:view', 'seq') or 0):,}")
            finally:
                r.flushdb(asynchronous=True)
                with psycopg.connect(PG, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(f"median of {len(times)}: {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000, sys.argv[2] if len(sys.argv) > 2 else "e164",
         int(sys.argv[3]) if len(sys.argv) > 3 else 3, len(sys.argv) > 4 and sys.argv[4] == "keeper")
