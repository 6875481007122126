"""Render the compliance report of a store and screenshot it in headless Chromium. `bench_ari.py` calls
`render` on the store its own SIP calls went into (tests/bench/results/report.png, the README's picture:
measured figures). Run as a script, it renders DEMO data (a temporary SQLite store filled with generated
opt-outs, prevented calls and removals; the page's title says so), e.g. to look at the layout:

    .venv/bin/python tests/bench/report_screenshot.py /tmp/demo.png [--html /tmp/demo.html] [--days 30]

Installs Chromium with tests/chromium.sh where it is missing. Prints the report's headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from agent import report  # noqa: E402
from agent.audit import ChainReport, ChainVerifier  # noqa: E402
from agent.constants import Origin, Outcome  # noqa: E402
from agent.optout import HangupInfo, OptOutRecord  # noqa: E402
from agent.store import Removal, Store, admin_row  # noqa: E402
from agent.store_sqlite import SqliteStore  # noqa: E402
from tests import browser  # noqa: E402

WEIGHTS = {Origin.ARI: 0.55, Origin.AGI: 0.2, Origin.AMI: 0.1, Origin.SNS: 0.12, Origin.ADMIN: 0.03}


async def fill(store: Store, *, days: int, rng: random.Random) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    records: list[OptOutRecord] = []
    cache_seen: list[tuple[str, datetime]] = []
    prevented: list[dict[str, object]] = []
    for d in range(days, 0, -1):
        day = today - timedelta(days=d - 1)
        weekday = day.weekday() < 5
        for _ in range(int(rng.gauss(120 if weekday else 40, 15))):
            origin = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            pressed = day + timedelta(seconds=rng.uniform(8 * 3600, 20 * 3600))
            received = pressed + timedelta(milliseconds=rng.uniform(2, 12))
            hangup = None
            if origin in (Origin.ARI, Origin.AGI, Origin.AMI):
                hung = pressed + timedelta(milliseconds=rng.lognormvariate(4.1, 0.35))
                hangup = HangupInfo(requested_at=hung - timedelta(milliseconds=3), hungup_at=hung, method="ari",
                                    result="ok")
            slow = rng.random() < 0.02
            seen = received + timedelta(milliseconds=rng.lognormvariate(3.0, 0.4) + (rng.uniform(800, 3000) if slow
                                                                                   else 0))
            rec = OptOutRecord(
                event_id=f"demo-{uuid.uuid4().hex}", phone_number=f"+97250{rng.randrange(10**7):07d}",
                call_id=f"call-{uuid.uuid4().hex[:8]}", campaign_id=rng.choice(["spring-sale", "renewals"]),
                origin=origin, digit="9", pressed_at=pressed if origin is not Origin.ADMIN else None,
                received_at=received, visible_at=None if slow else seen, hangup=hangup,
                actor="ops" if origin is Origin.ADMIN else None)
            records.append(rec)
            if slow:
                cache_seen.append((rec.event_id, seen))
        for _ in range(rng.randrange(0, 9)):
            at = day + timedelta(seconds=rng.uniform(8 * 3600, 20 * 3600))
            prevented.append(admin_row(
                event_id=f"prevented-{uuid.uuid4()}", phone_number=f"+97250{rng.randrange(10**7):07d}",
                outcome=Outcome.PREVENTED, at=at, recorded_at=at, actor=None,
                reason="call to a blacklisted number prevented", origin=rng.choice(["agi", "ari"]),
                call_id=f"call-{uuid.uuid4().hex[:8]}", campaign_id="spring-sale"))
    for i in range(0, len(records), 500):
        await store.write(records[i:i + 500])
    await store.record_visibility(cache_seen)
    for row in prevented:
        await store.append_action(row)
    for rec, why in zip(records[::max(1, len(records) // 4)][:4],
                        ["customer asked to be called again (ticket 4411)", "number reassigned to a new subscriber",
                         "pressed 9 by mistake, confirmed by e-mail", "<script>alert('escaped')</script>"],
                        strict=False):
        assert rec.phone_number is not None
        await store.remove(Removal(rec.phone_number, why, rng.choice(["dana", "yossi"]), f"remove-{uuid.uuid4()}",
                                   rec.received_at + timedelta(hours=3), seen_seq=await store.head()))


async def verify(store: Store) -> ChainReport:
    verifier = ChainVerifier()
    async for row in store.chain_rows():
        if not verifier.feed(row.columns()):
            break
    return verifier.report()


async def render(store: Store, png: Path, *, title: str, html: Path | None = None, width: int = 1100,
                 height: int = 2600) -> report.ReportData:
    """Screenshot `store`'s whole report into `png` (and keep the page in `html`); prints its headline figures."""
    data = await report.collect(store, since=None, until=None, campaign=None)
    page = report.render_html(data, await verify(store), generated_at=datetime.now(UTC), title=title)
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        target = html or Path(tmp) / "report.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
        png.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(target, png, width=width, height=height)
    print(f"report: {data.optout_total} opt-outs, {data.prevented_total} prevented, {data.removed_total} removed; "
          f"hangup p50 {report.fmt_ms(data.hangup.percentile(50))} p99 {report.fmt_ms(data.hangup.percentile(99))}; "
          f"visible p50 {report.fmt_ms(data.visible.percentile(50))} p99 {report.fmt_ms(data.visible.percentile(99))}"
          f"; screenshot: {png}")
    return data


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path)
    parser.add_argument("--html", type=Path, help="also keep the HTML here")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=2600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-demo-") as tmp:
        async with SqliteStore(Path(tmp) / "demo.db") as store:
            await store.migrate()
            await fill(store, days=args.days, rng=random.Random(2024))
            await render(store, args.png, html=args.html, width=args.width, height=args.height,
                         title="DEMO DATA (generated, not measured): opt-out compliance report")


if __name__ == "__main__":
    asyncio.run(main())
