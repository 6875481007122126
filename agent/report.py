"""The compliance report: what the audit trail shows for a period (and a campaign), as one self-contained HTML
file and as CSV tables. No telephony: it reads the store only.

`collect` streams `Store.actions` once and keeps bounded state: counters per day, the last TABLE_ROWS
prevented calls and removals, and a uniform reservoir of RESERVOIR latency samples per measure (exact
percentiles up to that many; a uniform sample beyond). The period is the time the agent *received* each
action, `since <= received_at < until`; the store filters on its recorded time, which is never earlier,
so the scan reaches STORE_SLACK past `until` to include actions stored late (journal replay after an outage).

Latencies, in milliseconds:
- press -> hangup: `hungup_at` (else `hangup_requested_at`) minus `pressed_at` (else `received_at`);
- press -> visible to the dialers: `visible_at` (the writer saw it in Redis, else `cache_visible_at`, when
  the cache sync applied it) minus the press as above.
Only rows with both moments count. Percentiles are nearest-rank: pN is the smallest sample with at least
N% of the samples at or below it. `pressed_at` is Asterisk's clock for ari/ami, so a skew between hosts
shows up in these figures (they can even be negative).

Numbers are masked (agent.phone.mask) in the HTML and the CSV unless `full_numbers=True`.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from agent import charts, csvsafe
from agent.audit import ChainReport
from agent.constants import Origin, Outcome, Source
from agent.phone import mask
from agent.store import ActionRow, Store

T = TypeVar("T")
RESERVOIR = 100_000
TABLE_ROWS = 10_000
"""Prevented calls and removals listed (the newest); the counts cover all of them."""
STORE_SLACK = timedelta(days=1)
ORIGINS = tuple(o.value for o in Origin)
ORIGIN_COLOURS = {"ari": "#2563eb", "agi": "#16a34a", "ami": "#9333ea", "sns": "#ea580c", "admin": "#64748b",
                  "speech": "#0891b2"}
OPTOUT_OUTCOMES = frozenset({Outcome.BLACKLISTED.value, Outcome.ALREADY_BLACKLISTED.value,
                             Outcome.NUMBER_UNKNOWN.value})
MAX_DAY_SPAN = 1000
"""Longest period drawn day by day, gaps included."""
PERCENTILES = (50, 90, 99)
LOG_RATIO = 20
LOG_STEPS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)


@dataclass
class Latencies:
    """One latency measure, bounded: exact count, sum, min and max; a uniform reservoir (Algorithm R, seeded,
    so a report is reproducible) for percentiles and the histogram."""

    cap: int = RESERVOIR
    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    sample: list[float] = field(default_factory=list)
    _rng: random.Random = field(default_factory=lambda: random.Random(13), repr=False)  # noqa: S311 - sampling
    _sorted: list[float] | None = field(default=None, repr=False)

    def add(self, ms: float) -> None:
        self.count += 1
        self.total += ms
        self.minimum = min(self.minimum, ms)
        self.maximum = max(self.maximum, ms)
        self._sorted = None
        if len(self.sample) < self.cap:
            self.sample.append(ms)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.cap:
                self.sample[slot] = ms

    @property
    def exact(self) -> bool:
        """The percentiles are over every value (not a sample)."""
        return self.count <= self.cap

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile (None without samples)."""
        if not self.sample:
            return None
        if self._sorted is None:
            self._sorted = sorted(self.sample)
        rank = max(1, math.ceil(p / 100 * len(self._sorted)))
        return self._sorted[rank - 1]

    def bins(self, *, target: int = 24) -> Bins:
        """The sample's histogram. Bins are [a, b). Linear, unless the tail reaches past LOG_RATIO x p50: then
        log-spaced (1, 1.5, 2, 3, 5, 7 x 10^k ms, the first bin holding everything under its upper edge), so a
        fast bulk and a slow tail both show. A linear histogram reaches past the maximum unless it lies far
        beyond p99; then the tail is one overflow count."""
        if not self.sample:
            return Bins([], [], 0, log=False)
        p50, p99 = self.percentile(50) or 0.0, self.percentile(99) or 0.0
        smallest, largest = min(self.sample), max(self.sample)
        log = p50 > 0 and largest > LOG_RATIO * p50
        if log:  # the series reaches past the largest value, however far (an opt-out months old)
            top = math.ceil(math.log10(max(largest, 1.0))) + 1
            series = [m * 10.0**k for k in range(-1, top + 1) for m in LOG_STEPS]
            first = min(smallest, 0.0) if smallest < 1 else max(e for e in series if e <= smallest)
            inner = [e for e in series if max(first, 0.5) < e <= largest]
            edges = [first, *inner, next(e for e in series if e > largest)]
        else:
            low = min(0.0, smallest)
            high = largest if largest <= max(p99 * 1.5, 1.0) else p99 * 1.25
            step = charts.nice_step(high - low, ticks=target)
            low = math.floor(low / step) * step
            n = max(1, math.floor((high - low) / step) + 1)
            edges = [low + i * step for i in range(n + 1)]
        counts = [0] * (len(edges) - 1)
        overflow = 0
        for value in self.sample:
            i = bisect_right(edges, value) - 1
            if i >= len(counts):
                overflow += 1
            else:
                counts[max(i, 0)] += 1
        return Bins(edges, counts, overflow, log=log)


class Bins(NamedTuple):
    edges: list[float]
    counts: list[int]
    overflow: int
    """Sampled values at or past the last edge."""
    log: bool


@dataclass(frozen=True)
class Action:
    """One prevented call or removal, for the report's tables."""

    at: datetime
    phone_number: str | None
    origin: str
    campaign_id: str | None
    call_id: str | None
    actor: str | None
    reason: str | None
    event_id: str


@dataclass(frozen=True)
class Spoken:
    """One spoken opt-out (origin speech) or candidate (speech mode `flag`), with what was said."""

    at: datetime
    phone_number: str | None
    outcome: str
    transcript: str | None
    score: str | None
    phrase: str | None
    event_id: str


@dataclass
class ReportData:
    """What `collect` found; bounded whatever the size of the trail."""

    since: datetime | None
    until: datetime | None
    campaign: str | None
    rows: int = 0
    """Audit rows in the period."""
    outcomes: Counter[str] = field(default_factory=Counter)
    optouts: dict[date, Counter[str]] = field(default_factory=dict)
    """Day (UTC, received) -> origin -> opt-outs (blacklisted, already blacklisted, number unknown)."""
    imported: dict[date, int] = field(default_factory=dict)
    """Day -> numbers added by `optout import` (kept apart: one file can add a million)."""
    prevented_by_day: dict[date, int] = field(default_factory=dict)
    removed_by_day: dict[date, int] = field(default_factory=dict)
    prevented: deque[Action] = field(default_factory=lambda: deque(maxlen=TABLE_ROWS))
    removals: deque[Action] = field(default_factory=lambda: deque(maxlen=TABLE_ROWS))
    spoken: deque[Spoken] = field(default_factory=lambda: deque(maxlen=TABLE_ROWS))
    spoken_total: int = 0
    """Rows of origin speech: opt-outs and candidates (agent/speech)."""
    hangup: Latencies = field(default_factory=Latencies)
    visible: Latencies = field(default_factory=Latencies)

    @property
    def optout_total(self) -> int:
        return sum(sum(c.values()) for c in self.optouts.values())

    @property
    def prevented_total(self) -> int:
        return sum(self.prevented_by_day.values())

    @property
    def removed_total(self) -> int:
        return sum(self.removed_by_day.values())

    def days(self) -> list[date]:
        """Every day from the first to the last with anything counted (gaps included, as zero); over
        MAX_DAY_SPAN days (an outlier years away), only the days with something counted."""
        seen = {*self.optouts, *self.imported, *self.prevented_by_day, *self.removed_by_day}
        if not seen:
            return []
        first, last = min(seen), max(seen)
        if (last - first).days >= MAX_DAY_SPAN:
            return sorted(seen)
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]

    def add(self, row: ActionRow) -> None:
        """Count one audit row (as `Store.actions` yields it); rows received outside the period are skipped."""
        received = row.received_at
        if (self.since and received < self.since) or (self.until and received >= self.until):
            return
        self.rows += 1
        outcome, origin, day = row.outcome, row.origin, received.astimezone(UTC).date()
        self.outcomes[outcome] += 1
        if outcome in OPTOUT_OUTCOMES:
            if origin == Origin.ADMIN.value and row.source == Source.ADMIN_IMPORT.value:
                self.imported[day] = self.imported.get(day, 0) + 1
            else:
                self.optouts.setdefault(day, Counter())[origin] += 1
        elif outcome in (Outcome.PREVENTED.value, Outcome.REMOVED.value):
            action = Action(received, row.phone_number, origin, row.campaign_id, row.call_id, row.actor, row.reason,
                            row.event_id)
            by_day, table = ((self.prevented_by_day, self.prevented) if outcome == Outcome.PREVENTED.value
                             else (self.removed_by_day, self.removals))
            by_day[day] = by_day.get(day, 0) + 1
            table.append(action)
        if origin == Origin.SPEECH.value:
            self.spoken_total += 1
            self.spoken.append(Spoken(received, row.phone_number, outcome, row.speech_transcript, row.speech_score,
                                      row.speech_phrase, row.event_id))
        press = row.pressed_at or received
        for latencies, end in ((self.hangup, row.hungup_at or row.hangup_requested_at), (self.visible, row.seen_at)):
            if end is not None:
                latencies.add((end - press).total_seconds() * 1000)


async def collect(
    store: Store, *, since: datetime | None, until: datetime | None, campaign: str | None
) -> ReportData:
    """One pass over the audit rows received in `[since, until)` (either open) of `campaign` (all when None).
    Raises what `Store.actions` raises (StoreUnavailable)."""
    data = ReportData(since=since, until=until, campaign=campaign)
    scan_until = data.until + STORE_SLACK if data.until else None
    async for row in store.actions(campaign_id=campaign, since=data.since, until=scan_until):
        data.add(row)
    return data


# --- shared by the HTML and the CSV ------------------------------------------------------------------------
def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + " UTC" if value else "-"


def fmt_ms(value: float | None) -> str:
    """A latency for people: `87.5 ms`, `240 ms`, `1.25 s`, `12.3 s`, or `-` without one."""
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value / 1000:.1f} s"
    if abs(value) >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms" if abs(value) < 100 else f"{value:.0f} ms"


def shown(number: str | None, full_numbers: bool) -> str:
    if not number:
        return "-"
    return number if full_numbers else mask(number)


def _per_day_rows(data: ReportData) -> list[list[Any]]:
    rows = []
    for day in data.days():
        counts = data.optouts.get(day, Counter())
        rows.append([day.isoformat(), *(counts.get(o, 0) for o in ORIGINS), sum(counts.values()),
                     data.imported.get(day, 0), data.prevented_by_day.get(day, 0), data.removed_by_day.get(day, 0)])
    return rows


PER_DAY_HEADER = ["day", *ORIGINS, "optouts", "imported", "prevented", "removed"]


def _period(data: ReportData) -> str:
    if data.since is None and data.until is None:
        return "the whole audit trail"
    start = when(data.since) if data.since else "the start"
    return f"received from {start} to {when(data.until) if data.until else 'now'}"


# --- HTML ----------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#111827;margin:0;
  background:#f9fafb}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.meta{color:#4b5563;margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(118px,1fr));gap:10px;margin-top:16px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 12px}
.card b{display:block;font-size:22px}
.card span{color:#4b5563;font-size:13px}
.ok{color:#15803d}
.bad{color:#b91c1c}
svg.chart{background:#fff;border:1px solid #e5e7eb;border-radius:8px;max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6}
td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px;word-break:break-all}
.stats{margin:6px 0;color:#374151}
.note{color:#6b7280;font-size:13px}
"""


def _table(header: list[str], rows: list[list[str]], *, numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    cell = ('<td class="n">', "<td>")
    body = "".join("<tr>" + "".join(f"{cell[i not in numeric]}{escape(str(v))}</td>" for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _latency_section(key: str, heading: str, lat: Latencies, how: str) -> str:
    p50, p99 = lat.percentile(50), lat.percentile(99)
    stats = (f'<p class="stats" id="{key}-stats">{lat.count} calls · <b>p50 {escape(fmt_ms(p50))}</b> · '
             f'p90 {escape(fmt_ms(lat.percentile(90)))} · <b>p99 {escape(fmt_ms(p99))}</b> · '
             f'min {escape(fmt_ms(lat.minimum if lat.count else None))} · '
             f'max {escape(fmt_ms(lat.maximum if lat.count else None))}</p>')
    if not lat.exact:
        stats += (f'<p class="note">Percentiles and histogram from a uniform sample of {len(lat.sample)} of '
                  f'{lat.count} calls.</p>')
    if not lat.count:
        return f"<h2>{escape(heading)}</h2><p class=\"note\">{escape(how)}</p>{stats}"
    edges, counts, overflow, log = lat.bins()
    markers = [charts.Marker(f"p50 {fmt_ms(p50)}", p50 or 0.0, "#059669"),
               charts.Marker(f"p99 {fmt_ms(p99)}", p99 or 0.0, "#dc2626")]
    chart = charts.histogram(edges, counts, overflow=overflow, unit="ms (log scale)" if log else "ms", markers=markers,
                             title=f"{heading}: calls per latency bin")
    return f"<h2>{escape(heading)}</h2><p class=\"note\">{escape(how)}</p>{stats}{chart}"


def _chain_section(chain: ChainReport) -> str:
    legacy = f" (after {chain.legacy} rows written before the chain began)" if chain.legacy else ""
    if chain.intact:
        status = (f'<p id="chain-status" class="ok"><b>Intact</b>: {chain.rows} rows chained{escape(legacy)}; '
                  "every row's hash matches its content and the row before it.</p>")
        head_label = "Head hash"
    else:
        status = (f'<p id="chain-status" class="bad"><b>BROKEN at row {escape(str(chain.broken_at))}</b>: '
                  f"{escape(chain.problem or '')}. The {chain.rows} rows before it are intact{escape(legacy)}.</p>")
        head_label = "Last intact hash"
    head = f"<p>{head_label}: <code id=\"chain-head\">{escape(chain.head or 'none (no chained rows)')}</code></p>"
    found = (f"<p>The expected head is the hash of row {chain.head_found_at}.</p>"
             if chain.head_found_at is not None else "")
    note = ('<p class="note">The chain covers the whole audit trail, not only this period. Keep the head hash '
            "somewhere else (<code>optout audit head</code>): a rewrite of the whole chain is only caught "
            "against it.</p>")
    return f"<h2>Audit chain</h2>{status}{head}{found}{note}"


def render_html(data: ReportData, chain: ChainReport, *, generated_at: datetime, title: str,
                full_numbers: bool = False) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; nothing fetched). Every value is
    escaped; numbers are masked unless `full_numbers`."""
    days = data.days()
    labels = [d.strftime("%m-%d") if len(days) > 1 else d.isoformat() for d in days]
    optout_series = [charts.Series(o, ORIGIN_COLOURS.get(o, "#374151"),
                                   [data.optouts.get(d, Counter()).get(o, 0) for d in days]) for o in ORIGINS]
    chain_card = ('<b class="ok">intact</b>' if chain.intact
                  else f'<b class="bad">broken at row {escape(str(chain.broken_at))}</b>')
    cards = [
        (f"<b id=\"optouts-total\">{data.optout_total}</b>", "opt-outs"),
        (f"<b>{sum(data.imported.values())}</b>", "numbers imported"),
        (f"<b id=\"prevented-total\">{data.prevented_total}</b>", "calls prevented"),
        (f"<b id=\"removed-total\">{data.removed_total}</b>", "numbers removed"),
        (f"<b>{escape(fmt_ms(data.hangup.percentile(99)))}</b>", "press → hangup p99"),
        (f"<b>{escape(fmt_ms(data.visible.percentile(99)))}</b>", "press → visible p99"),
        (chain_card, "audit chain"),
    ]
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>{escape(title)}</h1>",
        f"<p class=\"meta\">{escape(_period(data).capitalize())}"
        f"{escape(f' · campaign {data.campaign}' if data.campaign else ' · all campaigns')}"
        f" · generated {escape(when(generated_at))} · {data.rows} audit rows</p>",
        '<div class="cards">' + "".join(f'<div class="card">{v}<span>{escape(k)}</span></div>' for v, k in cards)
        + "</div>",
        "<h2>Opt-outs per day, by origin</h2>",
        '<p class="note">Days are UTC, by the time the agent received the press. Numbers added by '
        "<code>optout import</code> are counted apart, in the table below.</p>",
        charts.stacked_bars(labels, optout_series, title="Opt-outs per day by origin"),
        "<details><summary>Per-day counts</summary>",
        _table(PER_DAY_HEADER, [[str(v) for v in r] for r in _per_day_rows(data)],
               numeric=set(range(1, len(PER_DAY_HEADER)))),
        "</details>",
        _latency_section("hangup", "Press → hangup", data.hangup,
                         "From the press (Asterisk's time where it gave one, else when the agent received it) to "
                         "the hangup (Asterisk's time, else when the agent asked for it)."),
        _latency_section("visible", "Press → visible to the dialers", data.visible,
                         "From the press to the moment the number was in Redis, where the dialers check "
                         "(confirmed by the writer, else by the cache sync)."),
        "<h2>Spoken opt-outs and candidates</h2>",
        '<p class="note">What callees said (agent/speech): <code>blacklisted</code> and the like were honoured '
        "like a press; <code>speech_candidate</code> were flagged for review and changed nothing. Transcripts are "
        "personal data.</p>",
        _listing(data.spoken, data.spoken_total,
                 ["time", "number", "outcome", "transcript", "score", "phrase", "event"],
                 lambda s: [when(s.at), shown(s.phone_number, full_numbers), s.outcome, s.transcript or "-",
                            s.score or "-", s.phrase or "-", s.event_id]),
        "<h2>Removals</h2>",
        '<p class="note">Removals belong to no campaign: a campaign report lists none.</p>' if data.campaign else "",
        _listing(data.removals, data.removed_total, ["time", "number", "who", "why", "event"],
                 lambda a: [when(a.at), shown(a.phone_number, full_numbers), a.actor or "-", a.reason or "-",
                            a.event_id]),
        _chain_section(chain),
        "<h2>Prevented calls</h2>",
        f"<p class=\"stats\">Calls to blacklisted numbers stopped before they were placed: {data.prevented_total}.</p>",
        charts.stacked_bars(labels, [charts.Series("prevented", "#dc2626",
                                                   [data.prevented_by_day.get(d, 0) for d in days])],
                            title="Prevented calls per day", height=200) if data.prevented_total else "",
        _listing(data.prevented, data.prevented_total,
                 ["time", "number", "via", "campaign", "call", "event"],
                 lambda a: [when(a.at), shown(a.phone_number, full_numbers), a.origin, a.campaign_id or "-",
                            a.call_id or "-", a.event_id]),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _listing(items: deque[T], total: int, header: list[str], row: Callable[[T], list[str]]) -> str:
    """The newest `items` (of `total`) as a table, newest first."""
    if not total:
        return '<p class="note">None in this period.</p>'
    note = (f'<p class="note">The newest {len(items)} of {total}.</p>' if len(items) < total else "")
    return note + _table(header, [row(item) for item in reversed(items)])


# --- CSV -------------------------------------------------------------------------------------------------------
def write_csv(data: ReportData, directory: Path, *, chain: ChainReport | None = None,
              full_numbers: bool = False) -> list[Path]:
    """The report's tables as CSV files in `directory` (created if missing): per-day counts, latency
    percentiles and histograms, prevented calls, removals and, when given, the chain's status. Returns
    the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    measures = (("press_to_hangup", data.hangup), ("press_to_visible", data.visible))
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {
        "per_day.csv": (PER_DAY_HEADER, _per_day_rows(data)),
        "latency.csv": (["measure", "count", "sampled", *(f"p{p}_ms" for p in PERCENTILES), "min_ms", "max_ms",
                         "mean_ms"],
                        [[name, lat.count, len(lat.sample), *(_round(lat.percentile(p)) for p in PERCENTILES),
                          _round(lat.minimum if lat.count else None), _round(lat.maximum if lat.count else None),
                          _round(lat.mean)] for name, lat in measures]),
        "latency_histogram.csv": (["measure", "from_ms", "to_ms", "count"], [
            [name, _round(lo), _round(hi), count]
            for name, lat in measures for lo, hi, count in _bin_rows(lat)]),
        "prevented.csv": (["at", "phone_number", "via", "campaign_id", "call_id", "event_id"], [
            [a.at, _csv_number(a.phone_number, full_numbers), a.origin, a.campaign_id, a.call_id, a.event_id]
            for a in data.prevented]),
        "removals.csv": (["at", "phone_number", "actor", "reason", "event_id"], [
            [a.at, _csv_number(a.phone_number, full_numbers), a.actor, a.reason, a.event_id] for a in data.removals]),
        "spoken.csv": (["at", "phone_number", "outcome", "transcript", "score", "phrase", "event_id"], [
            [s.at, _csv_number(s.phone_number, full_numbers), s.outcome, s.transcript, s.score, s.phrase, s.event_id]
            for s in data.spoken]),
    }
    if chain is not None:
        tables["chain.csv"] = (["intact", "rows", "legacy_rows", "broken_at", "problem", "head"], [
            ["yes" if chain.intact else "no", chain.rows, chain.legacy, chain.broken_at, chain.problem, chain.head]])
    for name, (header, rows) in tables.items():
        (directory / name).write_bytes(csvsafe.rows_csv([header, *rows]))
    return [directory / name for name in tables]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _csv_number(number: str | None, full_numbers: bool) -> str | None:
    return shown(number, full_numbers) if number else None


def _bin_rows(lat: Latencies) -> list[tuple[float, float | None, int]]:
    edges, counts, overflow, _ = lat.bins()
    rows: list[tuple[float, float | None, int]] = [(edges[i], edges[i + 1], c) for i, c in enumerate(counts)]
    if overflow:
        rows.append((edges[-1], None, overflow))
    return rows
