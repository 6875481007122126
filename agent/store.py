"""The store interface both backends implement (PostgreSQL, the system of record; SQLite, embedded).

Both pass the same tests (tests/test_store.py runs every test against each).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from agent.constants import Outcome, Source
from agent.lifecycle import Resource
from agent.optout import BlacklistEntry, OptOutRecord


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


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """The versioned SQL files for `dialect`, as (version, name, sql), in order."""
    folder = resources.files("agent") / "migrations" / dialect
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.name, item.read_text(encoding="utf-8")))
    return sorted(found)


def action_params(record: OptOutRecord) -> dict[str, Any]:
    """The audit row's columns for `record` (outcome decided by the store)."""
    hangup = record.hangup
    return {
        "event_id": record.event_id,
        "phone_number": record.phone_number,
        "raw_number": record.raw_number,
        "call_id": record.call_id,
        "campaign_id": record.campaign_id,
        "contact_id": record.contact_id,
        "origin": record.origin.value,
        "source": record.source.value,
        "digit": record.digit,
        "pressed_at": record.pressed_at,
        "received_at": record.received_at,
        "hangup_requested_at": hangup.requested_at if hangup else None,
        "hungup_at": hangup.hungup_at if hangup else None,
        "hangup_method": hangup.method if hangup else None,
        "hangup_result": hangup.result if hangup else None,
        "actor": record.actor,
        "reason": record.reason,
        "channel": json.dumps(record.channel) if record.channel else None,
    }


ACTION_COLUMNS = (
    "event_id", "phone_number", "raw_number", "call_id", "campaign_id", "contact_id", "origin", "source",
    "digit", "pressed_at", "received_at", "hangup_requested_at", "hungup_at", "hangup_method",
    "hangup_result", "actor", "reason", "channel",
)  # fmt: skip


class Store(Resource, ABC):
    """The system of record: blacklist, audit trail, campaign counts. An async context manager."""

    dialect: str

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    @abstractmethod
    async def migrate(self) -> list[str]:
        """Create or upgrade the schema; returns the migrations applied now (empty when up to date)."""

    @abstractmethod
    async def record(self, records: Sequence[OptOutRecord]) -> list[StoreResult]:
        """Write blacklist entries and audit rows for `records` in one transaction.

        A record whose event id is already in the audit trail is a duplicate and changes nothing.
        Raises StoreUnavailable.
        """

    @abstractmethod
    async def remove(self, removal: Removal) -> bool:
        """Take a number off the blacklist and audit it; False when it was not on the list."""

    @abstractmethod
    async def blacklisted(self, numbers: Sequence[str]) -> set[str]:
        """Which of `numbers` (E.164) are on the blacklist. Raises StoreUnavailable."""

    @abstractmethod
    def entries(self, *, batch_size: int = 10_000, since: datetime | None = None) -> AsyncIterator[
        list[BlacklistEntry]
    ]:
        """Stream the blacklist in batches; with `since`, only numbers with an action recorded (committed
        order, not `addedAt`: a replayed opt-out has an old addedAt) at or after it."""

    @abstractmethod
    async def import_numbers(
        self, numbers: Sequence[str], *, added_at: datetime, reason: str, source: Source, actor: str
    ) -> int:
        """Add E.164 numbers in bulk (admin import), each new one audited; returns how many were new."""

    @abstractmethod
    async def history(self, phone_number: str) -> list[dict[str, Any]]:
        """The audit trail of one number, oldest first."""

    @abstractmethod
    def actions(
        self, *, campaign_id: str | None = None, number_prefix: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Audit rows of a campaign or a number range (E.164 prefix), oldest first."""

    @abstractmethod
    async def campaign_count(self, campaign_id: str) -> int: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
