"""Structured JSON logs, with phone numbers masked unless LOG_FULL_NUMBERS is set.

Masking happens in the formatter, on the final text, so no call site can leak a full number by mistake:
anything that looks like a phone number (7 or more digits, optionally with + and single separators between
them) keeps only its last four digits, wherever it stands: in a `sip:`/`tel:` URI, before a full stop or a
colon, in a channel name. Left alone are digits glued to a hex id, ISO dates and times, and
Asterisk's uniqueids (`1764108866.123`), so ids and timestamps stay usable.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from agent.phone import mask

_NUMBER = re.compile(r"(?<![0-9A-Fa-f])\+?\(?\d(?:[ ()./-]{0,2}\d)+")
_KEEP = re.compile(
    r"\d{4}-\d{2}-\d{2}"          # an ISO date
    r"|\d{10}\.\d{1,6}"           # an Asterisk uniqueid (epoch.sequence)
)
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def mask_numbers(text: str) -> str:
    """Mask every phone-number-looking run of 7 or more digits in `text`."""

    def repl(m: re.Match[str]) -> str:
        found = m.group(0)
        end = m.end()
        if sum(ch.isdigit() for ch in found) < 7 or _KEEP.fullmatch(found):
            return found
        if end < len(text) and (text[end].isalpha() and text[end] in "abcdefABCDEF"):
            return found  # part of a hex id
        return mask(found)

    return _NUMBER.sub(repl, text)


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
