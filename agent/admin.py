"""Administrative operations behind the CLI: add, remove, import, export, history."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.app import Core
from agent.constants import Origin, Source
from agent.errors import CacheUnavailable, InvalidInput
from agent.optout import BlacklistEntry, OptOutRecord
from agent.phone import normalise
from agent.pipeline import PipelineResult
from agent.store import Removal

PHONE_COLUMNS = ("phonenumber", "phone_number", "phone", "number", "msisdn", "e164")


async def add(core: Core, number: str, *, source: Source, reason: str | None, actor: str) -> PipelineResult:
    """Blacklist one number through the pipeline (journaled, audited with origin admin)."""
    e164 = normalise(number, region=core.settings.optout_default_region, field="NUMBER")
    record = OptOutRecord(
        event_id=f"admin-{uuid.uuid4()}",
        phone_number=e164,
        origin=Origin.ADMIN,
        source=source,
        reason=reason or f"added by {actor}",
        received_at=datetime.now(UTC),
        actor=actor,
    )
    return await core.pipeline.submit(record)


async def remove(core: Core, number: str, *, reason: str, actor: str) -> bool:
    """Take a number off the blacklist; the removal is an audited action. False when it was not listed."""
    if not reason.strip():
        raise InvalidInput("--reason", "a removal needs a reason (it is written to the audit trail)")
    e164 = normalise(number, region=core.settings.optout_default_region, field="NUMBER")
    removed = await core.store.remove(
        Removal(e164, reason.strip(), actor, f"remove-{uuid.uuid4()}", datetime.now(UTC))
    )
    if removed and core.cache is not None:
        await core.cache.remove(e164)
    return removed


@dataclass
class ImportReport:
    read: int = 0
    added: int = 0
    already: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    cache_error: str | None = None


def read_numbers(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number, raw number) from a CSV with a phone column, or from one number per line."""
    it = iter(lines)
    first = next(it, None)
    if first is None:
        return
    header = [h.strip().lower() for h in next(csv.reader([first]))]
    column = next((header.index(c) for c in PHONE_COLUMNS if c in header), None)
    if column is None:
        if first.strip():
            yield 1, first.strip()
        for lineno, line in enumerate(it, start=2):
            if line.strip():
                yield lineno, line.strip()
        return
    for lineno, row in enumerate(csv.reader(it), start=2):
        if not row:
            continue
        yield lineno, row[column] if column < len(row) else ""


async def import_numbers(
    core: Core, lines: Iterable[str], *, source: Source, reason: str, actor: str, batch_size: int = 50_000,
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import numbers in batches: bad rows reported by line number, good rows stored, then cached."""
    report = ImportReport()
    region = core.settings.optout_default_region
    now = datetime.now(UTC)
    batch: list[BlacklistEntry] = []

    async def flush() -> None:
        added = await core.store.import_entries(batch, actor=actor)
        report.added += added
        report.already += len(batch) - added
        if core.cache is not None and report.cache_error is None:
            try:
                await core.cache.add_entries(batch)
            except CacheUnavailable as exc:
                report.cache_error = str(exc)
        batch.clear()
        if progress is not None:
            progress(report.read)

    for lineno, raw in read_numbers(lines):
        report.read += 1
        try:
            e164 = normalise(raw, region=region, field="phone")
        except InvalidInput as exc:
            report.bad.append((lineno, str(exc)))
            continue
        batch.append(BlacklistEntry(phone_number=e164, added_at=now, reason=reason, source=source))
        if len(batch) >= batch_size:
            await flush()
    if batch:
        await flush()
    return report


async def export_csv(core: Core) -> AsyncIterator[str]:
    """The blacklist as CSV text chunks (header first)."""
    yield "phoneNumber,addedAt,reason,source,metadata\r\n"
    async for batch in core.store.entries():
        buf = io.StringIO()
        writer = csv.writer(buf)
        for e in batch:
            meta = json.dumps(e.metadata, separators=(",", ":")) if e.metadata else ""
            writer.writerow([e.phone_number, e.added_at.isoformat(), e.reason, e.source.value, meta])
        yield buf.getvalue()


AUDIT_COLUMNS = (
    "id", "event_id", "phone_number", "call_id", "campaign_id", "contact_id", "origin", "source", "digit",
    "pressed_at", "received_at", "hangup_requested_at", "hungup_at", "hangup_method", "hangup_result",
    "outcome", "actor", "reason", "recorded_at",
)


async def export_audit_csv(
    core: Core, *, campaign_id: str | None, number_prefix: str | None
) -> AsyncIterator[str]:
    """Audit rows of a campaign or number range as CSV text chunks."""
    yield ",".join(AUDIT_COLUMNS) + "\r\n"
    async for row in core.store.actions(campaign_id=campaign_id, number_prefix=number_prefix):
        buf = io.StringIO()
        csv.writer(buf).writerow(["" if row.get(c) is None else _text(row[c]) for c in AUDIT_COLUMNS])
        yield buf.getvalue()


def _text(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)
