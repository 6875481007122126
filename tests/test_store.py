"""Store behaviour, run against PostgreSQL and the embedded SQLite store alike."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from agent.constants import Origin, Outcome, Source
from agent.optout import OptOutRecord
from agent.store import Removal, Store
from agent.store_postgres import PostgresStore
from tests.conftest import make_record


async def test_migrate_twice_applies_nothing_the_second_time(store: Store) -> None:
    assert await store.migrate() == []


async def test_optout_adds_number_and_audit_row_in_one_go(store: Store) -> None:
    rec = make_record()
    [res] = await store.record([rec])
    assert not res.duplicate and res.outcome is Outcome.BLACKLISTED
    assert await store.blacklisted(["+972501234567", "+972501234568"]) == {"+972501234567"}
    [row] = await store.history("+972501234567")
    assert row["event_id"] == rec.event_id and row["origin"] == "ari" and row["outcome"] == "blacklisted"
    assert row["call_id"] == "call-1" and row["digit"] == "9"
    assert await store.campaign_count("camp-1") == 1


async def test_same_event_twice_changes_nothing(store: Store) -> None:
    rec = make_record()
    await store.record([rec])
    [again] = await store.record([rec])
    assert again.duplicate
    assert len(await store.history(rec.phone_number or "")) == 1
    assert await store.campaign_count("camp-1") == 1


async def test_second_optout_for_listed_number_keeps_first_added_at(store: Store) -> None:
    first = make_record()
    await store.record([first])
    later = make_record().model_copy(update={"received_at": first.received_at + timedelta(days=3)})
    [res] = await store.record([later])
    assert res.outcome is Outcome.ALREADY_BLACKLISTED
    [[entry]] = [batch async for batch in store.entries()]
    assert abs(entry.added_at - first.received_at) < timedelta(milliseconds=1)
    assert [r["outcome"] for r in await store.history(first.phone_number or "")] == [
        "blacklisted", "already_blacklisted"]


async def test_number_unknown_optout_is_audited_without_blacklisting(store: Store) -> None:
    rec = make_record().model_copy(update={"phone_number": None, "channel": {"id": "chan-1", "caller": "anon"}})
    [res] = await store.record([rec])
    assert res.outcome is Outcome.NUMBER_UNKNOWN
    assert [b async for b in store.entries()] == []


async def test_removal_is_audited_with_who_and_why(store: Store) -> None:
    rec = make_record()
    await store.record([rec])
    now = datetime.now(UTC)
    assert await store.remove(Removal("+972501234567", "customer consented again", "alice", "rm-1", now))
    assert await store.blacklisted(["+972501234567"]) == set()
    history = await store.history("+972501234567")
    assert history[-1]["outcome"] == "removed"
    assert history[-1]["actor"] == "alice" and history[-1]["reason"] == "customer consented again"
    assert not await store.remove(Removal("+972501234567", "again", "alice", "rm-2", now))


async def test_redelivered_event_after_removal_does_not_relist(store: Store) -> None:
    rec = make_record()
    await store.record([rec])
    await store.remove(Removal("+972501234567", "consent", "alice", "rm-1", datetime.now(UTC)))
    [again] = await store.record([rec])
    assert again.duplicate
    assert await store.blacklisted(["+972501234567"]) == set()


async def test_import_adds_new_numbers_and_audits_each(store: Store) -> None:
    await store.record([make_record("+972501234567")])
    numbers = ["+972501234567", "+972501234568", "+972501234569", "+972501234569"]
    assert await store.import_numbers(numbers, added_at=datetime.now(UTC), reason="imported",
                                      source=Source.ADMIN_IMPORT, actor="bob") == 2
    assert len(await store.blacklisted(numbers)) == 3
    [row] = await store.history("+972501234568")
    assert row["origin"] == "admin" and row["actor"] == "bob"


async def test_audit_export_filters_by_campaign_and_prefix(store: Store) -> None:
    await store.record([make_record("+972501234567", campaign="a"), make_record("+14155550123", campaign="b")])
    assert [r["campaign_id"] async for r in store.actions(campaign_id="b")] == ["b"]
    assert [r["phone_number"] async for r in store.actions(number_prefix="+972")] == ["+972501234567"]


async def test_entries_stream_in_batches(store: Store) -> None:
    numbers = [f"+97250{i:07d}" for i in range(2500)]
    await store.import_numbers(numbers, added_at=datetime.now(UTC), reason="r", source=Source.COMPLIANCE, actor="t")
    batches = [b async for b in store.entries(batch_size=1000)]
    assert [len(b) for b in batches] == [1000, 1000, 500]


async def test_audit_rows_refuse_update_and_delete(store: Store, pg_dsn: str, tmp_path: object) -> None:
    await store.record([make_record()])
    if isinstance(store, PostgresStore):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for sql in ("UPDATE optout_actions SET outcome = 'x'", "DELETE FROM optout_actions",
                        "TRUNCATE optout_actions"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                    conn.execute(sql)
    else:
        conn = sqlite3.connect(store._path)  # type: ignore[attr-defined]
        for sql in ("UPDATE optout_actions SET outcome = 'x'", "DELETE FROM optout_actions"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(sql)
        conn.close()
    assert len(await store.history("+972501234567")) == 1


async def test_batch_of_records_is_one_transaction(store: Store) -> None:
    records = [make_record(f"+9725012{i:05d}", event_id=f"ev-{uuid.uuid4()}") for i in range(50)]
    results = await store.record(records + records[:5])
    assert sum(not r.duplicate for r in results) == 50
    assert sum(r.duplicate for r in results) == 5


def test_admin_record_shape() -> None:
    rec = OptOutRecord(event_id="x", phone_number="+972501234567", origin=Origin.ADMIN,
                       received_at=datetime.now(UTC))
    assert rec.entry().source is Source.USER_OPTOUT


async def test_entries_since_follow_commit_order_not_added_at(store: Store) -> None:
    from datetime import timedelta

    old = make_record().model_copy(update={"received_at": datetime.now(UTC) - timedelta(days=2)})
    await store.record([old])  # a replayed opt-out: old addedAt, recorded now
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert [e.phone_number for b in [b async for b in store.entries(since=since)] for e in b] == ["+972501234567"]
