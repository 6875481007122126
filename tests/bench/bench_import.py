"""`optout import` of N numbers (default 1,000,000) into PostgreSQL + Redis, as the CLI runs it (target <= 30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


def main(n: int = 1_000_000) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    r = redis.Redis.from_url(REDIS)
    r.flushdb()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "numbers.csv"
            with path.open("w") as fh:
                fh.write("phone\n")
                for i in range(n):
                    fh.write(f"05{i % 10}{i:07d}\n")  # national IL format: every row needs normalising
            env = {**os.environ, "DATABASE_URL": f"{PG}?options=-csearch_path%3D{schema}", "REDIS_URL": REDIS,
                   "OPTOUT_DEFAULT_REGION": "IL", "OPTOUT_JOURNAL_PATH": f"{tmp}/j.db"}
            subprocess.run([sys.executable, "-m", "agent.cli", "migrate"], env=env, check=True, capture_output=True)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "agent.cli", "import", str(path)], env=env,
                                 capture_output=True, text=True)
            elapsed = time.perf_counter() - t0
        with psycopg.connect(f"{PG}?options=-csearch_path%3D{schema}") as conn:
            rows = conn.execute("SELECT count(*) FROM blacklist").fetchone()
        print(f"machine: {machine()}")
        print(f"optout import of {n:,} numbers: {elapsed:.1f} s ({n / elapsed:,.0f}/s); exit {out.returncode}; "
              f"{out.stdout.strip()}; PostgreSQL rows {rows[0] if rows else 0:,}; "
              f"Redis set {r.scard('blacklist:numbers'):,}")
    finally:
        r.flushdb()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
