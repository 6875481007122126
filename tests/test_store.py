"""Store behaviour, run against PostgreSQL and the embedded SQLite store alike."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.audit import GENESIS, ChainVerifier
from agent.constants import Origin, Outcome, Source
from agent.errors import SchemaMissing, StoreRejected
from agent.optout import OptOutRecord
from agent.store import Removal, RemoveResult, Store, admin_row
from agent.store_postgres import PostgresStore
from agent.store_sqlite import SqliteStore
from tests.conftest import make_record


def sql(store: Store, pg_dsn: str, statement: str, *, superuser: bool = False) -> list[tuple[Any, ...]]:
    """Run SQL straight against the store's database, as an operator (or an attacker) would."""
    if isinstance(store, PostgresStore):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            if superuser:
                conn.execute("SET session_replication_role = replica")  # triggers off: what a superuser can do
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(store._db.path)  # type: ignore[attr-defined]
    try:
        if superuser:
            conn.execute("DROP TRIGGER IF EXISTS optout_actions_no_update")
            conn.execute("DROP TRIGGER IF EXISTS optout_actions_no_delete")
        rows = conn.execute(statement).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


async def campaign_count(store: Store, pg_dsn: str, campaign: str) -> int:
    rows = sql(store, pg_dsn, f"SELECT optouts FROM campaign_optouts WHERE campaign_id = '{campaign}'")
    return int(rows[0][0]) if rows else 0


async def verify(store: Store, head: str | None = None) -> Any:
    verifier = ChainVerifier(expected_head=head)
    async for row in store.chain_rows():
        if not verifier.feed(row.columns()):
            break
    return verifier.report()


async def test_migrate_twice_applies_nothing_the_second_time(store: Store) -> None:
    assert await store.migrate() == []
    await store.require_schema()


async def test_optout_adds_number_and_audit_row_in_one_go(store: Store, pg_dsn: str) -> None:
    rec = make_record()
    [res] = await store.write([rec])
    assert not res.duplicate and res.outcome is Outcome.BLACKLISTED
    assert await store.blacklisted(["+972501234567", "+972501234568"]) == {"+972501234567"}
    [row] = await store.history("+972501234567")
    assert row.event_id == rec.event_id and row.origin == "ari" and row.outcome == "blacklisted"
    assert row.call_id == "call-1" and row.digit == "9"
    assert row.prev_hash == GENESIS and len(row.row_hash) == 64
    assert await campaign_count(store, pg_dsn, "camp-1") == 1


async def test_same_event_twice_changes_nothing(store: Store, pg_dsn: str) -> None:
    rec = make_record()
    await store.write([rec])
    [again] = await store.write([rec])
    assert again.duplicate
    assert len(await store.history(rec.phone_number or "")) == 1
    assert await campaign_count(store, pg_dsn, "camp-1") == 1


async def test_second_optout_for_listed_number_keeps_first_added_at(store: Store) -> None:
    first = make_record()
    await store.write([first])
    later = make_record().model_copy(update={"received_at": first.received_at + timedelta(days=3)})
    [res] = await store.write([later])
    assert res.outcome is Outcome.ALREADY_BLACKLISTED
    [[entry]] = [batch async for batch in store.entries()]
    assert abs(entry.added_at - first.received_at) < timedelta(milliseconds=1)
    assert [r.outcome for r in await store.history(first.phone_number or "")] == [
        "blacklisted", "already_blacklisted"]


async def test_number_unknown_optout_is_audited_without_blacklisting(store: Store) -> None:
    rec = make_record().model_copy(update={"phone_number": None, "channel": {"id": "chan-1", "caller": "anon"}})
    [res] = await store.write([rec])
    assert res.outcome is Outcome.NUMBER_UNKNOWN
    assert [b async for b in store.entries()] == []


async def test_removal_is_audited_with_who_and_why(store: Store) -> None:
    rec = make_record()
    await store.write([rec])
    now = datetime.now(UTC)
    assert await store.remove(Removal("+972501234567", "customer consented again", "alice", "rm-1", now,
                                      seen_seq=await store.head())) is RemoveResult.REMOVED
    assert await store.blacklisted(["+972501234567"]) == set()
    history = await store.history("+972501234567")
    assert history[-1].outcome == "removed"
    assert history[-1].actor == "alice" and history[-1].reason == "customer consented again"
    assert await store.remove(Removal("+972501234567", "again", "alice", "rm-2", now,
                                      seen_seq=await store.head())) is RemoveResult.NOT_LISTED


async def test_redelivered_event_after_removal_does_not_relist(store: Store) -> None:
    rec = make_record()
    await store.write([rec])
    await store.remove(Removal("+972501234567", "consent", "alice", "rm-1", datetime.now(UTC),
                               seen_seq=await store.head()))
    [again] = await store.write([rec])
    assert again.duplicate
    assert await store.blacklisted(["+972501234567"]) == set()


async def test_import_adds_new_numbers_and_audits_each(store: Store) -> None:
    await store.write([make_record("+972501234567")])
    numbers = ["+972501234567", "+972501234568", "+972501234569", "+972501234569"]
    batch = await store.import_batch(numbers, added_at=datetime.now(UTC), reason="imported",
                                     source=Source.ADMIN_IMPORT, actor="bob")
    assert len(batch.added) == 2 and batch.last_seq == batch.after_seq + 2
    assert len(await store.blacklisted(numbers)) == 3
    [row] = await store.history("+972501234568")
    assert row.origin == "admin" and row.actor == "bob"
    assert (await verify(store)).intact


async def test_audit_export_filters_by_campaign_and_prefix(store: Store) -> None:
    await store.write([make_record("+972501234567", campaign="a"), make_record("+14155550123", campaign="b")])
    assert [r.campaign_id async for r in store.actions(campaign_id="b")] == ["b"]
    assert [r.phone_number async for r in store.actions(number_prefix="+972")] == ["+972501234567"]
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert [r async for r in store.actions(since=later)] == []
    assert len([r async for r in store.actions(until=later)]) == 2


async def test_entries_stream_in_batches(store: Store) -> None:
    numbers = [f"+97250{i:07d}" for i in range(2500)]
    await store.import_batch(numbers, added_at=datetime.now(UTC), reason="r", source=Source.COMPLIANCE, actor="t")
    batches = [b async for b in store.entries(batch_size=1000)]
    assert [len(b) for b in batches] == [1000, 1000, 500]


async def test_audit_rows_refuse_update_and_delete(store: Store, pg_dsn: str) -> None:
    await store.write([make_record()])
    if isinstance(store, PostgresStore):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for statement in ("UPDATE optout_actions SET outcome = 'x'", "DELETE FROM optout_actions",
                              "TRUNCATE optout_actions"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                    conn.execute(statement)
    else:
        for statement in ("UPDATE optout_actions SET outcome = 'x'", "DELETE FROM optout_actions"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                sql(store, pg_dsn, statement)
    assert len(await store.history("+972501234567")) == 1


async def test_batch_of_records_is_one_transaction(store: Store) -> None:
    records = [make_record(f"+9725012{i:05d}", event_id=f"ev-{uuid.uuid4()}") for i in range(50)]
    results = await store.write(records + records[:5])
    assert sum(not r.duplicate for r in results) == 50
    assert sum(r.duplicate for r in results) == 5


def test_admin_record_shape() -> None:
    rec = OptOutRecord(event_id="x", phone_number="+972501234567", origin=Origin.ADMIN,
                       received_at=datetime.now(UTC))
    assert rec.entry().source is Source.USER_OPTOUT


# --- the change feed the cache follows ------------------------------------------------------------------
async def test_every_blacklist_change_gets_a_sequence_in_commit_order(store: Store) -> None:
    assert await store.head() == 0
    await store.write([make_record("+972501234567"), make_record("+972501234568")])
    await store.write([make_record().model_copy(update={"phone_number": None})])  # no change of the list
    await store.remove(Removal("+972501234567", "consent", "alice", "rm-1", datetime.now(UTC),
                               seen_seq=await store.head()))
    head = await store.head()
    changes = await store.changes(0, head)
    assert [(c.phone_number, c.op) for c in changes] == [
        ("+972501234567", "add"), ("+972501234568", "add"), ("+972501234567", "remove")]
    assert [c.seq for c in changes] == sorted(c.seq for c in changes) and changes[-1].seq == head
    assert await store.changes(changes[0].seq, head, limit=1) == [changes[1]]
    assert changes[0].entry is not None and json.loads(changes[0].entry)["metadata"] == {
        "callId": "call-1", "campaignId": "camp-1", "contactId": "contact-1", "timestamp": "2024-01-15T10:30:00Z"}


async def test_a_reader_of_an_unmigrated_store_is_told_so(tmp_path: Path) -> None:
    missing = SqliteStore(tmp_path / "nowhere" / "optout.db", create=False)
    with pytest.raises(SchemaMissing, match="optout migrate"):
        await missing.open()
    async with SqliteStore(tmp_path / "empty.db") as empty:
        with pytest.raises(SchemaMissing, match="optout migrate"):
            await empty.require_schema()


# --- the tamper-evident chain --------------------------------------------------------------------------
async def test_chain_covers_every_kind_of_write(store: Store) -> None:
    await store.write([make_record("+972501234567"), make_record("+972501234568")])
    await store.remove(Removal("+972501234567", "consent", "alice", "rm-1", datetime.now(UTC),
                               seen_seq=await store.head()))
    await store.import_batch(["+14155550123"], added_at=datetime.now(UTC), reason="r", source=Source.COMPLIANCE,
                               actor="bob")
    now = datetime.now(UTC)
    await store.append_action(admin_row(event_id="prevented-1", phone_number="+972501234568",
                                        outcome=Outcome.PREVENTED, at=now, recorded_at=now, actor=None,
                                        reason="call prevented", origin="ari"))
    report = await verify(store)
    row, head = await store.chain_head()
    assert report.intact and report.rows == 5 and report.head == head and row == await store.head()


@pytest.mark.parametrize("tamper", ["change", "delete", "insert"])
async def test_tampering_by_a_superuser_is_found_at_its_row(store: Store, pg_dsn: str, tamper: str) -> None:
    for i in range(5):
        await store.write([make_record(f"+97250123456{i}")])
    ids = [r[0] for r in sql(store, pg_dsn, "SELECT id FROM optout_actions ORDER BY id")]
    if tamper == "change":
        sql(store, pg_dsn, f"UPDATE optout_actions SET phone_number = '+972509999999' WHERE id = {ids[2]}",
            superuser=True)
        broken = ids[2]
    elif tamper == "delete":
        sql(store, pg_dsn, f"DELETE FROM optout_actions WHERE id = {ids[2]}", superuser=True)
        broken = ids[3]
    else:
        sql(store, pg_dsn, "INSERT INTO optout_actions (event_id, phone_number, origin, received_at, outcome,"
                           f" prev_hash, row_hash) SELECT 'forged', '+972508888888', 'admin', received_at, 'removed',"
                           f" prev_hash, row_hash FROM optout_actions WHERE id = {ids[4]}", superuser=True)
        broken = max(r[0] for r in sql(store, pg_dsn, "SELECT id FROM optout_actions"))
    report = await verify(store)
    assert not report.intact and report.broken_at == broken, report


async def test_an_exported_head_proves_the_chain_was_not_cut_back(store: Store, pg_dsn: str) -> None:
    await store.write([make_record("+972501234560")])
    await store.write([make_record("+972501234561")])
    _, exported = await store.chain_head()
    assert (await verify(store, exported)).head_found_at is not None
    last = max(r[0] for r in sql(store, pg_dsn, "SELECT id FROM optout_actions"))
    sql(store, pg_dsn, f"DELETE FROM optout_actions WHERE id = {last}", superuser=True)
    await store.write([make_record("+972501234562")])  # the chain goes on from the row before the deleted one
    report = await verify(store, exported)
    assert report.intact, "each row still follows the one before it..."
    assert report.head_found_at is None, "...but the head exported earlier is gone: the chain was cut back"


async def test_concurrent_writers_keep_one_chain(store: Store, pg_dsn: str, tmp_path: Path) -> None:
    """Several connections (as several agents would) appending at once still make one intact chain."""
    others: list[Store] = [
        PostgresStore(pg_dsn) if isinstance(store, PostgresStore) else SqliteStore(store._db.path)  # type: ignore[attr-defined]
        for _ in range(3)
    ]
    for other in others:
        await other.open()
    try:
        writers = [store, *others]
        await asyncio.gather(*(
            w.write([make_record(f"+9725{n:08d}") for n in range(i * 1000 + j * 10, i * 1000 + j * 10 + 10)])
            for i, w in enumerate(writers) for j in range(8)
        ))
    finally:
        for other in others:
            await other.close()
    report = await verify(store)
    assert report.intact and report.rows == 4 * 8 * 10


async def test_a_record_the_store_cannot_hold_is_refused_not_unavailable(store: Store) -> None:
    # PostgreSQL cannot hold a NUL in text, and neither store a lone surrogate; OptOutRecord cleans both on
    # construction, so this builds one past validation, as a foreign writer's bug would.
    poison = "camp\x00nul" if isinstance(store, PostgresStore) else "camp\ud800"
    bad = OptOutRecord.model_construct(**{**make_record().__dict__, "campaign_id": poison})
    with pytest.raises(StoreRejected):
        await store.write([bad])
    [ok] = await store.write([make_record("+972501234569")])
    assert ok.outcome is Outcome.BLACKLISTED


def test_a_change_row_with_an_invalid_entry_still_reaches_redis_as_an_addition() -> None:
    """A row written outside the writers (a bad `source`) must not stall the cache keeper on it forever."""
    from agent.constants import Source
    from agent.store import change_of

    at = datetime.now(UTC)
    change = change_of((7, "+972501234567", "blacklisted", at, None, "not-a-source", None, None, None, None, "e", 1))
    assert (change.op, change.phone_number, change.seq) == ("add", "+972501234567", 7)
    assert change.entry is not None and json.loads(change.entry)["source"] == Source.USER_OPTOUT.value
