"""CSV cells a spreadsheet cannot run: every CSV the product writes goes through here (`optout export`,
`export --audit`, `report --csv`). No I/O.

Per OWASP's CSV-injection advice, a cell that begins with `=`, `+`, `-`, `@`, TAB or CR is prefixed with `'`:
a spreadsheet then shows the text instead of evaluating a formula (`=HYPERLINK(...)`, `+SUM(1,1)`, `@SUM(1)`,
`-2+3`). That includes E.164 numbers (`'+15551234567`) and negative figures: the rule has no exceptions, so no
producer-supplied id can slip through one. `optout import` reads such a cell back without its `'`
(`unneutralise`).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula."""
_TRIGGER_BYTES = tuple(t.encode() for t in TRIGGERS)
_CELL_STARTS = (re.compile(rb',"?[=+\-@\t\r]'), re.compile(rb'\n"?[=+\-@\t\r]'))
"""Where a cell may begin with a formula character: after a comma or a line break, quoted or not. Two
passes, each led by one literal byte, so the regex engine jumps from comma to comma."""


def cell(value: Any) -> str:
    """`value` as a CSV cell a spreadsheet shows as text (None is an empty cell, datetimes ISO 8601)."""
    if value is None:
        return ""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    # A text that already starts with ' and a formula character gets one more, so `unneutralise` gives it back.
    return "'" + text if text.startswith(TRIGGERS) or unneutralise(text) != text else text


def unneutralise(text: str) -> str:
    """A cell read back: without the `'` that `cell` put before a formula character."""
    return text[1:] if text.startswith("'") and text[1:2] in TRIGGERS else text


def rows_csv(rows: Iterable[Iterable[Any]]) -> bytes:
    """Rows as CSV text (CRLF line ends), every cell through `cell`."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows([cell(v) for v in row] for row in rows)
    return out.getvalue().encode()


def _neutralise_block(data: bytes) -> bytes:
    """Whole records of PostgreSQL's `COPY ... (FORMAT csv)` (LF line ends), as `rows_csv` would write them."""
    if b"'" in data:  # a cell may start with ' already: the exact (slower) way
        return rows_csv(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    starts = sorted(m.start() + 1 for pattern in _CELL_STARTS for m in pattern.finditer(data))
    if data.startswith(_TRIGGER_BYTES) or data.startswith(tuple(b'"' + t for t in _TRIGGER_BYTES)):
        starts.insert(0, 0)
    out: list[bytes] = []
    at = quotes = 0
    for start in starts:  # a cell starts there only outside a quoted field (an even number of quotes before)
        quotes += data.count(b'"', at, start)
        out.append(data[at:start])
        at = start
        if quotes % 2 == 0:
            if data[start:start + 1] == b'"':
                out.append(b'"')
                at += 1
                quotes += 1
            out.append(b"'")
    out.append(data[at:])
    return b"".join(out).replace(b"\n", b"\r\n")


def _records_end(buf: bytes) -> int:
    """The offset after the last whole record in `buf` (a newline outside quotes), 0 when there is none."""
    at = buf.rfind(b"\n")
    while at >= 0:
        if buf.count(b'"', 0, at) % 2 == 0:
            return at + 1
        at = buf.rfind(b"\n", 0, at)
    return 0


async def neutralised(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed `COPY ... (FORMAT csv)` with every cell through `cell` (CRLF line ends), chunk by chunk."""
    carry = b""
    async for chunk in chunks:
        buf = carry + chunk
        end = _records_end(buf)
        carry = buf[end:]
        if end:
            yield _neutralise_block(buf[:end])
    if carry:
        yield _neutralise_block(carry if carry.endswith(b"\n") else carry + b"\n")
