"""The tamper-evident audit trail: a hash chain over `optout_actions`. No I/O.

Each row carries `prev_hash` (the row before it in the chain, `GENESIS` for the first) and
`row_hash = sha256(prev_hash || canonical form of the row)`, where the canonical form is the JSON array of
HASHED_COLUMNS in that order: timestamps as UTC `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the channel object with
sorted keys, text as stored. The row's `id` is not hashed: order is the chain itself. Columns added later
(EVIDENCE_COLUMNS: a spoken opt-out's transcript, score, phrase and audio SHA-256) are appended to that
array only when one of them is set, so every row written before they existed hashes as it did.

Every writer appends under one lock (PostgreSQL: an advisory transaction lock; SQLite: its write lock), so
the chain follows commit order even with many agents, group commit and the replayer. A row changed,
deleted or inserted outside the writers breaks the chain at that row; a rewrite of the whole chain is
caught against a head kept elsewhere (`optout audit head`, and the agent logs it every hour).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

GENESIS = "0" * 64
HASHED_COLUMNS = (
    "event_id", "source_event_id", "phone_number", "number_source", "raw_number", "call_id", "campaign_id",
    "contact_id", "origin", "source", "digit", "pressed_at", "received_at", "journaled_at", "visible_at",
    "hangup_requested_at", "hungup_at", "hangup_method", "hangup_result", "outcome", "actor", "reason",
    "channel", "recorded_at",
)  # fmt: skip
TIMESTAMP_COLUMNS = frozenset({
    "pressed_at", "received_at", "journaled_at", "visible_at", "hangup_requested_at", "hungup_at", "recorded_at",
})
JSON_COLUMNS = frozenset({"channel"})
EVIDENCE_COLUMNS = ("speech_transcript", "speech_score", "speech_phrase", "speech_audio_sha256")
"""Hashed too, but only in rows that set one of them (migration 006)."""
ROW_COLUMNS = (*HASHED_COLUMNS, *EVIDENCE_COLUMNS, "prev_hash", "row_hash")
"""Every column a writer inserts into optout_actions (all but the id)."""


def _norm(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in TIMESTAMP_COLUMNS:
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if column in JSON_COLUMNS:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers (as written, or as read back from either store)."""
    values = [_norm(c, row.get(c)) for c in HASHED_COLUMNS]
    evidence = [_norm(c, row.get(c)) for c in EVIDENCE_COLUMNS]
    if any(v is not None for v in evidence):
        values += evidence
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(row)).hexdigest()


def chain(rows: Iterable[dict[str, Any]], head: str | None) -> str:
    """Fill `prev_hash` and `row_hash` of each row in order, after `head`; returns the new head."""
    prev = head or GENESIS
    for row in rows:
        row["prev_hash"] = prev
        row["row_hash"] = prev = row_hash(prev, row)
    return prev


_MARK_EVENT, _MARK_PHONE = "\x01", "\x02"


def chain_uniform(template: Mapping[str, Any], rows: Iterable[tuple[str, str]],
                  head: str | None) -> Iterator[tuple[str, str, str, str]]:
    """`chain` for rows that differ only in event id and phone number (an import), in one pass without
    building a row per number: the canonical form is the template's with the two values spliced in.

    `rows` are (event_id, phone_number) of plain ASCII text with no `"` or `\\` (E.164 numbers and
    generated ids; ValueError otherwise). Yields (event_id, phone_number, prev_hash, row_hash) per row, lazily
    (a writer can send the first rows while the next are hashed); the hashes are those `row_hash` computes
    for the full row.
    """
    values = [_norm(c, template.get(c)) for c in HASHED_COLUMNS]
    values[HASHED_COLUMNS.index("event_id")] = _MARK_EVENT
    values[HASHED_COLUMNS.index("phone_number")] = _MARK_PHONE
    text = json.dumps(values, separators=(",", ":"), ensure_ascii=False)
    before, rest = text.split(json.dumps(_MARK_EVENT), 1)
    middle, after = rest.split(json.dumps(_MARK_PHONE), 1)
    pre, mid, post = before.encode() + b'"', b'"' + middle.encode() + b'"', b'"' + after.encode()
    sha256 = hashlib.sha256
    prev = head or GENESIS
    digest = bytes.fromhex(prev)
    for event_id, phone in rows:
        if not (event_id.isascii() and phone.isascii()) or '"' in event_id + phone or "\\" in event_id + phone:
            raise ValueError(f"chain_uniform takes plain ASCII ids and numbers, not {event_id!r} / {phone!r}")
        digest = sha256(digest + pre + event_id.encode() + mid + phone.encode() + post).digest()
        row = digest.hex()
        yield event_id, phone, prev, row
        prev = row


@dataclass(frozen=True)
class ChainReport:
    rows: int
    """Rows in the chain (hashed)."""
    legacy: int
    """Rows written before the chain began (no hash), all before its first row."""
    head: str | None
    broken_at: int | None = None
    """The id of the first row that breaks the chain."""
    problem: str | None = None
    head_found_at: int | None = None
    """With an expected head: the id of the row whose hash it is."""

    @property
    def intact(self) -> bool:
        return self.broken_at is None


class ChainVerifier:
    """Walks rows in id order (`feed` each) and finds the first that breaks the chain."""

    def __init__(self, *, expected_head: str | None = None) -> None:
        self._expected = expected_head
        self._prev = GENESIS
        self._rows = 0
        self._legacy = 0
        self._broken: tuple[int, str] | None = None
        self._found_at: int | None = None

    def feed(self, row: Mapping[str, Any]) -> bool:
        """Check one row; False once the chain is broken (stop feeding then)."""
        if self._broken is not None:
            return False
        rid = int(row["id"])
        stored = row.get("row_hash")
        if stored is None:
            if self._rows:
                self._broken = (rid, "row has no hash but follows hashed rows (inserted outside the chain)")
                return False
            self._legacy += 1
            return True
        if row.get("prev_hash") != self._prev:
            self._broken = (rid, "prev_hash is not the hash of the row before it "
                                 "(a row was deleted, inserted or reordered before this one)")
            return False
        if row_hash(self._prev, row) != stored:
            self._broken = (rid, "row_hash does not match the row's content (the row was changed)")
            return False
        self._prev = str(stored)
        self._rows += 1
        if self._expected is not None and stored == self._expected:
            self._found_at = rid
        return True

    def report(self) -> ChainReport:
        head = self._prev if self._rows else None
        if self._broken is not None:
            return ChainReport(self._rows, self._legacy, head, self._broken[0], self._broken[1])
        return ChainReport(self._rows, self._legacy, head, head_found_at=self._found_at)
