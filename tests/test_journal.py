"""The durable journal: fsynced appends, duplicates recognised, state survives a new process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from agent.journal import AppendResult, Journal
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
