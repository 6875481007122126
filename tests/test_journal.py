"""The durable journal: fsynced appends, duplicates recognised, state survives a new process."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.journal import AppendResult, Journal
from agent.sqlite_db import transaction
from tests.conftest import make_record


async def test_append_is_new_then_pending_then_stored(journal: Journal) -> None:
    rec = make_record()
    assert await journal.append(rec) is AppendResult.NEW
    assert await journal.append(rec) is AppendResult.PENDING
    await journal.mark_stored([rec.event_id])
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
        await j.mark_stored([a.event_id])
        assert [r.event_id for r in await j.unpublished()] == [a.event_id, b.event_id]
        await j.mark_published([a.event_id])
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
