"""The compliance report (agent/report.py): figures collected from the real stores, the HTML page, the CSV
tables, and the page as a real headless Chromium draws it."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import report
from agent.audit import ChainReport, ChainVerifier
from agent.constants import Origin, Outcome, Source
from agent.optout import HangupInfo, OptOutRecord
from agent.phone import mask
from agent.store import Removal, Store, admin_row
from agent.store_sqlite import SqliteStore
from tests import browser

TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
D0, D1, D2 = TODAY - timedelta(days=2), TODAY - timedelta(days=1), TODAY


@pytest.fixture(autouse=True)
def _three_days() -> None:
    """The days as of this test, not as of collection: an import is dated "now", and a run may pass midnight."""
    global TODAY, D0, D1, D2
    TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    D0, D1, D2 = TODAY - timedelta(days=2), TODAY - timedelta(days=1), TODAY
N = {k: f"+97250{i:07d}" for i, k in enumerate("ABCDEFG", start=1000001)}
REMOVED_REASON = "number reassigned <b>new owner</b>"
ms = timedelta(milliseconds=1)


def rec(key: str | None, origin: Origin, day: datetime, *, pressed: bool = True, hangup: HangupInfo | None = None,
        visible_ms: float | None = None, campaign: str = "camp-1") -> OptOutRecord:
    received = day + timedelta(hours=10)
    press = received - 5 * ms if pressed else None
    return OptOutRecord(
        event_id=f"ev-{uuid.uuid4().hex}", phone_number=N[key] if key else None, call_id=f"call-{uuid.uuid4().hex[:6]}",
        campaign_id=campaign, origin=origin, digit="9", pressed_at=press, received_at=received,
        visible_at=(press or received) + visible_ms * ms if visible_ms is not None else None, hangup=hangup,
        actor="ops" if origin is Origin.ADMIN else None)


def hung(day: datetime, after_ms: float, *, pressed: bool = True, requested_only: bool = False) -> HangupInfo:
    start = day + timedelta(hours=10) - (5 * ms if pressed else 0 * ms)
    at = start + after_ms * ms
    return HangupInfo(requested_at=at if requested_only else at - ms, hungup_at=None if requested_only else at,
                      method="ari", result="ok")


async def build(store: Store) -> None:
    """Opt-outs over three days with known latencies, a removal, a prevented call and an import.

    press -> hangup samples: 100, 200, 300 (requested only), 400 (no press: from receipt), 1000 ms;
    press -> visible samples: 10, 50 (via the cache sync), 20, 30 (from receipt), 40, 60 (admin) ms.
    """
    b = rec("B", Origin.ARI, D0, hangup=hung(D0, 200))
    await store.write([
        rec("A", Origin.ARI, D0, hangup=hung(D0, 100), visible_ms=10),
        b,
        rec(None, Origin.ARI, D0),  # pressed, number unknown
        rec("C", Origin.AGI, D0, hangup=hung(D0, 300, requested_only=True), visible_ms=20),
        rec("D", Origin.AMI, D1, pressed=False, hangup=hung(D1, 400, pressed=False), visible_ms=30),
        rec("E", Origin.SNS, D1, visible_ms=40),
        rec("A", Origin.ARI, D1),  # already blacklisted
        rec("F", Origin.ARI, D2, hangup=hung(D2, 1000)),
        rec("G", Origin.ADMIN, D2, pressed=False, visible_ms=60),
    ])
    assert b.pressed_at is not None
    await store.record_visibility([(b.event_id, b.pressed_at + 50 * ms)])
    assert await store.remove(Removal(N["B"], REMOVED_REASON, "dana", f"remove-{uuid.uuid4()}",
                                      D1 + timedelta(hours=12), seen_seq=await store.head()))
    await store.append_action(admin_row(
        event_id=f"prevented-{uuid.uuid4()}", phone_number=N["A"], outcome=Outcome.PREVENTED,
        at=D2 + timedelta(hours=9), recorded_at=datetime.now(UTC), actor=None,
        reason="call to a blacklisted number prevented", origin="agi", call_id="call-p1", campaign_id="camp-1"))
    await store.import_batch(["+972509000001", "+972509000002"], added_at=datetime.now(UTC), reason="list",
                               source=Source.ADMIN_IMPORT, actor="ops")


async def verified(store: Store) -> ChainReport:
    verifier = ChainVerifier()
    async for row in store.chain_rows():
        if not verifier.feed(row.columns()):
            break
    return verifier.report()


def label(day: datetime) -> str:
    return day.strftime("%m-%d")


async def test_report_counts_optouts_latencies_prevented_and_removals(store: Store) -> None:
    await build(store)
    data = await report.collect(store, since=None, until=None, campaign=None)

    assert data.rows == 13
    assert {d: dict(c) for d, c in data.optouts.items()} == {
        D0.date(): {"ari": 2 + 1, "agi": 1}, D1.date(): {"ami": 1, "sns": 1, "ari": 1},
        D2.date(): {"ari": 1, "admin": 1}}
    assert data.optout_total == 9
    assert data.imported == {TODAY.date(): 2}
    assert data.prevented_by_day == {D2.date(): 1}
    assert data.removed_by_day == {D1.date(): 1}
    assert [(a.phone_number, a.actor, a.reason) for a in data.removals] == [(N["B"], "dana", REMOVED_REASON)]
    assert [(a.phone_number, a.origin, a.call_id) for a in data.prevented] == [(N["A"], "agi", "call-p1")]

    assert sorted(data.hangup.sample) == pytest.approx([100, 200, 300, 400, 1000])
    assert data.hangup.percentile(50) == pytest.approx(300)
    assert data.hangup.percentile(99) == pytest.approx(1000)
    assert sorted(data.visible.sample) == pytest.approx([10, 20, 30, 40, 50, 60])
    assert data.visible.percentile(50) == pytest.approx(30)
    assert data.visible.percentile(99) == pytest.approx(60)
    assert data.days() == [D0.date(), D1.date(), D2.date()]


async def test_report_period_is_the_receive_time_and_campaign_filters(store: Store) -> None:
    await build(store)
    await store.write([rec("A", Origin.AGI, D1, campaign="camp-2", hangup=hung(D1, 7000))])

    day1 = await report.collect(store, since=D1, until=D2, campaign=None)
    assert {d: dict(c) for d, c in day1.optouts.items()} == {D1.date(): {"ami": 1, "sns": 1, "ari": 1, "agi": 1}}
    assert day1.removed_total == 1 and day1.prevented_total == 0 and not day1.imported
    assert sorted(day1.hangup.sample) == pytest.approx([400, 7000])

    camp2 = await report.collect(store, since=None, until=None, campaign="camp-2")
    assert camp2.optout_total == 1 and camp2.removed_total == 0 and camp2.prevented_total == 0
    assert camp2.hangup.percentile(50) == pytest.approx(7000)


async def test_report_html_shows_figures_masked_and_escaped(store: Store, tmp_path: Path) -> None:
    await build(store)
    data = await report.collect(store, since=None, until=None, campaign=None)
    chain = await verified(store)
    assert chain.intact and chain.rows == 13
    page = report.render_html(data, chain, generated_at=datetime.now(UTC), title="Report <Q1>")

    assert "<title>Report &lt;Q1&gt;</title>" in page
    assert "p50 300 ms" in page and "p99 1.00 s" in page
    assert "p50 30.0 ms" in page and "p99 60.0 ms" in page
    assert page.count('<svg class="chart"') == 4
    assert f'data-label="{label(D0)}" data-series="ari" data-value="3"' in page
    assert f'data-label="{label(D1)}" data-series="sns" data-value="1"' in page
    assert f'data-label="{label(D2)}" data-series="prevented" data-value="1"' in page
    assert 'id="optouts-total">9<' in page and 'id="prevented-total">1<' in page and 'id="removed-total">1<' in page
    assert "number reassigned &lt;b&gt;new owner&lt;/b&gt;" in page and "<b>new owner" not in page
    assert ">dana<" in page
    assert "Intact" in page and chain.head is not None and chain.head in page
    assert not any(n in page for n in N.values())
    assert mask(N["A"]) in page and mask(N["B"]) in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page

    full = report.render_html(data, chain, generated_at=datetime.now(UTC), title="r", full_numbers=True)
    assert N["A"] in full and N["B"] in full

    broken = ChainReport(rows=4, legacy=0, head="ab" * 32, broken_at=5, problem="row_hash does not match <x>")
    page = report.render_html(data, broken, generated_at=datetime.now(UTC), title="r")
    assert "BROKEN at row 5</b>: row_hash does not match &lt;x&gt;" in page and "ab" * 32 in page


async def test_report_csv_tables(store: Store, tmp_path: Path) -> None:
    await build(store)
    await store.remove(Removal(N["C"], "=HYPERLINK(\"x\")", "eve", f"remove-{uuid.uuid4()}", D2,
                               seen_seq=await store.head()))
    data = await report.collect(store, since=None, until=None, campaign=None)
    paths = report.write_csv(data, tmp_path / "csv", chain=await verified(store))

    def read(name: str) -> list[dict[str, str]]:
        with (tmp_path / "csv" / name).open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    assert sorted(p.name for p in paths) == ["chain.csv", "latency.csv", "latency_histogram.csv", "per_day.csv",
                                             "prevented.csv", "removals.csv", "spoken.csv"]
    per_day = {r["day"]: r for r in read("per_day.csv")}
    assert per_day[D0.date().isoformat()] == {"day": D0.date().isoformat(), "ari": "3", "agi": "1", "ami": "0",
                                                    "sns": "0", "admin": "0", "speech": "0", "optouts": "4",
                                                    "imported": "0",
                                                    "prevented": "0", "removed": "0"}
    assert per_day[D2.date().isoformat()]["imported"] == "2"
    assert per_day[D2.date().isoformat()]["removed"] == "1"
    latency = {r["measure"]: r for r in read("latency.csv")}
    assert float(latency["press_to_hangup"]["p50_ms"]) == pytest.approx(300)
    assert float(latency["press_to_hangup"]["p99_ms"]) == pytest.approx(1000)
    assert float(latency["press_to_visible"]["p50_ms"]) == pytest.approx(30)
    assert latency["press_to_visible"]["count"] == "6"
    histogram = read("latency_histogram.csv")
    assert sum(int(r["count"]) for r in histogram if r["measure"] == "press_to_hangup") == 5
    removals = read("removals.csv")
    assert [(r["phone_number"], r["actor"], r["reason"]) for r in removals] == [
        ("'" + mask(N["B"]), "dana", REMOVED_REASON), ("'" + mask(N["C"]), "eve", "'=HYPERLINK(\"x\")")]
    assert [r["phone_number"] for r in read("prevented.csv")] == ["'" + mask(N["A"])]
    chain = read("chain.csv")[0]
    assert chain["intact"] == "yes" and chain["rows"] == "14" and len(chain["head"]) == 64


def test_latency_sample_stays_bounded() -> None:
    lat = report.Latencies(cap=1000)
    for v in range(1, 100_001):
        lat.add(float(v))
    assert len(lat.sample) == 1000 and lat.count == 100_000 and not lat.exact
    assert (lat.minimum, lat.maximum) == (1.0, 100_000.0)
    assert 42_000 < (lat.percentile(50) or 0) < 58_000
    _, counts, overflow, _ = lat.bins()
    assert sum(counts) + overflow == 1000


async def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    try:
        browser.chromium()
    except browser.NoChromium as exc:
        pytest.fail(f"no headless Chromium to render the report in: {exc}")
    async with SqliteStore(tmp_path / "store.db") as store:
        await store.migrate()
        await build(store)
        data = await report.collect(store, since=None, until=None, campaign=None)
        chain = await verified(store)
    page = tmp_path / "report.html"
    page.write_text(report.render_html(data, chain, generated_at=datetime.now(UTC), title="Compliance"), "utf-8")

    dom = browser.dump_dom(page)
    svgs = re.findall(r'<svg class="chart".*?</svg>', dom, flags=re.S)
    assert len(svgs) == 4
    assert [len(re.findall(r'<rect class="bar"', s)) for s in svgs[:1] + svgs[3:]] == [7, 1]
    assert all(re.search(r'<rect class="bar"[^>]*height="[1-9]', s) for s in svgs)
    assert "p50 300 ms" in dom and "p99 1.00 s" in dom and "p50 30.0 ms" in dom and "p99 60.0 ms" in dom
    assert re.search(r'id="optouts-total">9<', dom) and "Intact" in dom and (chain.head or "-") in dom

    png = browser.screenshot(page, tmp_path / "report.png", width=1000, height=2000)
    image = browser.decode_png(png.read_bytes())
    assert (image.width, image.height) == (1000, 2000)
    assert image.ink() > 20_000, "the screenshot is (nearly) blank"
    blue, green, red = (37, 99, 235), (22, 163, 74), (220, 38, 38)
    assert image.colour_pixels(blue) > 5_000, "no ari bars / histogram bars drawn"
    assert image.colour_pixels(green) > 300, "no agi bar drawn"
    assert image.colour_pixels(red) > 2_000, "no prevented-calls bar drawn"


def test_report_module_loads_no_telephony() -> None:
    code = ("import sys, agent.report; "
            "print(','.join(m for m in ('aioari', 'panoramisk', 'agent.ari', 'agent.agi', 'agent.ami') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == ""
