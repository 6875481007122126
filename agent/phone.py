"""Phone numbers: normalisation to E.164 and masking for logs. No I/O (but a rate-limited warning)."""

from __future__ import annotations

import logging
import re
import time
from functools import cache

import phonenumbers

from agent.errors import InvalidPhoneNumber

log = logging.getLogger("agent.phone")

_MAX_INPUT = 64
_REGION_WARNING_EVERY = 60.0
_region_warned: dict[str, float] = {}
_REASONS = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "has no valid country code",
    phonenumbers.ValidationResult.TOO_SHORT: "is too short",
    phonenumbers.ValidationResult.TOO_LONG: "is too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "has a length no number of its country has",
    phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "is a local number without its area code",
}


def normalise(raw: object, *, region: str, field: str = "phoneNumber") -> str:
    """Return `raw` as an E.164 number (`+972501234567`).

    National formats are read in `region` (ISO 3166 alpha-2, e.g. "IL"); `+`-prefixed and `00`-less
    international formats need no region. Raises InvalidPhoneNumber naming `field` when the value is
    not a string, cannot be parsed, or cannot be a number of its country (wrong length).
    """
    if not isinstance(raw, str):
        raise InvalidPhoneNumber(field, f"expected a string, got {type(raw).__name__}")
    text = raw.strip()
    if not text:
        raise InvalidPhoneNumber(field, "is empty")
    if len(text) > _MAX_INPUT:
        raise InvalidPhoneNumber(field, f"is {len(text)} characters long, more than {_MAX_INPUT}")
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhoneNumber(field, f"{excerpt(text)!r} cannot be read as a phone number ({exc})") from exc
    # "Possible" (a known country code and a length that country uses), not "valid" (inside a range the
    # library's metadata knows is allocated): allocation data lags reality, and refusing a real caller's
    # opt-out because a range is new would be the worse mistake.
    reason = phonenumbers.is_possible_number_with_reason(parsed)
    if reason != phonenumbers.ValidationResult.IS_POSSIBLE:
        problem = _REASONS.get(reason, "is not a possible number")
        raise InvalidPhoneNumber(field, f"{excerpt(text)!r} {problem} (read in region {region})")
    e164 = str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))
    if not text.startswith("+") and not phonenumbers.is_valid_number(parsed):
        _warn_region(text, e164, region)
    return e164


_CANONICAL = re.compile(r"\+([1-9][0-9]{2,16})", re.ASCII)


@cache
def _e164_table() -> dict[str, tuple[frozenset[int], re.Pattern[str] | None] | None]:
    """Country calling code (as text) -> (lengths a national number may have, the national prefix `parse`
    would try to strip, if any). Built once from phonenumbers' metadata, as `is_possible_number_with_reason`
    reads it: the general description's possible lengths, local-only lengths excluded."""
    table: dict[str, tuple[frozenset[int], re.Pattern[str] | None] | None] = {}
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        region = phonenumbers.region_code_for_country_code(code)
        meta = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, region)
        if meta is None or meta.general_desc is None:
            table[str(code)] = None  # a code without metadata: the full parse decides
            continue
        lengths = frozenset(meta.general_desc.possible_length) - frozenset(
            meta.general_desc.possible_length_local_only or ())
        prefix = meta.national_prefix_for_parsing
        table[str(code)] = (frozenset(n for n in lengths if n > 0), re.compile(prefix) if prefix else None)
    return table


def canonical_e164(text: str) -> str | None:
    """`text` itself when it is already canonical E.164 that `normalise` would return unchanged (a known
    country code, a possible length, nothing `parse` would strip); None when it needs the full parse.

    A cheap check (no parsing): imports of E.164 files spend their time here rather than in phonenumbers.
    """
    match = _CANONICAL.fullmatch(text)
    if match is None:
        return None
    digits = match.group(1)
    table = _e164_table()
    for size in (1, 2, 3):
        code = digits[:size]
        if code not in table:
            continue
        # phonenumbers takes the first prefix that is a country code, as here.
        entry = table[code]
        if entry is None:
            return None
        national = digits[size:]
        lengths, prefix = entry
        if len(national) not in lengths or (prefix is not None and prefix.match(national)):
            return None
        return text
    return None


def normalise_many(rows: list[str], *, region: str, field: str = "phoneNumber") -> list[str | InvalidPhoneNumber]:
    """`normalise` of each row (its E.164 form or its problem), the canonical ones by the cheap check."""
    out: list[str | InvalidPhoneNumber] = []
    append = out.append
    for raw in rows:
        text = raw.strip()
        if text.startswith("+") and (e164 := canonical_e164(text)) is not None:
            append(e164)
            continue
        try:
            append(normalise(raw, region=region, field=field))
        except InvalidPhoneNumber as exc:
            append(exc)
    return out


def _warn_region(text: str, e164: str, region: str) -> None:
    """A national-format number that is only *possible* in the default region is accepted, but a wrong
    OPTOUT_DEFAULT_REGION (0501234567 read in US is +10501234567) must be noticed: say so, at most once a
    minute per region."""
    now = time.monotonic()
    if now - _region_warned.get(region, -_REGION_WARNING_EVERY) < _REGION_WARNING_EVERY:
        return
    _region_warned[region] = now
    log.warning("national-format number %s read in region %s as %s, which is not a valid number there: check "
                "OPTOUT_DEFAULT_REGION (accepted, as possible numbers are)", mask(text), region, mask(e164),
                extra={"region": region})


EXCERPT = 16
"""Characters of a refused value an error message shows (masked), so a message never echoes a whole line."""


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """`text` for an error message: digits masked (but the last four), cut at `limit` characters."""
    shown = mask(text)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def mask(number: str, *, keep: int = 4) -> str:
    """All but the last `keep` digits replaced by `*` (`+*********4567`); formatting characters kept."""
    digits_seen = 0
    total = sum(ch.isdigit() for ch in number)
    out = []
    for ch in number:
        if ch.isdigit():
            digits_seen += 1
            out.append(ch if digits_seen > total - keep else "*")
        else:
            out.append(ch)
    return "".join(out)
