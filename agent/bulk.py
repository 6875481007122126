"""Bulk import and export: a resumable, process-pool import of files of numbers (progress committed with
each batch, so a re-run resumes), and CSV exports of the blacklist and the audit trail."""

from __future__ import annotations

import asyncio
import codecs
import csv
import hashlib
import json
import os
import signal
import stat
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, BinaryIO

from agent import csvsafe
from agent.constants import Source
from agent.core import Core
from agent.errors import CacheUnavailable, InvalidInput
from agent.phone import normalise_many
from agent.store import ImportMark

PHONE_COLUMNS = ("phonenumber", "phone_number", "phone", "number", "msisdn", "e164")
MAX_FIELD = 256
"""Longest field an import accepts (a phone number is far shorter; a longer one is a broken file)."""


# --- import ---------------------------------------------------------------------------------------------
MAX_BAD_KEPT = 1000
"""Bad rows kept with their problem (all are counted): a broken file of millions must not fill memory."""
MAX_LINE = 16 << 20
"""A longer line is not a line of a file of numbers (a binary file without newlines)."""


@dataclass
class ImportReport:
    read: int = 0
    added: int = 0
    already: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    """The first MAX_BAD_KEPT bad rows (line number, problem); `bad_count` counts them all."""
    bad_count: int = 0
    cache_error: str | None = None
    stopped: str | None = None
    """Why the file could not be read to its end (nothing after that line was imported)."""
    resumed_after: int = 0
    """A re-run of an interrupted import: the lines up to this one were committed before (not read again)."""
    added_before: int = 0
    """Numbers the interrupted runs of this file added."""
    done_bytes: int = 0
    """How far into the file the committed rows reach."""
    last_line: int = 0
    """The file's last line committed (by this run or, resumed, an earlier one)."""


@dataclass(frozen=True)
class ImportProgress:
    rows: int
    """Rows read and committed in this run."""
    done_bytes: int
    """How far into the file (bytes) the committed rows reach."""
    total_bytes: int


@dataclass
class _Block:
    """What a worker made of a block of whole lines."""

    last_line: int
    end: int
    """The file offset after the block."""
    rows: int = 0
    good: list[str] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    stopped: str | None = None


class UnreadableFile(InvalidInput):
    """The file is not a text file of numbers (binary, UTF-16, ...): nothing more can be read from it."""


def check_head(head: bytes) -> None:
    """Raise UnreadableFile when the file's first bytes show binary or UTF-16 content."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or (head[:200].count(b"\x00") > 2):
        kind = "UTF-16 text" if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or b"\x00" in head[:2] \
            else "a binary file"
        raise UnreadableFile("line 1", f"the file is {kind}, not UTF-8 text: save it as UTF-8 CSV or plain text")
    if b"\x00" in head:
        raise UnreadableFile("line 1", "the file holds NUL bytes: it is a binary file, not UTF-8 text")


def row_value(line: str, column: int | None) -> str | InvalidInput | None:
    """The raw number on one line (None for a blank line), or the line's problem. Each line is parsed on its
    own, so a bad line (an unterminated quote, an oversized field, bytes that are not UTF-8) is reported and
    the lines after it are still read."""
    if not line.strip():
        return None
    if "\ufffd" in line:
        return InvalidInput("line", "is not UTF-8 text")
    if column is None:
        value = line.strip()
    else:
        # Without quotes or a stray CR, a CSV row is its commas: the csv module only for the rest.
        fields = line.split(",") if '"' not in line and "\r" not in line else _fields(line)
        if fields is None:
            return InvalidInput("line", "is not a CSV row (an unterminated quote?)")
        value = fields[column].strip() if column < len(fields) else ""
    if len(value) > MAX_FIELD:
        return InvalidInput("phone", f"is {len(value)} characters long, more than {MAX_FIELD}")
    return csvsafe.unneutralise(value)  # as `optout export` writes it: "'+15551234567"


def _fields(line: str) -> list[str] | None:
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error:
        return None


def _header_column(line: str) -> int | None:
    header = [h.strip().lower() for h in _fields(line) or []]
    return next((header.index(c) for c in PHONE_COLUMNS if c in header), None)


def _parse_block(first_line: int, data: bytes, end: int, column: int | None, region: str) -> _Block:
    """Read and normalise a block of whole lines; runs in a worker process."""
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    block = _Block(last_line=first_line + len(lines) - 1, end=end)
    if "\x00" in text:
        cut = next(i for i, line in enumerate(lines) if "\x00" in line)
        block.stopped = f"line {first_line + cut}: holds NUL bytes: the file is binary, not UTF-8 text"
        block.last_line = first_line + cut - 1
        del lines[cut:]
    raws: list[str] = []
    where: list[int] = []
    for lineno, line in enumerate(lines, first_line):
        value = row_value(line.rstrip("\r"), column)
        if value is None:
            continue
        block.rows += 1
        if isinstance(value, InvalidInput):
            block.bad.append((lineno, str(value)))
        else:
            raws.append(value)
            where.append(lineno)
    for lineno, result in zip(where, normalise_many(raws, region=region, field="phone"), strict=True):
        if isinstance(result, str):
            block.good.append(result)
        else:
            block.bad.append((lineno, str(result)))
    block.bad.sort()
    return block


def file_sha256(fh: BinaryIO) -> str:
    """The SHA-256 of the whole file (the key its import resumes by); leaves the file at its start."""
    fh.seek(0)
    digest = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
    fh.seek(0)
    return digest.hexdigest()


def file_blocks(fh: BinaryIO, *, skip_through: int = 0, size: int = 1 << 19,
                ) -> Iterator[tuple[int, bytes, int] | int]:
    """The file as blocks of whole lines, (number of the block's first line, bytes, file offset after it),
    after a header line, which is yielded first as its column index (or -1: no header, numbers from line 1).
    Lines up to `skip_through` are skipped (a resumed import). Raises UnreadableFile for binary or UTF-16
    input."""
    check_head(fh.read(4096))
    fh.seek(0)
    first = fh.readline(MAX_LINE)
    offset = len(first)
    head = first.removeprefix(codecs.BOM_UTF8)
    column = _header_column(head.decode("utf-8", "replace").rstrip("\r\n"))
    yield -1 if column is None else column
    lineno, carry = (2, b"") if column is not None else (1, head)
    while True:
        data = fh.read(size)
        buf = carry + data
        if not data:
            if buf and lineno > skip_through:
                yield lineno, buf, offset + len(buf)
            return
        cut = buf.rfind(b"\n")
        if cut < 0:
            if len(buf) > MAX_LINE:
                raise UnreadableFile(f"line {lineno}", f"is longer than {MAX_LINE >> 20} MiB: not a file of numbers")
            carry = buf
            continue
        block, carry = buf[: cut + 1], buf[cut + 1 :]
        offset += len(block)
        count = block.count(b"\n")
        if lineno + count - 1 <= skip_through:
            lineno += count
            continue
        if lineno <= skip_through:
            block = block.split(b"\n", skip_through - lineno + 1)[-1]
            lineno = skip_through + 1
            count = block.count(b"\n")
        yield lineno, block, offset
        lineno += count


async def import_numbers(
    core: Core, fh: BinaryIO, *, name: str, source: Source, reason: str, actor: str,
    progress: Callable[[ImportProgress], None] | None = None, workers: int | None = None,
    block_bytes: int = 1 << 19, restart: bool = False, report: ImportReport | None = None,
) -> ImportReport:
    """Import a file of numbers at the storage's bulk speed; bad rows reported by line number.

    The file is cut into blocks of whole lines that worker processes read and normalise, while this process
    stores the blocks in order, one transaction each (COPY, the chain extended in one pass), and makes the
    new numbers visible in Redis. At most `workers + 1` blocks are in flight, whatever the file's size.
    Each transaction also records the file's last committed line (`optout_imports`, by the file's SHA-256),
    so an interrupted import run again with the same file resumes after it (`resumed_after`) unless
    `restart`. A file that cannot be read on (binary, UTF-16) stops the import with `stopped` set; what was
    committed before stays. Raises StoreUnavailable / StoreRejected when a batch cannot be stored. Pass
    `report` to see how far it got when it is interrupted (cancelled) or fails.
    """
    report = report if report is not None else ImportReport()
    region = core.settings.optout_default_region
    info = os.fstat(fh.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile("file", "is not a regular file (a device, FIFO or directory): import reads files of "
                                     "numbers only")
    total = info.st_size
    sha = await asyncio.to_thread(file_sha256, fh)
    state = await core.store.import_state(sha)
    if state is not None and not state.finished and state.last_line > 0 and not restart:
        report.resumed_after, report.added_before = state.last_line, state.added
        report.last_line = state.last_line
    else:
        await core.store.import_begin(sha, name)
    committer = _Committer(core, report, sha=sha, name=name, reason=reason, source=source, actor=actor)
    count = workers or min(4, os.cpu_count() or 1)
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[_Block]] = deque()
    # Ctrl-C reaches the whole process group: the importer stops the workers, they print nothing.
    pool = ProcessPoolExecutor(max_workers=count, initializer=partial(signal.signal, signal.SIGINT, signal.SIG_IGN))

    async def commit_oldest() -> bool:
        more = await committer.commit(await pending.popleft())
        if progress is not None:
            progress(ImportProgress(report.read, report.done_bytes, total))
        return more

    try:
        blocks = file_blocks(fh, skip_through=report.resumed_after, size=block_bytes)
        try:
            header = next(blocks)
            assert isinstance(header, int)
            column = None if header < 0 else header
            for item in blocks:
                assert not isinstance(item, int)
                first_line, data, end = item
                pending.append(loop.run_in_executor(pool, _parse_block, first_line, data, end, column, region))
                if len(pending) > count and not await commit_oldest():
                    break
        except UnreadableFile as exc:
            report.stopped = str(exc)
        while pending and report.stopped is None:
            await commit_oldest()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    if report.stopped is None:
        await core.store.import_finish(sha)
    await committer.visible()
    return report


class _Committer:
    """Stores an import's blocks in file order, one transaction each. The import is an ordinary writer of the
    store: the keepers apply its changes to Redis from the change feed as they commit (pushed at each commit),
    and at the end the import waits (bounded) until the view holds them all."""

    def __init__(self, core: Core, report: ImportReport, *, sha: str, name: str, reason: str, source: Source,
                 actor: str) -> None:
        self._core, self._report = core, report
        self._sha, self._name, self._reason, self._source, self._actor = sha, name, reason, source, actor
        self._now = datetime.now(UTC)
        self._last_seq = 0

    async def commit(self, block: _Block) -> bool:
        """Commit one block (and the file's progress with it); False when the file cannot be read past it."""
        report = self._report
        report.read += block.rows
        report.bad_count += len(block.bad)
        report.bad.extend(block.bad[: max(0, MAX_BAD_KEPT - len(report.bad))])
        mark = ImportMark(self._sha, self._name, last_line=block.last_line, bad=len(block.bad))
        batch = await self._core.store.import_batch(block.good, added_at=self._now, reason=self._reason,
                                                    source=self._source, actor=self._actor, mark=mark)
        report.added += len(batch.added)
        report.already += len(block.good) - len(batch.added)
        report.done_bytes, report.last_line = block.end, block.last_line
        self._last_seq = max(self._last_seq, batch.last_seq)
        if block.stopped is not None:
            report.stopped = block.stopped
            return False
        return True

    async def visible(self) -> None:
        """Wait until the dialers' view holds every change of the import (the keepers apply them)."""
        keeper = self._core.keeper
        if keeper is None or not self._last_seq:
            return
        try:
            if not await keeper.settle(self._last_seq, within=max(30.0, self._report.added / 20_000)):
                self._report.cache_error = "the Redis view did not catch up with the import in time"
        except CacheUnavailable as exc:
            self._report.cache_error = str(exc)


# --- export, history, audit -------------------------------------------------------------------------
async def export_csv(core: Core) -> AsyncIterator[bytes]:
    """The blacklist as CSV (header first), streamed: the database's COPY where it has one. Every cell is
    neutralised for spreadsheets (agent/csvsafe.py)."""
    yield b"phoneNumber,addedAt,reason,source,metadata\r\n"
    fast = core.store.blacklist_csv()
    if fast is not None:
        async for chunk in csvsafe.neutralised(fast):
            yield chunk
        return
    async for batch in core.store.entries():
        yield csvsafe.rows_csv(
            [e.phone_number, e.added_at, e.reason, e.source.value,
             json.dumps(e.metadata, separators=(",", ":")) if e.metadata else ""] for e in batch)


AUDIT_COLUMNS = (
    "id", "event_id", "phone_number", "call_id", "campaign_id", "contact_id", "origin", "source", "digit",
    "pressed_at", "received_at", "journaled_at", "hangup_requested_at", "hungup_at", "visible_at", "recorded_at",
    "hangup_method", "hangup_result", "outcome", "actor", "reason", "number_source", "row_hash",
)


async def export_audit_csv(
    core: Core, *, campaign_id: str | None, number_prefix: str | None
) -> AsyncIterator[bytes]:
    """Audit rows of a campaign or number range as CSV (header first), streamed; every cell neutralised for
    spreadsheets (agent/csvsafe.py)."""
    yield (",".join(AUDIT_COLUMNS) + "\r\n").encode()
    fast = core.store.actions_csv(AUDIT_COLUMNS, campaign_id=campaign_id, number_prefix=number_prefix)
    if fast is not None:
        async for chunk in csvsafe.neutralised(fast):
            yield chunk
        return
    rows: list[list[Any]] = []
    async for row in core.store.actions(campaign_id=campaign_id, number_prefix=number_prefix):
        cells = row.columns() | {"visible_at": row.seen_at}
        rows.append([cells[c] for c in AUDIT_COLUMNS])
        if len(rows) == 1000:
            yield csvsafe.rows_csv(rows)
            rows.clear()
    yield csvsafe.rows_csv(rows)
