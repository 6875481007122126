"""Administrative operations behind the CLI: add, remove, import, export, history."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.app import Core
from agent.constants import Origin, Source
from agent.errors import CacheUnavailable, InvalidInput
from agent.optout import OptOutRecord
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


def _normalise_rows(region: str, rows: list[tuple[int, str]]) -> tuple[list[str], list[tuple[int, str]]]:
    """(E.164 numbers, bad rows with their problem); runs in a worker process."""
    good: list[str] = []
    bad: list[tuple[int, str]] = []
    for lineno, raw in rows:
        try:
            good.append(normalise(raw, region=region, field="phone"))
        except InvalidInput as exc:
            bad.append((lineno, str(exc)))
    return good, bad


def _chunks(rows: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def import_numbers(
    core: Core, lines: Iterable[str], *, source: Source, reason: str, actor: str, batch_size: int = 20_000,
    progress: Callable[[int], None] | None = None, workers: int | None = None,
) -> ImportReport:
    """Import numbers in batches: bad rows reported by line number, good rows stored, then cached.

    Normalising is the costly part, so it runs in worker processes while the main process writes the
    previous batch to PostgreSQL and Redis.
    """
    report = ImportReport()
    region = core.settings.optout_default_region
    now = datetime.now(UTC)
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[tuple[list[str], list[tuple[int, str]]]]] = deque()
    with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:

        async def write_oldest() -> None:
            good, bad = await pending.popleft()
            report.bad.extend(bad)
            added = await core.store.import_numbers(good, added_at=now, reason=reason, source=source, actor=actor)
            report.added += added
            report.already += len(good) - added
            if core.cache is not None and report.cache_error is None:
                try:
                    await core.cache.add_numbers(good, added_at=now, reason=reason, source=source)
                except CacheUnavailable as exc:
                    report.cache_error = str(exc)
            if progress is not None:
                progress(report.read)

        for chunk in _chunks(read_numbers(lines), batch_size):
            report.read += len(chunk)
            pending.append(loop.run_in_executor(pool, _normalise_rows, region, chunk))
            if len(pending) > 2:
                await write_oldest()
        while pending:
            await write_oldest()
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
