"""The store interface both backends implement (PostgreSQL, the system of record; SQLite, embedded), and the
part of every write they share: deciding outcomes and building the chained audit rows (`plan_write`).

Every write of the audit trail (opt-outs, removals, imports, prevented calls) appends under one lock, so
the audit row id is also the blacklist's change sequence, in commit order: `head()` and `changes()` are
the feed the Redis cache follows (agent/keeper.py). Both backends pass the same tests
(tests/test_store.py runs every test against each).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from importlib import resources
from typing import Any, Literal

from agent import audit
from agent.constants import CHANGE_OUTCOMES, TABLE_IMPORTS, TABLE_SCHEMA_VERSION, Outcome, Source
from agent.errors import SchemaMissing
from agent.lifecycle import Resource
from agent.optout import BlacklistEntry, OptOutRecord, entry_json, iso_z, outcome_of

log = logging.getLogger("agent.store")


@dataclass(frozen=True)
class StoreResult:
    """What storing one record did."""

    event_id: str
    duplicate: bool
    """The event id was in the audit trail already: nothing was written."""
    outcome: Outcome | None
    """The outcome written in the audit row (None for a duplicate)."""

    @property
    def newly_blacklisted(self) -> bool:
        return self.outcome is Outcome.BLACKLISTED


@dataclass(frozen=True)
class Removal:
    phone_number: str
    reason: str
    actor: str
    event_id: str
    at: datetime
    seen_seq: int
    """The store's head when the removal was asked for: an opt-out stored after it is newer and wins."""


class RemoveResult(Enum):
    """What `Store.remove` did."""

    REMOVED = "removed"
    NOT_LISTED = "not_listed"
    """The number was not on the blacklist: nothing written."""
    OPTED_OUT_SINCE = "opted_out_since"
    """An opt-out of the number was stored after `seen_seq`: it is newer than the removal, which is refused."""


@dataclass(frozen=True)
class Position:
    """A point in the store's history: a change sequence (audit row id) and the chain hash of that row (its
    lineage: the hash covers every row before it, so another history, a restored backup or a promoted replica,
    has another hash at the same sequence). Sequence 0 is the empty store, lineage ""."""

    seq: int
    lineage: str


@dataclass(frozen=True)
class StorePosition:
    head: Position
    lineage_at: str | None
    """The lineage of the row asked about (None: the store has no such row: it went back)."""


@dataclass(frozen=True)
class Change:
    """One entry of the blacklist's change feed."""

    seq: int
    phone_number: str
    op: Literal["add", "remove"]
    at: datetime
    """When the change was made (the action's receive time)."""
    entry: str | None = None
    """For an add: the entry's JSON, as dialers read it from `blacklist:{phone}`."""
    event_id: str | None = None
    visible: bool = True
    """For an add: whether the writer saw it in Redis before storing it, or nobody waits on it (an import);
    else the keeper notes when it made it visible."""


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """The versioned SQL files for `dialect`, as (version, name, sql), in order."""
    folder = resources.files("agent") / "migrations" / dialect
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.name, item.read_text(encoding="utf-8")))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {dialect} migrations share a version number: {sorted(n for _, n, _ in found)}")
    return sorted(found)


def action_row(record: OptOutRecord, outcome: Outcome, recorded_at: datetime) -> dict[str, Any]:
    """The audit row of `record` (without its hashes)."""
    hangup = record.hangup
    return {
        "event_id": record.event_id, "source_event_id": record.source_event_id,
        "phone_number": record.phone_number, "number_source": record.number_source,
        "raw_number": record.raw_number, "call_id": record.call_id, "campaign_id": record.campaign_id,
        "contact_id": record.contact_id, "origin": record.origin.value, "source": record.source.value,
        "digit": record.digit, "pressed_at": record.pressed_at, "received_at": record.received_at,
        "journaled_at": record.journaled_at, "visible_at": record.visible_at,
        "hangup_requested_at": hangup.requested_at if hangup else None,
        "hungup_at": hangup.hungup_at if hangup else None,
        "hangup_method": hangup.method if hangup else None, "hangup_result": hangup.result if hangup else None,
        "outcome": outcome.value, "actor": record.actor, "reason": record.reason, "channel": record.channel,
        "recorded_at": recorded_at, **(record.speech.columns() if record.speech else {}),
    }


def metadata_json(record: OptOutRecord) -> str | None:
    meta = record.metadata()
    return json.dumps(meta, separators=(",", ":")) if meta else None


@dataclass
class WritePlan:
    """What one `write` adds, decided before anything is written."""

    results: list[StoreResult] = field(default_factory=list)
    blacklist: list[OptOutRecord] = field(default_factory=list)
    """Records whose number is new to the blacklist."""
    actions: list[dict[str, Any]] = field(default_factory=list)
    """Audit rows, chained."""
    campaigns: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    """Campaign -> (opt-outs added, latest receive time)."""


def plan_write(
    records: Sequence[OptOutRecord], *, seen_ids: set[str], listed: set[str], head: str | None, now: datetime
) -> WritePlan:
    """Outcomes and chained audit rows for `records`, given the event ids already in the trail, the numbers
    already listed and the chain's head (all read under the writers' lock)."""
    plan = WritePlan()
    seen = set(seen_ids)
    listed = set(listed)
    for rec in records:
        if rec.event_id in seen:
            plan.results.append(StoreResult(rec.event_id, duplicate=True, outcome=None))
            continue
        seen.add(rec.event_id)
        outcome = outcome_of(rec, already_listed=rec.phone_number in listed)
        if outcome is Outcome.BLACKLISTED:
            assert rec.phone_number is not None
            listed.add(rec.phone_number)
            plan.blacklist.append(rec)
        plan.actions.append(action_row(rec, outcome, now))
        if rec.campaign_id is not None:
            count, last = plan.campaigns.get(rec.campaign_id, (0, rec.received_at))
            plan.campaigns[rec.campaign_id] = (count + 1, max(last, rec.received_at))
        plan.results.append(StoreResult(rec.event_id, duplicate=False, outcome=outcome))
    audit.chain(plan.actions, head)
    return plan


def admin_row(*, event_id: str, phone_number: str | None, outcome: Outcome, at: datetime, recorded_at: datetime,
              actor: str | None, reason: str | None, origin: str = "admin", source: Source | None = None,
              **extra: Any) -> dict[str, Any]:
    """An audit row that is not an opt-out record (removal, import, prevented call)."""
    row: dict[str, Any] = dict.fromkeys(audit.HASHED_COLUMNS)
    row.update(event_id=event_id, phone_number=phone_number, origin=origin, received_at=at, outcome=outcome.value,
               actor=actor, reason=reason, recorded_at=recorded_at, source=source.value if source else None, **extra)
    return row


def action_filters(
    *, campaign_id: str | None, number_prefix: str | None, since: Any, until: Any, mark: str
) -> tuple[list[str], list[Any]]:
    """The WHERE clauses (with `mark` as the dialect's placeholder) and parameters of `Store.actions`."""
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in (("a.campaign_id = {m}", campaign_id), ("a.recorded_at >= {m}", since),
                          ("a.recorded_at < {m}", until)):
        if value is not None:
            clauses.append(clause.format(m=mark))
            params.append(value)
    if number_prefix is not None:
        clauses.append(f"substr(a.phone_number, 1, {mark}) = {mark}")
        params += [len(number_prefix), number_prefix]
    return clauses, params


@dataclass(frozen=True)
class ActionRow:
    """One audit row as either store reads it back: timestamps aware datetimes, the channel a JSON object."""

    id: int
    event_id: str
    source_event_id: str | None
    phone_number: str | None
    number_source: str | None
    raw_number: str | None
    call_id: str | None
    campaign_id: str | None
    contact_id: str | None
    origin: str
    source: str | None
    digit: str | None
    pressed_at: datetime | None
    received_at: datetime
    journaled_at: datetime | None
    visible_at: datetime | None
    hangup_requested_at: datetime | None
    hungup_at: datetime | None
    hangup_method: str | None
    hangup_result: str | None
    outcome: str
    actor: str | None
    reason: str | None
    channel: dict[str, object] | None
    recorded_at: datetime
    speech_transcript: str | None
    speech_score: str | None
    speech_phrase: str | None
    speech_audio_sha256: str | None
    prev_hash: str | None
    row_hash: str | None
    cache_visible_at: datetime | None
    """When the keeper made it visible, for an opt-out its writer could not (optout_visibility)."""

    def columns(self) -> dict[str, object]:
        """The id and the written columns, as `audit` hashes them."""
        return {c: getattr(self, c) for c in ("id", *audit.ROW_COLUMNS)}

    @property
    def seen_at(self) -> datetime | None:
        """When dialers could first see it: the writer's confirmation, else the keeper's."""
        return self.visible_at or self.cache_visible_at


ACTIONS_FROM = "FROM optout_actions a LEFT JOIN optout_visibility v USING (event_id)"
"""Audit rows with the keeper's visibility evidence (`v.visible_at`), in both dialects."""
ACTION_SQL = (f"SELECT a.id, {', '.join(f'a.{c}' for c in audit.ROW_COLUMNS)}, v.visible_at AS cache_visible_at"
              f" {ACTIONS_FROM}")
"""Audit rows as ActionRow reads them (add WHERE and ORDER BY)."""

LINEAGE_SQL = "coalesce(a.row_hash, 'event:' || a.event_id)"
"""A row's lineage (rows from before the chain have no hash: their event id stands in)."""
CHANGES_SQL = (
    "SELECT a.id, a.phone_number, a.outcome, a.received_at, a.reason, a.source, a.call_id, a.campaign_id,"
    " a.contact_id, a.pressed_at, a.event_id, a.visible_at IS NOT NULL OR a.journaled_at IS NULL OR EXISTS"
    " (SELECT 1 FROM optout_visibility v WHERE v.event_id = a.event_id) FROM optout_actions a"
    " WHERE a.id > {m} AND a.id <= {m} AND a.phone_number IS NOT NULL AND a.outcome IN ("
    + ", ".join(f"'{o.value}'" for o in CHANGE_OUTCOMES) + ") ORDER BY a.id LIMIT {m}")
"""The change feed (both dialects; `{m}` is the placeholder). Only opt-outs a writer journaled count as
made visible late when the writer could not (imports and recoveries have nobody waiting on them)."""
POSITION_SQL = (f"SELECT a.id, {LINEAGE_SQL} FROM optout_actions a"
                " WHERE a.id = (SELECT max(id) FROM optout_actions) OR a.id = {m}")
HEAD_SQL = "SELECT id, row_hash FROM optout_actions ORDER BY id DESC LIMIT 1"
REMOVAL_REFUSED_SQL = (
    "SELECT 1 FROM optout_actions WHERE phone_number = {m} AND id > {m} AND outcome IN"
    f" ('{Outcome.BLACKLISTED.value}', '{Outcome.ALREADY_BLACKLISTED.value}') LIMIT 1")
"""Whether an opt-out of a number was stored after a sequence (parameters: number, sequence)."""


def chain_head_of(rows: Sequence[Sequence[Any]]) -> tuple[int, str | None]:
    """The result of HEAD_SQL as (id, hash), (0, None) for an empty trail."""
    return (int(rows[0][0]), rows[0][1]) if rows else (0, None)


def position_of(rows: Sequence[Sequence[Any]], at: int | None) -> StorePosition:
    """The result of POSITION_SQL as a StorePosition."""
    lineages = {int(r[0]): str(r[1]) for r in rows}
    head = max(lineages, default=0)
    lineage_at = None if at is None else ("" if at == 0 else lineages.get(at))
    return StorePosition(Position(head, lineages.get(head, "")), lineage_at)


def change_of(row: Sequence[Any]) -> Change:
    """A change feed row (CHANGES_SQL, timestamps as datetimes) -> Change."""
    seq, phone, outcome, at, reason, source, call_id, campaign_id, contact_id, pressed_at, event_id, visible = row
    if outcome == Outcome.REMOVED.value:
        return Change(seq=int(seq), phone_number=phone, op="remove", at=at, event_id=event_id)
    meta = {k: v for k, v in (("callId", call_id), ("campaignId", campaign_id), ("contactId", contact_id),
                              ("timestamp", iso_z(pressed_at) if pressed_at else None)) if v is not None}
    entry = entry_json(phone, at, reason or "opted out", source or Source.USER_OPTOUT.value, meta or None)
    if entry is None:  # a row written outside the writers: the number still goes to Redis
        log.error("change %s: its entry is not valid; the number is applied with a minimal entry", seq)
        entry = BlacklistEntry(phone_number=phone, added_at=at, reason="opted out",
                               source=Source.USER_OPTOUT).to_json()
    return Change(seq=int(seq), phone_number=phone, op="add", at=at, entry=entry, event_id=event_id,
                  visible=bool(visible))


@dataclass(frozen=True)
class ImportMark:
    """Where a file import stands, committed with each batch (`optout_imports`, keyed by the file's SHA-256)."""

    sha256: str
    name: str
    last_line: int = 0
    """The last line of the file whose rows are committed (a re-run resumes after it)."""
    added: int = 0
    bad: int = 0
    finished: bool = False


@dataclass(frozen=True)
class ImportBatch:
    """What one import batch committed."""

    added: list[str]
    """Numbers new to the blacklist, one audit row each."""
    after_seq: int
    """The change sequence (audit row id) before the batch: every change in (after_seq, last_seq] is its own."""
    last_seq: int


def import_template(*, at: datetime, actor: str, reason: str, source: Source) -> dict[str, Any]:
    """The audit row every number of an import batch shares (event id and number filled per number)."""
    return admin_row(event_id="", phone_number="", outcome=Outcome.BLACKLISTED, at=at, recorded_at=at,
                     actor=actor, reason=reason, source=source)


class Store(Resource, ABC):
    """The system of record: blacklist, audit trail, campaign counts. An async context manager."""

    dialect: str
    location: str
    """Where it is, for messages (a file path, or the database's host and name; never a password)."""
    setting: str
    """How the operator points the agent at its store, for messages."""

    @abstractmethod
    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read (`{m}` in `sql` stands for the dialect's placeholder), errors mapped to ours."""

    @abstractmethod
    async def migrate(self) -> list[str]:
        """Create or upgrade the schema; returns the migrations applied now (empty when up to date)."""

    async def require_schema(self) -> None:
        """Raise SchemaMissing unless the schema is there and current (StoreUnavailable when unreachable)."""
        try:
            done = {int(r[0]) for r in await self._query(f"SELECT version FROM {TABLE_SCHEMA_VERSION}")}
        except SchemaMissing:  # no version table: nothing applied
            done = set()
        missing = [name for version, name, _ in migrations(self.dialect) if version not in done]
        if missing:
            raise SchemaMissing(f"{self.location} lacks the opt-out schema ({', '.join(missing)} not applied): "
                                f"run `optout migrate`, or {self.setting}")

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        await self._query("SELECT 1")

    @abstractmethod
    async def write(self, records: Sequence[OptOutRecord]) -> list[StoreResult]:
        """Write blacklist entries and chained audit rows for `records` in one transaction.

        A record whose event id is already in the audit trail is a duplicate and changes nothing. Raises
        StoreUnavailable (connectivity: retry the batch later) or StoreRejected (the data: retry alone).
        """

    @abstractmethod
    async def remove(self, removal: Removal) -> RemoveResult:
        """Take a number off the blacklist and audit it, under the writers' lock, unless an opt-out of it was
        stored after `removal.seen_seq` (the store decides the order, by its own sequence)."""

    @abstractmethod
    async def append_action(self, row: dict[str, Any]) -> None:
        """Append one audit row built by `admin_row` (e.g. a prevented call) to the chain."""

    @abstractmethod
    async def blacklisted(self, numbers: Sequence[str]) -> set[str]:
        """Which of `numbers` (E.164) are on the blacklist. Raises StoreUnavailable."""

    @abstractmethod
    def entries(self, *, batch_size: int = 10_000) -> AsyncIterator[list[BlacklistEntry]]:
        """Stream the blacklist in batches."""

    async def head(self) -> int:
        """The change sequence: the id of the newest audit row (0 when there is none)."""
        return (await self.position()).head.seq

    async def position(self, at: int | None = None) -> StorePosition:
        """The head and its lineage, and the lineage of the row `at` (one query)."""
        return position_of(await self._query(POSITION_SQL, (-1 if at is None else at,)), at)

    @abstractmethod
    async def stored(self, event_ids: Sequence[str]) -> dict[str, int]:
        """Which of these events the audit trail holds, with their sequence."""

    @abstractmethod
    def watch(self) -> AsyncIterator[None]:
        """Yields soon after any writer (any process) commits to the store: the keeper's push. Raises
        StoreUnavailable when it cannot watch."""

    @abstractmethod
    async def changes(self, after: int, upto: int, *, limit: int = 5000) -> list[Change]:
        """Blacklist changes with `after < seq <= upto`, oldest first, at most `limit`."""

    @abstractmethod
    async def record_visibility(self, seen: Sequence[tuple[str, datetime]]) -> None:
        """Note when the cache made opt-outs visible whose writer could not (event id, time)."""

    @abstractmethod
    async def import_batch(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, actor: str,
        mark: ImportMark | None = None,
    ) -> ImportBatch:
        """Add E.164 numbers in one transaction at the storage's bulk speed: the new ones to the blacklist,
        one chained audit row each (under the chain lock); with `mark`, the file's progress moves to
        `mark.last_line` (adding its added and bad counts) in the same transaction. Raises StoreUnavailable /
        StoreRejected as `write` does."""

    async def import_state(self, sha256: str) -> ImportMark | None:
        """How far the import of the file with this SHA-256 got (None: never started)."""
        rows = await self._query(f"SELECT file_name, last_line, added, bad, finished_at IS NOT NULL"
                                 f" FROM {TABLE_IMPORTS} WHERE file_sha256 = {{m}}", (sha256,))
        if not rows:
            return None
        name, last_line, added, bad, finished = rows[0]
        return ImportMark(sha256, name, int(last_line), int(added), int(bad), bool(finished))

    @abstractmethod
    async def import_begin(self, sha256: str, name: str) -> None:
        """Start (or start over) the import of a file: its progress is set back to nothing."""

    @abstractmethod
    async def import_finish(self, sha256: str) -> None:
        """Mark the file's import complete (a re-run starts from the beginning again)."""

    def blacklist_csv(self) -> AsyncIterator[bytes] | None:
        """The blacklist as CSV rows (no header) streamed by the database itself, or None when this store
        has no faster way than `entries` (the caller formats those)."""
        return None

    def actions_csv(
        self, columns: Sequence[str], *, campaign_id: str | None, number_prefix: str | None,
    ) -> AsyncIterator[bytes] | None:
        """Audit rows as CSV of `columns` (no header) streamed by the database itself, or None (see
        `blacklist_csv`)."""
        return None

    @abstractmethod
    async def history(self, phone_number: str) -> list[ActionRow]:
        """The audit trail of one number, oldest first, with its visibility evidence."""

    @abstractmethod
    def actions(
        self, *, campaign_id: str | None = None, number_prefix: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> AsyncIterator[ActionRow]:
        """Audit rows of a campaign, a number range (E.164 prefix) and a time range, oldest first."""

    def chain_rows(self) -> AsyncIterator[ActionRow]:
        """Every audit row with its hashes, in id order (for `audit.ChainVerifier`)."""
        return self.actions()

    async def chain_head(self) -> tuple[int, str | None]:
        """(rows in the audit trail, the newest row's hash)."""
        return chain_head_of(await self._query(HEAD_SQL))
