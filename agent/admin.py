"""Administrative operations behind the CLI: add, remove, import, export, history, the audit chain."""

from __future__ import annotations

import asyncio
import codecs
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
from typing import Any, BinaryIO

from agent.audit import ChainReport, ChainVerifier
from agent.constants import Origin, Source
from agent.core import Core
from agent.errors import CacheUnavailable, InvalidInput, OptOutError
from agent.optout import OptOutRecord
from agent.phone import normalise
from agent.pipeline import PipelineResult
from agent.store import Removal

PHONE_COLUMNS = ("phonenumber", "phone_number", "phone", "number", "msisdn", "e164")
MAX_FIELD = 256
"""Longest field an import accepts (a phone number is far shorter; a longer one is a broken file)."""


async def add(core: Core, number: str, *, source: Source, reason: str | None, actor: str) -> PipelineResult:
    """Blacklist one number through the pipeline (journaled, audited with origin admin)."""
    e164 = normalise(number, region=core.settings.optout_default_region, field="NUMBER")
    record = OptOutRecord(
        event_id=f"admin-{uuid.uuid4()}",
        phone_number=e164,
        number_source="NUMBER",
        origin=Origin.ADMIN,
        source=source,
        reason=reason or f"added by {actor}",
        received_at=datetime.now(UTC),
        actor=actor,
    )
    return await core.pipeline.submit(record)


async def remove(core: Core, number: str, *, reason: str, actor: str) -> tuple[bool, str | None]:
    """Take a number off the blacklist; the removal is an audited action. Returns (removed, a note about
    Redis when the removal could not be applied there now)."""
    if not reason.strip():
        raise InvalidInput("--reason", "a removal needs a reason (it is written to the audit trail)")
    e164 = normalise(number, region=core.settings.optout_default_region, field="NUMBER")
    removal = Removal(e164, reason.strip(), actor, f"remove-{uuid.uuid4()}", datetime.now(UTC))
    removed = await core.store.remove(removal)
    note = None
    if removed and core.cache_sync is not None and core.cache is not None:
        # Removals reach Redis through the store's change feed, in order (agent/cache_sync.py); the number is
        # also taken out directly, unless an opt-out of it was accepted since.
        try:
            await core.cache_sync.tick()
            await core.cache.retract(e164, at=removal.at)
        except OptOutError as exc:
            note = f"Redis not updated now ({exc}); the agent's cache sync applies the removal"
    return removed, note


# --- import --------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    read: int = 0
    added: int = 0
    already: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    cache_error: str | None = None
    stopped: str | None = None
    """Why the file could not be read to its end (nothing after that line was imported)."""


class UnreadableFile(InvalidInput):
    """The file is not a text file of numbers (binary, UTF-16, ...): nothing more can be read from it."""


def file_lines(fh: BinaryIO) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 (or ASCII) file. Raises UnreadableFile for binary or UTF-16 input; a
    line that is not UTF-8 comes back as None-free text marked by a `\\ufffd` replacement, and is refused by
    the row parser."""
    head = fh.read(4096)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (head[:200].count(b"\x00") > 2):
        kind = "UTF-16 text" if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or b"\x00" in head[:2] \
            else "a binary file"
        raise UnreadableFile("line 1", f"the file is {kind}, not UTF-8 text: save it as UTF-8 CSV or plain text")
    if b"\x00" in head:
        raise UnreadableFile("line 1", "the file holds NUL bytes: it is a binary file, not UTF-8 text")
    rest = fh
    buffer = head
    lineno = 0
    while True:
        while b"\n" not in buffer:
            more = rest.read(65536)
            if not more:
                break
            buffer += more
        if not buffer:
            return
        line, sep, buffer = buffer.partition(b"\n")
        lineno += 1
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        if b"\x00" in line:
            raise UnreadableFile(f"line {lineno}", "holds NUL bytes: the file is binary, not UTF-8 text")
        yield lineno, line.decode("utf-8", "replace").rstrip("\r")
        if not sep and not buffer:
            return


def read_numbers(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str | InvalidInput]]:
    """(line number, raw number or the row's problem) from a CSV with a phone column, or one number per line.

    Each line is parsed on its own, so a bad line (an unterminated quote, an oversized field, bytes that are
    not UTF-8) is reported and the lines after it are still read.
    """
    it = iter(lines)
    first = next(it, None)
    if first is None:
        return
    header = [h.strip().lower() for h in _fields(first[1]) or []]
    column = next((header.index(c) for c in PHONE_COLUMNS if c in header), None)
    rows = it if column is not None else iter([first, *it])
    for lineno, line in rows:
        if not line.strip():
            continue
        if "\ufffd" in line:
            yield lineno, InvalidInput("line", "is not UTF-8 text")
            continue
        if column is None:
            value = line.strip()
        else:
            fields = _fields(line)
            if fields is None:
                yield lineno, InvalidInput("line", "is not a CSV row (an unterminated quote?)")
                continue
            value = fields[column].strip() if column < len(fields) else ""
        if len(value) > MAX_FIELD:
            yield lineno, InvalidInput("phone", f"is {len(value)} characters long, more than {MAX_FIELD}")
            continue
        yield lineno, value


def _fields(line: str) -> list[str] | None:
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error:
        return None


def _normalise_rows(region: str, rows: list[tuple[int, str | InvalidInput]]) -> tuple[list[str], list[tuple[int, str]]]:
    """(E.164 numbers, bad rows with their problem); runs in a worker process."""
    good: list[str] = []
    bad: list[tuple[int, str]] = []
    for lineno, raw in rows:
        if isinstance(raw, InvalidInput):
            bad.append((lineno, str(raw)))
            continue
        try:
            good.append(normalise(raw, region=region, field="phone"))
        except InvalidInput as exc:
            bad.append((lineno, str(exc)))
    return good, bad


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def import_numbers(
    core: Core, fh: BinaryIO, *, source: Source, reason: str, actor: str, batch_size: int = 20_000,
    progress: Callable[[int], None] | None = None, workers: int | None = None,
) -> ImportReport:
    """Import numbers in batches: bad rows reported by line number, good rows stored, then cached.

    Normalising is the costly part, so it runs in worker processes while the main process writes the
    previous batch to PostgreSQL and Redis. A file that cannot be read on (binary, UTF-16) stops the import
    with `stopped` set; what was committed before stays.
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
                    await core.cache.add_numbers(good, added_at=now, reason=reason, source=source.value)
                except CacheUnavailable as exc:
                    report.cache_error = str(exc)
            if progress is not None:
                progress(report.read)

        try:
            for chunk in _chunks(read_numbers(file_lines(fh)), batch_size):
                report.read += len(chunk)
                pending.append(loop.run_in_executor(pool, _normalise_rows, region, chunk))
                if len(pending) > 2:
                    await write_oldest()
        except UnreadableFile as exc:
            report.stopped = str(exc)
        while pending:
            await write_oldest()
    return report


# --- export, history, audit -------------------------------------------------------------------------
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
    "pressed_at", "received_at", "journaled_at", "hangup_requested_at", "hungup_at", "visible_at", "recorded_at",
    "hangup_method", "hangup_result", "outcome", "actor", "reason", "number_source", "row_hash",
)


async def export_audit_csv(
    core: Core, *, campaign_id: str | None, number_prefix: str | None
) -> AsyncIterator[str]:
    """Audit rows of a campaign or number range as CSV text chunks."""
    yield ",".join(AUDIT_COLUMNS) + "\r\n"
    buf = io.StringIO()
    writer = csv.writer(buf)
    count = 0
    async for row in core.store.actions(campaign_id=campaign_id, number_prefix=number_prefix):
        if row.get("visible_at") is None and row.get("cache_visible_at") is not None:
            row = {**row, "visible_at": row["cache_visible_at"]}
        writer.writerow(["" if row.get(c) is None else _text(row[c]) for c in AUDIT_COLUMNS])
        count += 1
        if count % 1000 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _text(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _when(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def timeline(row: dict[str, Any]) -> list[tuple[str, datetime]]:
    """The moments of one audit row, in time order: press, journal, hangup, visibility, store."""
    asterisk = row.get("origin") in ("ari", "ami")
    hangup = f"hangup requested ({row.get('hangup_method')}: {row.get('hangup_result')})"
    steps = [
        ("pressed (Asterisk's clock)" if asterisk else "pressed", row.get("pressed_at")),
        ("received by the agent", row.get("received_at")),
        ("journaled", row.get("journaled_at")),
        (hangup, row.get("hangup_requested_at")),
        ("hung up (Asterisk's clock)" if asterisk else "hung up", row.get("hungup_at")),
        ("visible to the dialers (Redis confirmed)", row.get("visible_at")),
        ("visible to the dialers (cache sync applied it)", row.get("cache_visible_at")),
        ("stored", row.get("recorded_at")),
    ]
    moments = [(label, when) for label, value in steps if (when := _when(value)) is not None]
    return sorted(moments, key=lambda m: m[1])


def format_timeline(row: dict[str, Any], shown_number: str) -> str:
    """One action as a readable timeline (times relative to its first moment)."""
    moments = timeline(row)
    head = (f"{row.get('outcome')} {shown_number} via {row.get('origin')}"
            f" call {row.get('call_id') or '-'} campaign {row.get('campaign_id') or '-'}"
            f" event {row.get('event_id')}")
    lines = [head]
    if row.get("actor") or row.get("reason"):
        lines.append(f"    by {row.get('actor') or '-'}: {row.get('reason') or ''}")
    if moments:
        start = moments[0][1]
        for label, when in moments:
            offset = (when - start).total_seconds() * 1000
            lines.append(f"    {when.astimezone(UTC).isoformat(timespec='milliseconds')}  +{offset:9.1f} ms  {label}")
    return "\n".join(lines)


async def verify_chain(core: Core, *, expected_head: str | None = None) -> ChainReport:
    """Walk the whole audit chain (see agent/audit.py)."""
    verifier = ChainVerifier(expected_head=expected_head)
    async for row in core.store.chain_rows():
        if not verifier.feed(row):
            break
    return verifier.report()
