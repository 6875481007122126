"""Housekeeping: journal retention and the audit chain's head in the logs."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from agent.housekeeping import Housekeeping
from agent.journal import Journal, PublishState
from agent.pipeline import OptOutPipeline, Status
from agent.store import Store
from tests.conftest import make_record


async def test_housekeeping_prunes_old_stored_and_published_rows_and_logs_the_chain_head(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    async with Journal(tmp_path / "j.db", publish=True) as journal:
        pipeline = OptOutPipeline(journal=journal, store=store, cache=None)
        done, unpublished = make_record("+972501234567"), make_record("+972501234568")
        for record in (done, unpublished):
            assert (await pipeline.submit(record)).status is Status.STORED
        await journal.mark([done.event_id], PublishState.PUBLISHED)
        upkeep = Housekeeping(journal=journal, store=store, retention=timedelta(0))
        await asyncio.sleep(0.01)
        caplog.set_level(logging.INFO, logger="agent.housekeeping")
        assert await upkeep.prune() == 1, "only the row both stored and published goes"
        assert [r.event_id for r in await journal.unpublished()] == [unpublished.event_id]
        await upkeep.log_head()
        row, head = await store.chain_head()
        assert head is not None and row >= 2
        assert any(r.getMessage() == f"audit chain head {head} at row {row}" for r in caplog.records)
