"""Bulk import and export: the cheap E.164 path agrees with the full parse, imports resume without duplicates,
the chain stays intact, Redis follows, exports stream what the row-by-row export wrote."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import phonenumbers
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import admin, bulk
from agent.constants import BLACKLIST_SET, BLACKLIST_VIEW, Source
from agent.core import Core, open_core
from agent.errors import InvalidPhoneNumber
from agent.phone import canonical_e164, normalise, normalise_many
from agent.settings import Settings
from tests.conftest import make_record

CODES = sorted({str(c) for c in phonenumbers.COUNTRY_CODE_TO_REGION_CODE} | {"999", "0", "42", "2"})


def _full(raw: str, region: str) -> str:
    try:
        return normalise(raw, region=region, field="phone")
    except InvalidPhoneNumber as exc:
        return f"error: {exc}"


def _fast(raw: str, region: str) -> str:
    [result] = normalise_many([raw], region=region, field="phone")
    return result if isinstance(result, str) else f"error: {result}"


numbers = st.one_of(
    st.builds(lambda code, zero, rest: f"+{code}{zero}{rest}", st.sampled_from(CODES), st.sampled_from(["", "0", "00"]),
              st.text("0123456789", max_size=16)),
    st.builds(lambda rest: f"+1{rest}", st.text("0123456789", max_size=14)),
    st.text("0123456789", min_size=1, max_size=14),
    st.text("+0123456789 -()", max_size=20),
    st.text(max_size=20),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=numbers, region=st.sampled_from(["IL", "US", "GB", "IT", "DE", "AR"]))
@example(raw="+4402071234567", region="GB")
@example(raw="+442071234567", region="US")
@example(raw="+14155550123", region="IL")
@example(raw="+11155550123", region="US")
@example(raw="+9991234567", region="US")
@example(raw="+390612345678", region="IL")
@example(raw="+12", region="US")
@example(raw="+1415555012345", region="US")
@example(raw=" +972501234567 ", region="IL")
@example(raw="+\uff15\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17", region="IL")  # full-width digits
def test_e164_fast_path_agrees_with_the_full_parse(raw: str, region: str) -> None:
    assert _fast(raw, region) == _full(raw, region)


def test_canonical_e164_rows_skip_the_parse_and_others_do_not() -> None:
    for e164 in ("+14155550123", "+442071234567", "+972501234567", "+390612345678", "+80012345678"):
        assert canonical_e164(e164) == e164
    for other in ("+4402071234567", "+11155550123", "+9991234567", "0501234567", "+1 415 555 0123", "+12"):
        assert canonical_e164(other) is None


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(st.just(""), st.just("+14155550123"), st.just("0501234567"), st.just("x,\"y"),
                                st.text("0123456789+,\" ", max_size=12)), max_size=40),
       size=st.integers(1, 64), skip=st.integers(0, 45), header=st.booleans(), crlf=st.booleans(),
       final_newline=st.booleans())
def test_blocks_read_every_line_once_with_its_number(lines: list[str], size: int, skip: int, header: bool,
                                                      crlf: bool, final_newline: bool) -> None:
    end = "\r\n" if crlf else "\n"
    text = end.join((["name,phone"] if header else []) + lines) + (end if final_newline else "")
    blocks = bulk.file_blocks(io.BytesIO(text.encode()), skip_through=skip, size=size)
    first = next(blocks)
    assert isinstance(first, int)
    column = None if first < 0 else first
    got: list[tuple[int, Any]] = []
    for item in blocks:
        assert not isinstance(item, int)
        block = bulk._parse_block(item[0], item[1], item[2], column, "IL")
        got += [(n, "bad") for n, _ in block.bad] + [(n, "good") for n in block.good]  # type: ignore[misc]
    all_lines = text.split(end)
    if all_lines and all_lines[-1] == "":
        all_lines.pop()
    expected_rows = 0
    for lineno, line in enumerate(all_lines, 1):
        if (header and lineno == 1) or lineno <= skip:
            continue
        if bulk.row_value(line, column) is not None:
            expected_rows += 1
    assert len(got) == expected_rows
    assert all(isinstance(n, str) or n > max(skip, 1 if header else 0) for n, _ in got)


# --- imports through the core, as the CLI runs them ---------------------------------------------------
@pytest.fixture(params=["postgres", "sqlite"])
async def core(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> AsyncIterator[Core]:
    kwargs: dict[str, Any] = {}
    if request.param == "postgres":
        kwargs["database_url"] = request.getfixturevalue("pg_dsn")
    settings_ = Settings(optout_default_region="IL", redis_url=redis_url, optout_db_path=tmp_path / "store.db",
                         optout_journal_path=tmp_path / "journal.db", **kwargs)
    async with AsyncExitStack() as stack:
        c = await open_core(settings_, stack)
        await c.store.migrate()
        yield c


def _write(path: Path, count: int, *, start: int = 0) -> None:
    with path.open("w") as fh:
        fh.write("phone\n")
        fh.writelines(f"+97250{i:07d}\n" if i % 2 else f"05{i % 10}{i:07d}\n" for i in range(start, start + count))


async def _import(core: Core, path: Path, **kwargs: Any) -> bulk.ImportReport:
    with path.open("rb") as fh:
        return await bulk.import_numbers(core, fh, name=path.name, source=Source.ADMIN_IMPORT, reason="bulk",
                                          actor="tester", block_bytes=4096, workers=2, **kwargs)


async def _audit_rows(core: Core) -> int:
    return len([r async for r in core.store.actions()])


async def test_interrupted_import_resumes_where_it_stopped_without_duplicates(core: Core, tmp_path: Path,
                                                                             redis_sync: redis.Redis) -> None:
    path = tmp_path / "numbers.csv"
    _write(path, 3000)
    calls = 0
    task = asyncio.current_task()

    def interrupt(p: bulk.ImportProgress) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # what Ctrl-C does to the CLI, between two batches

    with pytest.raises(KeyboardInterrupt):
        await _import(core, path, progress=interrupt)
    assert task is not None and not task.cancelled()
    stored = len([n for b in [b async for b in core.store.entries()] for n in b])
    assert 0 < stored < 3000
    again = await _import(core, path)
    assert again.resumed_after > 1 and again.added_before == stored
    assert again.added == 3000 - stored and again.already == 0 and again.bad_count == 0
    assert again.read == 3000 - (again.resumed_after - 1)
    assert await _audit_rows(core) == 3000, "one audit row per number, none twice"
    assert (await admin.verify_chain(core)).intact
    assert redis_sync.scard(BLACKLIST_SET) == 3001  # and the sentinel
    assert int(redis_sync.hget(BLACKLIST_VIEW, "seq") or 0) == (await core.store.chain_head())[0]
    # A finished file imported again starts over (nothing new to add) and says so nowhere.
    third = await _import(core, path)
    assert third.resumed_after == 0 and third.added == 0 and third.already == 3000


async def test_an_import_is_visible_in_redis_when_it_returns_with_other_writers_between(
        core: Core, tmp_path: Path, redis_sync: redis.Redis) -> None:
    path = tmp_path / "numbers.csv"
    _write(path, 2000)
    report = await _import(core, path)
    assert report.added == 2000 and report.cache_error is None
    assert int(redis_sync.hget(BLACKLIST_VIEW, "seq") or 0) == 2000
    # Another writer's change between two imports: the keeper applies both in store order.
    await core.store.write([make_record("+14155550123")])
    other = tmp_path / "other.csv"
    _write(other, 500, start=5000)
    report = await _import(core, other)
    assert report.added == 500 and report.cache_error is None
    assert redis_sync.sismember(BLACKLIST_SET, "+14155550123")
    assert redis_sync.scard(BLACKLIST_SET) == 2000 + 1 + 500 + 1
    assert int(redis_sync.hget(BLACKLIST_VIEW, "seq") or 0) == (await core.store.chain_head())[0]
    entry = json.loads(redis_sync.get("blacklist:+972500000001") or "{}")
    assert entry["source"] == "admin_import" and entry["reason"] == "bulk"


async def test_a_nul_line_stops_the_import_after_the_rows_before_it(core: Core, tmp_path: Path) -> None:
    path = tmp_path / "numbers.csv"
    _write(path, 1000)
    with path.open("ab") as fh:
        fh.write(b"+97250\x0012\n+972509999999\n")
    report = await _import(core, path)
    assert report.stopped == "line 1002: holds NUL bytes: the file is binary, not UTF-8 text"
    assert report.added == 1000


async def test_exports_stream_what_the_row_by_row_export_wrote(core: Core, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    await core.store.write([make_record("+14155550123"), make_record("+14155550124", campaign=None)])
    path = tmp_path / "numbers.csv"
    _write(path, 300)
    await _import(core, path)

    async def both(kind: str) -> tuple[bytes, bytes]:
        def run() -> AsyncIterator[bytes]:
            if kind == "audit":
                return bulk.export_audit_csv(core, campaign_id=None, number_prefix="+972")
            return bulk.export_csv(core)

        fast = b"".join([c async for c in run()])
        with monkeypatch.context() as m:
            m.setattr(core.store, "blacklist_csv", lambda: None)
            m.setattr(core.store, "actions_csv", lambda *a, **k: None)
            slow = b"".join([c async for c in run()])
        return fast, slow

    for kind in ("blacklist", "audit"):
        fast, slow = await both(kind)
        fast_rows = sorted(csv.reader(io.StringIO(fast.decode(), newline="")))
        slow_rows = sorted(csv.reader(io.StringIO(slow.decode(), newline="")))
        assert len(fast_rows) == len(slow_rows) == (303 if kind == "blacklist" else 301)
        for a, b in zip(fast_rows, slow_rows, strict=True):
            if kind == "blacklist" and a[4] and a[0] != "phoneNumber":
                assert json.loads(a[4]) == json.loads(b[4])  # jsonb's spacing on PostgreSQL
                a, b = a[:4], b[:4]
            assert a == b
        assert fast.count(b"\r\n") == len(fast_rows)


# --- the CLI killed mid-file -------------------------------------------------------------------------
def test_import_killed_mid_file_is_finished_by_a_rerun(pg_dsn: str, redis_url: str, tmp_path: Path,
                                                      redis_sync: redis.Redis) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_", "OPTOUT_"))}
    env.update(DATABASE_URL=pg_dsn, REDIS_URL=redis_url, OPTOUT_DEFAULT_REGION="IL",
               OPTOUT_JOURNAL_PATH=str(tmp_path / "journal.db"))
    cli = [sys.executable, "-m", "agent.cli"]
    assert subprocess.run([*cli, "migrate"], env=env, capture_output=True, timeout=60).returncode == 0
    path = tmp_path / "numbers.csv"
    _write(path, 400_000)
    proc = subprocess.Popen([*cli, "import", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT last_line FROM optout_imports").fetchone()
            if row and row[0] > 0:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        first = conn.execute("SELECT count(*) FROM blacklist").fetchone()
    assert first is not None and 0 < first[0] < 400_000, "killed mid-file"
    rerun = subprocess.run([*cli, "import", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed after line" in rerun.stderr and "already listed 0" in rerun.stdout
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        counts = conn.execute("SELECT (SELECT count(*) FROM blacklist), (SELECT count(*) FROM optout_actions),"
                              " (SELECT count(DISTINCT phone_number) FROM optout_actions)").fetchone()
    assert counts == (400_000, 400_000, 400_000)
    assert redis_sync.scard(BLACKLIST_SET) == 400_001
    verify = subprocess.run([*cli, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "chain intact: 400000 rows" in verify.stdout
