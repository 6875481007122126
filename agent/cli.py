"""The `optout` command line. Errors print one clear line (no traceback) and exit 2."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from agent import admin, bulk, logs
from agent.constants import Source
from agent.core import Core, open_core
from agent.errors import InvalidInput, OptOutError, SchemaMissing, StoreUnavailable
from agent.journal import PARK_AFTER
from agent.optout import TEXT_MAX, id_problem, text_problem
from agent.phone import mask
from agent.pipeline import PipelineResult, Replayer, Status
from agent.settings import Settings
from agent.store import RemoveResult

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


def _actor() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _shown(number: str, settings: Settings) -> str:
    return number if settings.log_full_numbers else mask(number)


async def cmd_migrate(core: Core, args: argparse.Namespace) -> int:
    applied = await core.store.migrate()
    print(f"schema up to date ({core.store.location}); applied now: {', '.join(applied) or 'nothing'}")
    return EXIT_OK


CHECK_WORDS: dict[bool | None, str] = {True: "BLACKLISTED", False: "clear", None: "unknown (nobody can answer now)"}
"""`optout check`'s answer per number: listed, proven clear, or nobody can answer (exit 2, never "clear")."""


async def cmd_check(core: Core, args: argparse.Namespace) -> int:
    numbers = core.checker.normalise(args.numbers)
    answers = await core.checker.check(numbers, strict=True)
    for raw, e164, listed in zip(args.numbers, numbers, answers, strict=True):
        print(f"{raw}\t{e164}\t{CHECK_WORDS[listed]}")
    if any(answers):
        return EXIT_FOUND
    if any(a is None for a in answers):
        print("error: store unavailable and the cache is not proven current: not answering clear",
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


ADD_MESSAGES: dict[Status, tuple[int, str]] = {
    Status.STORED: (EXIT_OK, "{outcome}"),
    Status.DUPLICATE: (EXIT_OK, "already recorded (this event was seen before): nothing changed"),
    Status.JOURNALED: (EXIT_ERROR, "journaled and in Redis; the store is unavailable, the agent's replayer stores it"),
    Status.REFUSED: (EXIT_ERROR, f"journaled and in Redis, but the store REFUSED it; the agent's replayer retries "
                                 f"it and parks it after {PARK_AFTER} refusals (`optout parked` lists it)"),
}
"""What `optout add` prints for each pipeline status, and its exit code (stderr when the code is not 0)."""


def add_message(result: PipelineResult, shown: str) -> tuple[int, str]:
    code, text = ADD_MESSAGES[result.status]
    return code, f"{shown}: {text.format(outcome=result.outcome.value if result.outcome else '')}"


async def cmd_add(core: Core, args: argparse.Namespace) -> int:
    result = await admin.add(core, args.number, source=Source(args.source), reason=args.reason, actor=_actor())
    code, text = add_message(result, _shown(result.record.phone_number or "", core.settings))
    print(text, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


REMOVAL_MESSAGES = {
    RemoveResult.REMOVED: "removed (audited)",
    RemoveResult.NOT_LISTED: "was not on the blacklist",
    RemoveResult.OPTED_OUT_SINCE: "NOT removed: it opted out again after this removal was asked for (the newer "
                                  "opt-out wins)",
}


async def cmd_remove(core: Core, args: argparse.Namespace) -> int:
    result, note = await admin.remove(core, args.number, reason=args.reason, actor=_actor())
    print(f"{args.number}: {REMOVAL_MESSAGES[result]}")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return EXIT_OK if result is RemoveResult.REMOVED else EXIT_FOUND


def regular_file_problem(path: str) -> str | None:
    """Why `path` cannot be imported (None when it can): only a regular file is a file of numbers; a device
    (`/dev/zero` never ends), a FIFO (blocks) or a directory is refused before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"is {kind}, not a regular file: import reads files of numbers only"


async def cmd_import(core: Core, args: argparse.Namespace) -> int:
    if (problem := regular_file_problem(args.file)) is not None:
        print(f"error: {args.file}: {problem}", file=sys.stderr)
        return EXIT_ERROR
    started = time.monotonic()
    # A bar on a terminal only (rows/s, % of the file read, ETA); a pipe or log file gets the summary alone.
    bar = tqdm(total=1, unit="B", unit_scale=True, file=sys.stderr, disable=not sys.stderr.isatty(),
               bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix} ETA {remaining}", desc="import")

    def progress(p: bulk.ImportProgress) -> None:
        rate = p.rows / max(time.monotonic() - started, 1e-6)
        bar.total = p.total_bytes
        bar.set_postfix_str(f"{p.rows:,} rows, {rate:,.0f} rows/s", refresh=False)
        bar.update(p.done_bytes - bar.n)

    report = bulk.ImportReport()
    try:
        with open(args.file, "rb") as fh:  # noqa: ASYNC230 - streamed, CLI only
            await bulk.import_numbers(
                core, fh, name=os.path.basename(args.file), source=Source(args.source), reason=args.reason,
                actor=_actor(), progress=progress, restart=args.restart, report=report,
            )
    except (asyncio.CancelledError, OptOutError):
        bar.close()
        print(f"import stopped: committed through line {report.last_line:,} of {args.file} (added {report.added:,}"
              " in this run); run the same command again to resume there", file=sys.stderr)
        raise
    finally:
        bar.close()
    if report.resumed_after:
        print(f"{args.file}: resumed after line {report.resumed_after:,} (committed by an earlier run that was "
              f"interrupted, {report.added_before:,} numbers added then)", file=sys.stderr)
    for lineno, problem in report.bad:
        print(f"{args.file}:{lineno}: {problem}", file=sys.stderr)
    if report.bad_count > len(report.bad):
        print(f"... and {report.bad_count - len(report.bad)} more bad rows", file=sys.stderr)
    if report.stopped:
        print(f"error: {args.file}: {report.stopped}; {report.added} numbers were committed before it",
              file=sys.stderr)
    if report.cache_error:
        print(f"warning: Redis not updated ({report.cache_error}); the agent's cache sync adds them",
              file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"read {report.read}, added {report.added}, already listed {report.already}, bad {report.bad_count}"
          f" ({elapsed:.1f} s{f', resumed after line {report.resumed_after}' if report.resumed_after else ''})")
    return EXIT_ERROR if report.bad_count or report.stopped else EXIT_OK


async def cmd_export(core: Core, args: argparse.Namespace) -> int:
    chunks = (bulk.export_audit_csv(core, campaign_id=args.campaign, number_prefix=args.prefix) if args.audit
              else bulk.export_csv(core))
    out = sys.stdout.buffer
    async for chunk in chunks:
        out.write(chunk)
    out.flush()
    return EXIT_OK


async def cmd_history(core: Core, args: argparse.Namespace) -> int:
    [e164] = core.checker.normalise([args.number])
    rows = await core.store.history(e164)
    shown = _shown(e164, core.settings)
    for row in rows:
        print(json.dumps(asdict(row), default=str) if args.json else admin.format_timeline(row, shown))
    if not rows:
        print(f"no actions recorded for {shown}", file=sys.stderr)
    return EXIT_OK


async def cmd_sync_cache(core: Core, args: argparse.Namespace) -> int:
    if core.keeper is None:
        print("error: Redis is not configured (REDIS_URL, REDIS_HOST or REDIS_SENTINELS)", file=sys.stderr)
        return EXIT_ERROR
    total = await core.keeper.rebuild()
    if total < 0:
        print("error: Redis could not be rebuilt: the keeper lock stayed taken, or the rebuild was not swapped in",
              file=sys.stderr)
        return EXIT_ERROR
    current = await core.keeper.settle(await core.store.head())
    print(f"Redis rebuilt from the store: {total} numbers" + ("" if current else
          "; not proven current yet (a keeper proves it within a few rounds)"))
    return EXIT_OK


async def cmd_parked(core: Core, args: argparse.Namespace) -> int:
    if args.retry:
        count = await core.journal.unpark(None if args.retry == ["all"] else args.retry)
        print(f"{count} parked opt-outs given back to the replayer")
        return EXIT_OK
    parked = await core.journal.parked()
    for p in parked:
        number = _shown(p.phone_number, core.settings) if p.phone_number else "-"
        print(f"{p.event_id}\t{p.kind}\t{number}\t{p.journaled_at.isoformat()}\tattempts={p.attempts}"
              f"\t{p.last_error or ''}")
    if not parked:
        print(f"nothing parked in {core.journal.path}", file=sys.stderr)
    return EXIT_FOUND if parked else EXIT_OK


async def cmd_replay(core: Core, args: argparse.Namespace) -> int:
    """The store was restored from a backup: write again every opt-out this journal took since `--since`."""
    since: datetime = args.since
    count = await core.journal.restate(since)
    stored = await Replayer(core.pipeline).drain()
    left = await core.journal.depth()
    print(f"{count} opt-outs journaled here since {since.isoformat()} replayed: {stored} through the store (one "
          f"row per event id: those it still had are not written twice), {left} still waiting in the journal")
    return EXIT_OK if left == 0 else EXIT_ERROR


async def cmd_audit(core: Core, args: argparse.Namespace) -> int:
    if args.action == "head":
        row, head = await core.store.chain_head()
        print(f"{head or '(empty chain)'}\trow {row}")
        return EXIT_OK
    report = await admin.verify_chain(core, expected_head=args.head)
    legacy = f" ({report.legacy} earlier rows predate the chain)" if report.legacy else ""
    if not report.intact:
        print(f"chain BROKEN at row {report.broken_at}: {report.problem}", file=sys.stderr)
        return EXIT_FOUND
    if args.head and report.head_found_at is None:
        print(f"chain intact: {report.rows} rows, head {report.head}{legacy}; but the given head {args.head} is "
              "NOT in it (the chain was rewritten or cut back since it was taken)", file=sys.stderr)
        return EXIT_FOUND
    print(f"chain intact: {report.rows} rows, head {report.head}{legacy}")
    if args.head:
        print(f"given head found at row {report.head_found_at}")
    return EXIT_OK


def _day(value: str | None, *, end: bool = False) -> datetime | None:
    """A --since/--until DATE (YYYY-MM-DD, UTC) as a bound; --until includes its whole day."""
    if value is None:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidInput("--since/--until", f"{value!r} is not a date like 2026-11-25") from None
    return day + timedelta(days=1) if end else day


async def cmd_report(core: Core, args: argparse.Namespace) -> int:
    from agent import report

    since, until = _day(args.since), _day(args.until, end=True)
    data = await report.collect(core.store, since=since, until=until, campaign=args.campaign)
    chain = await admin.verify_chain(core)
    html = report.render_html(data, chain, generated_at=datetime.now(UTC), title="Opt-out compliance report",
                              full_numbers=core.settings.log_full_numbers)
    Path(args.out).write_text(html, encoding="utf-8")  # noqa: ASYNC240 - a CLI writing its one output file
    print(f"report written to {args.out}")
    if args.csv:
        for path in report.write_csv(data, Path(args.csv), chain=chain, full_numbers=core.settings.log_full_numbers):
            print(f"  {path}")
    return EXIT_OK


async def cmd_call(settings: Settings, args: argparse.Namespace) -> int:
    """Place a test call through Asterisk and say what happened."""
    from agent.testcall import CallObserver

    if settings.ari_password is None:
        print("error: ARI_PASSWORD (or ARI_PASSWORD_FILE) is not set", file=sys.stderr)
        return EXIT_ERROR
    async with CallObserver(ari_url=settings.ari_url, username=settings.ari_username,
                            password=settings.ari_password.get_secret_value(), digit=settings.optout_digit) as obs:
        call = await obs.wait(await obs.place(args.number, press=args.press, via=args.via, ivr=args.ivr),
                              timeout=args.timeout)
        if not call.hung_up:
            await obs.hangup_all(call)
    print(f"call {call.call_id} via {args.via} into the {args.ivr} IVR, digits received: {''.join(call.digits) or '-'}")
    if call.hung_up:
        ms = call.press_to_hangup_ms
        print(f"hung up: yes, {ms:.1f} ms after the press (Asterisk's clock)" if ms is not None else "hung up: yes")
    else:
        print(f"hung up: no (still up after {args.timeout:.0f} s; the test call was ended)")
    async with AsyncExitStack() as stack:
        core = await open_core(settings, stack, create_store=False)
        await asyncio.sleep(0.3)  # the agent stores right after the hangup
        try:
            [e164] = core.checker.normalise([args.number])
            [listed] = await core.checker.check([e164], strict=True)
            word = "yes" if listed else "no" if listed is False else "unknown"
            print(f"{_shown(e164, settings)} blacklisted: {word}")
        except OptOutError as exc:
            print(f"blacklist check: {exc}")
    return EXIT_OK if call.hung_up else EXIT_FOUND


def checked(option: str, rule: Callable[[str], str | None]) -> Callable[[str], str]:
    """An argparse type: `option`'s value by one rule of agent/optout.py, refused naming the option (exit 2)."""
    def check(value: str) -> str:
        if (problem := rule(value)) is not None:
            raise argparse.ArgumentTypeError(f"{option} {problem}")
        return value
    return check


REASON = checked("--reason", lambda value: text_problem(value, TEXT_MAX))
CAMPAIGN = checked("--campaign", id_problem)


def since_time(value: str) -> datetime:
    """The argparse type of `replay --since`: an ISO 8601 time (UTC unless it carries an offset)."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since is not an ISO 8601 time: {value[:40]!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optout", description="Opt-out blacklist and agent (press 9 to stop calls).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the agent (ARI, AGI, AMI, HTTP)")
    sub.add_parser("bridge", help="run the SNS bridge (HTTP endpoint, SQS poller, journal replayer)")
    sub.add_parser("migrate", help="create or upgrade the schema")
    c = sub.add_parser("check", help="pre-dial check: exit 0 all clear, 1 any blacklisted, 2 error")
    c.add_argument("numbers", nargs="+", metavar="NUMBER")
    a = sub.add_parser("add", help="blacklist a number")
    a.add_argument("number", metavar="NUMBER")
    a.add_argument("--source", choices=[Source.ADMIN_IMPORT.value, Source.COMPLIANCE.value],
                   default=Source.ADMIN_IMPORT.value)
    a.add_argument("--reason", type=REASON)
    r = sub.add_parser("remove", help="take a number off the blacklist (audited)")
    r.add_argument("number", metavar="NUMBER")
    r.add_argument("--reason", required=True, type=REASON)
    i = sub.add_parser("import", help="import numbers (CSV with a phone column, or one per line)")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--source", choices=[s.value for s in Source], default=Source.ADMIN_IMPORT.value)
    i.add_argument("--reason", default="imported", type=REASON)
    i.add_argument("--restart", action="store_true",
                   help="start from line 1 even if an earlier run of this file was interrupted (default: resume)")
    e = sub.add_parser("export", help="the blacklist as CSV on stdout (--audit: the audit trail)")
    e.add_argument("--audit", action="store_true", help="export audit rows instead of the blacklist")
    e.add_argument("--campaign", type=CAMPAIGN, help="with --audit: only this campaign")
    e.add_argument("--prefix", help="with --audit: only numbers starting with this E.164 prefix")
    h = sub.add_parser("history", help="the timeline of every action on one number")
    h.add_argument("number", metavar="NUMBER")
    h.add_argument("--json", action="store_true", help="JSON lines instead of the timeline")
    s = sub.add_parser("sync-cache", help="rebuild the Redis view from the store (a copy swapped in: numbers the "
                                          "store no longer lists leave it; unstored opt-outs stay)")
    s.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)  # every rebuild is exact now
    k = sub.add_parser("parked", help="opt-outs set aside in the journal (the store or SNS keeps refusing them)")
    k.add_argument("--retry", nargs="+", metavar="EVENT_ID", help="give them back to the replayer ('all' for all)")
    rl = sub.add_parser("replay", help="after the store was restored from a backup: write again every opt-out "
                                       "this host's journal took since a moment (the journal keeps them "
                                       "OPTOUT_JOURNAL_RETENTION_DAYS)")
    rl.add_argument("--since", required=True, type=since_time, metavar="TIME",
                    help="the backup's time, ISO 8601 (UTC unless it carries an offset)")
    au = sub.add_parser("audit", help="the tamper-evident audit chain")
    au.add_argument("action", choices=["verify", "head"])
    au.add_argument("--head", help="with verify: also prove this earlier head is still in the chain")
    rp = sub.add_parser("report", help="the compliance report: one self-contained HTML file (and CSV tables)")
    rp.add_argument("--since", metavar="DATE", help="first day (YYYY-MM-DD, UTC)")
    rp.add_argument("--until", metavar="DATE", help="last day, included")
    rp.add_argument("--campaign", metavar="ID", type=CAMPAIGN)
    rp.add_argument("--out", metavar="FILE.html", required=True)
    rp.add_argument("--csv", metavar="DIR", help="also write the tables as CSV files into DIR")
    t = sub.add_parser("call", help="place a test call through Asterisk that presses digits")
    t.add_argument("number", metavar="NUMBER", help="the called number the call carries (OPTOUT_NUMBER)")
    t.add_argument("--press", default="9", help="digits the caller sends (SendDTMF syntax, e.g. 5w9)")
    t.add_argument("--via", choices=["sip", "local"], default="sip")
    t.add_argument("--ivr", choices=["ari", "agi", "plain"], default="ari")
    t.add_argument("--timeout", type=float, default=10.0)
    return p


COMMANDS: dict[str, Callable[[Core, argparse.Namespace], Awaitable[int]]] = {
    "migrate": cmd_migrate,
    "check": cmd_check,
    "add": cmd_add,
    "remove": cmd_remove,
    "import": cmd_import,
    "export": cmd_export,
    "history": cmd_history,
    "sync-cache": cmd_sync_cache,
    "parked": cmd_parked,
    "replay": cmd_replay,
    "audit": cmd_audit,
    "report": cmd_report,
}


async def _run_command(settings: Settings, args: argparse.Namespace) -> int:
    async with AsyncExitStack() as stack:
        migrate = args.command == "migrate"
        core = await open_core(settings, stack, create_store=migrate)
        if not migrate:
            try:
                await core.store.require_schema()  # never answer from a store the agent does not use
            except StoreUnavailable as exc:
                # A store that is down is not a wrong store: the check goes on with what Redis can prove.
                if isinstance(exc, SchemaMissing) or args.command != "check":
                    raise
        return await COMMANDS[args.command](core, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load()
    except ValidationError as exc:
        err: Any = exc.errors()[0]
        where = ".".join(map(str, err["loc"])).upper() or "settings"
        print(f"error: configuration {where}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return EXIT_ERROR
    logs.configure("WARNING" if args.command in COMMANDS else settings.log_level,
                   full_numbers=settings.log_full_numbers)
    try:
        if args.command == "call":
            return asyncio.run(cmd_call(settings, args))
        if args.command == "bridge":
            from sns_bridge.app import run_bridge

            return asyncio.run(run_bridge(settings))
        if args.command == "run":
            from agent.app import run_agent

            return asyncio.run(run_agent(settings))
        return asyncio.run(_run_command(settings, args))
    except KeyboardInterrupt:
        return 130
    except (OptOutError, OSError) as exc:
        unavailable = isinstance(exc, StoreUnavailable) and not isinstance(exc, SchemaMissing)
        print(f"error: {'store unavailable: ' if unavailable else ''}{exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
