"""Structured JSON logs, with phone numbers masked unless LOG_FULL_NUMBERS is set.

Masking happens in the formatter, on the final text, so no call site can leak a full number by mistake.
It works by detection: any run of 7 or more digits (any script's digits, as `normalise` reads them) joined by
up to three of the separators `normalise` accepts (spaces of any kind, NBSP, every dash, dots, slashes,
brackets, tildes, and `_`), with or without a leading `+`, keeps only its last four digits, wherever it
stands: in a `sip:`/`tel:` URI, glued to a word (`callee12025550123`), before a decimal part
(`2025550123.5`), or inside a channel name (`PJSIP/12025550123-0000002a`: the channel's hex suffix is a
word of its own and stays). Left alone are digits inside a hex id (a word of hex digits with at least one
letter: `0000002a`, an event id's digest), ISO dates, and Asterisk uniqueids of this era (`1764108866.123`,
epoch seconds within the last ten years), so ids and timestamps stay usable.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from agent.phone import mask

_SEP = ("[\\s_\\-\u2010-\u2015\u2212\u30fc\uff0d\uff0f/.()\uff08\uff09\uff3b\uff3d\\[\\]~\u2053\u223c\uff5e"
        "\u00ad\u200b\u2060]")
"""The separators `normalise` accepts between digits (phonenumbers' punctuation, any whitespace), and `_`."""
_NUMBER = re.compile(rf"[+\uff0b]?\d(?:{_SEP}{{0,3}}\d)+")
_DATE = re.compile(r"(?:19|2\d)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])", re.ASCII)
_UNIQUEID = re.compile(r"(\d{10})\.\d{1,6}", re.ASCII)
_HEX_WORD = re.compile(r"[0-9A-Fa-f]*[A-Fa-f][0-9A-Fa-f]*")
_MIN_DIGITS = 7
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def _word(text: str, start: int, end: int) -> str:
    """The run of letters and digits around text[start:end] (the run itself holds no separator)."""
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return text[start:end]


def _kept(text: str, start: int, end: int) -> bool:
    """A digit run that is not a phone number: an ISO date, a uniqueid of this era, part of a hex id."""
    found = text[start:end]
    if _DATE.fullmatch(found):
        return True
    if (uid := _UNIQUEID.fullmatch(found)) and time.time() - 10 * 365 * 86400 < int(uid.group(1)) < time.time() + 86400:
        return True
    return found.isalnum() and _HEX_WORD.fullmatch(_word(text, start, end)) is not None


def mask_numbers(text: str) -> str:
    """Mask every phone-number-looking run of 7 or more digits in `text` (module docstring)."""
    out: list[str] = []
    at = 0
    for m in _NUMBER.finditer(text):
        start, end = m.span()
        if (date := _DATE.match(text, start)) is not None and date.end() < end:  # a timestamp: its time goes on
            start = date.end()
            while start < end and not text[start].isdigit():
                start += 1
        # A last part glued to letters is a word of its own (a channel's hex suffix): not part of the number.
        if end < len(text) and text[end].isalpha():
            cut = max((i for i in range(start, end) if not text[i].isdigit()), default=-1)
            if cut > start and _HEX_WORD.fullmatch(_word(text, cut + 1, end)):
                end = cut
                while end > start and not text[end - 1].isdigit():
                    end -= 1
        if _digits(text[start:end]) < _MIN_DIGITS or _kept(text, start, end):
            continue
        out.append(text[at:start])
        out.append(mask(text[start:end]))
        at = end
    out.append(text[at:])
    return "".join(out)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any `extra=` fields."""

    def __init__(self, *, full_numbers: bool = False) -> None:
        super().__init__()
        self._full = full_numbers

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        text = json.dumps(out, default=str, ensure_ascii=False)
        return text if self._full else mask_numbers(text)


def configure(level: str = "INFO", *, full_numbers: bool = False) -> None:
    """Send every log record to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(full_numbers=full_numbers))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "botocore", "aiobotocore", "aioswagger11", "aioari", "panoramisk"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
