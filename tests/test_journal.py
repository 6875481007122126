"""The durable journal: fsynced appends, duplicates recognised, state survives a new process."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.journal import (
    PARK_AFTER,
    Append,
    AppendResult,
    Failed,
    Journal,
    Mark,
    PublishState,
    Replace,
    StoreState,
    Unpark,
)
from agent.sqlite_db import transaction
from tests.conftest import make_record


async def test_append_is_new_then_pending_then_stored(journal: Journal) -> None:
    rec = make_record()
    assert await journal.append(rec) is AppendResult.NEW
    assert await journal.append(rec) is AppendResult.PENDING
    await journal.mark([rec.event_id], StoreState.STORED)
    assert await journal.append(rec) is AppendResult.STORED
    assert await journal.depth() == 0


async def test_concurrent_appends_are_group_committed_and_all_durable(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    records = [make_record(f"+97250123{i:04d}") for i in range(300)]
    async with Journal(path) as j:
        results = await asyncio.gather(*(j.append(r) for r in records))
    assert results == [AppendResult.NEW] * 300
    async with Journal(path) as j:
        pending = await j.unstored(limit=1000)
    assert {r.event_id for r in pending} == {r.event_id for r in records}


def test_unstored_records_are_seen_by_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    rec = make_record()

    async def write() -> None:
        async with Journal(path) as j:
            await j.append(rec)

    asyncio.run(write())
    code = (
        "import asyncio, sys; from pathlib import Path; from agent.journal import Journal\n"
        "async def main():\n"
        f"    async with Journal(Path({str(path)!r})) as j:\n"
        "        print(','.join(r.event_id for r in await j.unstored()))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == rec.event_id


async def test_replace_keeps_hangup_info_for_the_replayer(journal: Journal) -> None:
    from agent.optout import HangupInfo

    rec = make_record()
    await journal.append(rec)
    await journal.replace(rec.model_copy(update={"hangup": HangupInfo(method="ari", result="ok")}))
    [again] = await journal.unstored()
    assert again.hangup is not None and again.hangup.method == "ari"


async def test_publish_outbox_lists_unpublished_records_stored_or_not(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", publish=True) as j:
        a, b = make_record("+972501234567"), make_record("+972501234568")
        await j.append(a)
        await j.append(b)
        await j.mark([a.event_id], StoreState.STORED)
        assert [r.event_id for r in await j.unpublished()] == [a.event_id, b.event_id]
        await j.mark([a.event_id], PublishState.PUBLISHED)
        assert [r.event_id for r in await j.unpublished()] == [b.event_id]


def test_an_append_survives_sigkill_before_its_fsync(tmp_path: Path) -> None:
    """Relaxed mode: once append() returned (page cache, no fsync yet), a SIGKILL of the agent loses nothing."""
    path = tmp_path / "j.db"
    code = (
        "import asyncio, os, signal; from pathlib import Path; from agent.journal import Journal\n"
        "from tests.conftest import make_record\n"
        "async def main():\n"
        f"    j = Journal(Path({str(path)!r}), sync='relaxed')\n"
        "    await j.open()\n"
        "    for i in range(50):\n"
        "        await j.append(make_record(f'+97250123{i:04d}', event_id=f'ev-{i}'))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == -9, out.stderr

    async def read() -> set[str]:
        async with Journal(path) as j:
            return {r.event_id for r in await j.unstored(limit=100)}

    assert asyncio.run(read()) == {f"ev-{i}" for i in range(50)}


async def test_strict_and_relaxed_modes_both_sync(tmp_path: Path) -> None:
    for mode in ("strict", "relaxed"):
        async with Journal(tmp_path / f"{mode}.db", sync=mode) as j:  # type: ignore[arg-type]
            assert j.mode == mode
            await asyncio.gather(*(j.append(make_record(f"+97250123{i:04d}")) for i in range(20)))
            await asyncio.gather(*(j.sync() for _ in range(20)))  # concurrent callers share one fsync
            assert await j.depth() == 20


async def test_parked_records_are_listed_and_can_be_given_back(journal: Journal) -> None:
    rec = make_record()
    await journal.append(rec)
    assert not await journal.mark_failed(rec.event_id, "refused", rejected=True)
    assert not await journal.mark_failed(rec.event_id, "connection lost")  # not the record's fault
    assert not await journal.mark_failed(rec.event_id, "refused", rejected=True)
    assert await journal.mark_failed(rec.event_id, "refused", rejected=True)
    [parked] = await journal.parked()
    assert parked.event_id == rec.event_id and parked.last_error == "refused" and parked.kind == "store"
    assert await journal.unstored() == []
    assert await journal.unstored_numbers() == [(rec.event_id, rec.phone_number)], \
        "a parked number stays visible to dialers"
    assert await journal.holding([rec.phone_number or "", "+15550000000"]) == {rec.phone_number}
    assert await journal.unpark() == 1
    assert [r.event_id for r in await journal.unstored()] == [rec.event_id]


async def test_a_journal_from_the_previous_version_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    rec = make_record()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE journal (event_id TEXT PRIMARY KEY, record TEXT NOT NULL, journaled_at TEXT NOT NULL,"
                 " stored INTEGER NOT NULL DEFAULT 0, published INTEGER NOT NULL DEFAULT 0,"
                 " attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)")
    conn.execute("INSERT INTO journal (event_id, record, journaled_at) VALUES (?, ?, '2026-01-01T00:00:00+00:00')",
                 (rec.event_id, rec.to_json()))
    conn.commit()
    conn.close()
    async with Journal(path) as j:
        assert [r.event_id for r in await j.unstored()] == [rec.event_id]
        assert await j.append(make_record("+972521234567")) is AppendResult.NEW
        assert await j.parked() == []


def test_a_failed_commit_never_leaves_the_connection_inside_a_transaction(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.executescript("PRAGMA foreign_keys=ON; CREATE TABLE p (id INTEGER PRIMARY KEY);"
                       "CREATE TABLE c (p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);")
    with pytest.raises(sqlite3.IntegrityError), transaction(conn):
        conn.execute("INSERT INTO c VALUES (1)")  # checked at COMMIT: the COMMIT fails
    assert not conn.in_transaction
    with transaction(conn):
        conn.execute("INSERT INTO p VALUES (1)")
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (1,)


def _states(path: Path) -> dict[str, tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {e: (s, p) for e, s, p in conn.execute("SELECT event_id, store_state, publish_state FROM journal")}


async def test_a_version_3_journal_is_rebuilt_with_states_by_name_and_loses_nothing(tmp_path: Path) -> None:
    path, records = tmp_path / "v3.db", [make_record(f"+97250123456{i}", event_id=f"ev-{i}") for i in range(5)]
    old = [(1, 1, 0, 0), (0, 0, 0, 1), (0, 2, 1, 3), (1, 2, 0, 0), (0, 1, 0, 2)]  # stored, published, parked, refusals
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(  # the version 3 schema, as it was
            "CREATE TABLE journal (event_id TEXT PRIMARY KEY, record TEXT NOT NULL, journaled_at TEXT NOT NULL,"
            " stored INTEGER NOT NULL DEFAULT 0, published INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL"
            " DEFAULT 0, last_error TEXT, parked INTEGER NOT NULL DEFAULT 0, refusals INTEGER NOT NULL DEFAULT 0,"
            " phone_number TEXT, source_event_id TEXT);"
            "CREATE INDEX journal_unstored ON journal (stored) WHERE stored = 0;"
            "CREATE INDEX journal_unpublished ON journal (published) WHERE published = 0;"
            "CREATE TABLE journal_probe (id INTEGER PRIMARY KEY, at TEXT NOT NULL); PRAGMA user_version = 3;")
        conn.executemany("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?,?,?,?)", [
            (r.event_id, r.to_json(), f"2026-01-01T00:00:0{i}+00:00", *o[:2], i, "refused" if o[2] else None,
             *o[2:], r.phone_number, r.source_event_id) for i, (r, o) in enumerate(zip(records, old, strict=True))])
        conn.commit()
    async with Journal(path, publish=True) as j:
        assert _states(path) == {"ev-0": ("STORED", "PUBLISHED"), "ev-1": ("PENDING", "PENDING"),
                                 "ev-2": ("PARKED", "REFUSED"), "ev-3": ("STORED", "REFUSED"),
                                 "ev-4": ("PENDING", "PUBLISHED")}
        assert [r.event_id for r in await j.unstored()] == ["ev-1", "ev-4"]
        assert [r.event_id for r in await j.unpublished()] == ["ev-1"]
        assert [(p.event_id, p.kind, p.attempts) for p in await j.parked()] == [
            ("ev-2", "store", 2), ("ev-3", "sns", 3)]
        assert await j.depth() == 3 and {e for e, _ in await j.unstored_numbers()} == {"ev-1", "ev-2", "ev-4"}
        assert await j.append(records[0]) is AppendResult.STORED and await j.append(records[2]) is AppendResult.PENDING
        assert await j.unpark(["ev-2"]) == 2, "parked by the store and refused by SNS: both given back"
        assert [r.event_id for r in await j.unstored()] == ["ev-1", "ev-2", "ev-4"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")} \
            == {"journal_unstored", "journal_unpublished", "journal_unstored_number", "journal_source"}
        assert conn.execute("SELECT count(*) FROM journal").fetchone() == (5,)


async def test_each_transition_moves_the_row_states_named_in_the_enums(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    stored, refused, unsent = make_record("+972501234567"), make_record("+972501234568"), make_record("+972501234569")
    async with Journal(path, publish=True) as j:
        for rec in (stored, refused, unsent):
            assert await j.append(rec) is AppendResult.NEW
        assert set(_states(path).values()) == {(StoreState.PENDING.name, PublishState.PENDING.name)}
        await j.mark([stored.event_id], StoreState.STORED)
        await j.mark([stored.event_id], PublishState.PUBLISHED)
        await j.mark([unsent.event_id], PublishState.REFUSED)
        assert [await j.mark_failed(refused.event_id, "no", rejected=True) for _ in range(PARK_AFTER)] \
            == [False] * (PARK_AFTER - 1) + [True]
        assert _states(path) == {stored.event_id: ("STORED", "PUBLISHED"), refused.event_id: ("PARKED", "PENDING"),
                                 unsent.event_id: ("PENDING", "REFUSED")}
        assert await j.unpublished() == [refused] and await j.unstored() == [unsent]
        assert await j.unpark() == 2, "one row back to the replayer, one back to the outbox"
        assert {r.event_id for r in await j.unpublished()} == {refused.event_id, unsent.event_id}
        assert {r.event_id for r in await j.unstored()} == {refused.event_id, unsent.event_id}
        assert await j.prune(timedelta(0)) == 1 and stored.event_id not in _states(path)
    async with Journal(tmp_path / "quiet.db", publish=False) as j:
        await j.append(stored)
        assert _states(tmp_path / "quiet.db") == {stored.event_id: ("PENDING", "NOT_NEEDED")}
        assert await j.unpublished() == []


async def test_strict_mode_fsyncs_only_batches_holding_a_durable_operation(tmp_path: Path) -> None:
    assert Append.durable and Replace.durable and not (Mark.durable or Failed.durable or Unpark.durable)
    async with Journal(tmp_path / "j.db", sync="strict") as j:
        def synchronous() -> Awaitable[int]:  # 2 = FULL, 1 = NORMAL
            return j._db.run(lambda c: int(c.execute("PRAGMA synchronous").fetchone()[0]))

        rec = make_record()
        await j.append(rec)
        assert await synchronous() == 2
        await j.mark([rec.event_id], StoreState.STORED)
        assert await synchronous() == 1
        await j.replace(rec)
        assert await synchronous() == 2
