"""`optout export` (and `--audit`) of N blacklisted numbers from PostgreSQL, as the CLI runs it, to a file;
prints figures (time, peak RSS of the export process), asserts nothing. Target (issue 15): 1,000,000 <= 5 s.

    python tests/bench/bench_export.py [N] [RUNS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.bench_import import rss_kb, write_file  # noqa: E402
from tests.bench.common import machine  # noqa: E402

PG = os.environ.get("DATABASE_URL_TEST", "postgresql://postgres@127.0.0.1:5432/optout_test")


def export(env: dict[str, str], out: Path, *extra: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    with out.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "export", *extra], env=env, stdout=fh,
                                stderr=subprocess.PIPE)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, rss_kb(proc.pid))
            time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    with out.open("rb") as fh:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return elapsed, peak, lines


def main(n: int = 1_000_000, runs: int = 3) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{PG}?options=-csearch_path%3D{schema}"
    print(f"machine: {machine()}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_",))}
            env.update(DATABASE_URL=dsn, OPTOUT_DEFAULT_REGION="IL", OPTOUT_JOURNAL_PATH=f"{tmp}/j.db")
            path = Path(tmp) / "numbers.csv"
            write_file(path, n, "e164")
            subprocess.run([sys.executable, "-m", "agent.cli", "migrate"], env=env, check=True, capture_output=True)
            subprocess.run([sys.executable, "-m", "agent.cli", "import", str(path)], env=env, check=True,
                           capture_output=True)
            for extra in ((), ("--audit",)):
                times = []
                for _ in range(runs):
                    elapsed, peak, lines = export(env, Path(tmp) / "out.csv", *extra)
                    times.append(elapsed)
                    print(f"optout export {' '.join(extra)} of {n:,} rows: {elapsed:.2f} s ({n / elapsed:,.0f}/s), "
                          f"{lines:,} lines, peak RSS {peak / 1024:.0f} MB")
                print(f"median of {runs}: {statistics.median(times):.2f} s")
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
