"""The `optout` command line, run as a real process against PostgreSQL and Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from agent import cli
from agent.constants import BLACKLIST_LEASE, BLACKLIST_SENTINEL, BLACKLIST_SET, Outcome
from agent.pipeline import PipelineResult, Status
from agent.store import RemoveResult
from tests.conftest import PG_BASE, make_record


@pytest.fixture
def env(pg_dsn: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_", "OPTOUT_"))}
    e.update(DATABASE_URL=pg_dsn, REDIS_URL=redis_url, OPTOUT_DEFAULT_REGION="IL",
             OPTOUT_JOURNAL_PATH=str(tmp_path / "journal.db"))
    return e


def optout(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_check_exit_codes_clear_listed_and_bad_input(env: dict[str, str]) -> None:
    assert optout(env, "migrate").returncode == 0
    clear = optout(env, "check", "050-123-4567")
    assert clear.returncode == 0 and "clear" in clear.stdout
    assert optout(env, "add", "0501234567", "--reason", "asked by phone").returncode == 0
    listed = optout(env, "check", "+972 50 123 4567", "0521234567")
    assert listed.returncode == 1
    assert listed.stdout.splitlines()[0].endswith("BLACKLISTED") and listed.stdout.splitlines()[1].endswith("clear")
    bad = optout(env, "check", "12")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: field numbers[0]:") and "Traceback" not in bad.stderr


def test_check_fails_closed_when_the_store_cannot_answer(env: dict[str, str]) -> None:
    env = {**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", "REDIS_URL": "redis://127.0.0.1:1/0"}
    out = optout(env, "check", "0501234567")
    assert out.returncode == 2
    assert "store unavailable" in out.stderr and "Traceback" not in out.stderr


def test_remove_needs_a_reason_and_is_in_history(env: dict[str, str], redis_sync: redis.Redis) -> None:
    assert optout(env, "migrate").returncode == 0
    optout(env, "add", "0501234567")
    assert redis_sync.sismember(BLACKLIST_SET, "+972501234567")
    assert optout(env, "remove", "0501234567").returncode == 2  # argparse: --reason is required
    assert optout(env, "remove", "0501234567", "--reason", "   ").returncode == 2
    done = optout(env, "remove", "0501234567", "--reason", "consent given")
    assert done.returncode == 0
    assert not redis_sync.sismember(BLACKLIST_SET, "+972501234567")
    history = optout(env, "history", "0501234567", "--json").stdout
    assert '"outcome": "blacklisted"' in history and '"outcome": "removed"' in history
    assert "consent given" in history
    timeline = optout(env, "history", "0501234567").stdout
    assert "journaled" in timeline and "visible to the dialers" in timeline and "stored" in timeline
    assert "+972501234567" not in timeline, "numbers are masked unless LOG_FULL_NUMBERS"


def test_import_reports_bad_rows_by_line_and_stores_good_ones(env: dict[str, str], tmp_path: Path,
                                                             redis_sync: redis.Redis) -> None:
    assert optout(env, "migrate").returncode == 0
    csv_file = tmp_path / "numbers.csv"
    csv_file.write_text("name,phone\nann,050-123-4567\nbob,not-a-number\ncy,+14155550123\ndee,\n")
    out = optout(env, "import", str(csv_file))
    assert out.returncode == 2
    assert f"{csv_file}:3: field phone:" in out.stderr and f"{csv_file}:5: field phone:" in out.stderr
    assert "added 2" in out.stdout
    assert redis_sync.smembers(BLACKLIST_SET) >= {"+972501234567", "+14155550123"}
    plain = tmp_path / "plain.txt"
    plain.write_text("0521234567\n\n0531234567\n")
    assert optout(env, "import", str(plain)).returncode == 0
    export = optout(env, "export")
    lines = export.stdout.splitlines()
    assert lines[0] == "phoneNumber,addedAt,reason,source,metadata" and len(lines) == 5
    audit = optout(env, "export", "--audit", "--prefix", "+1").stdout.splitlines()
    assert len(audit) == 2 and "+14155550123" in audit[1]


def test_sync_cache_rebuilds_redis_and_drops_numbers_the_store_does_not_list(env: dict[str, str],
                                                                              redis_sync: redis.Redis) -> None:
    assert optout(env, "migrate").returncode == 0
    optout(env, "add", "0501234567")
    optout(env, "add", "0521234567")
    redis_sync.sadd(BLACKLIST_SET, "+972539999999")  # stale: not in the store, and nobody holds it pending
    redis_sync.delete(BLACKLIST_LEASE)
    out = optout(env, "sync-cache")
    assert out.returncode == 0 and "2 numbers" in out.stdout, out.stdout + out.stderr
    assert redis_sync.smembers(BLACKLIST_SET) == {"+972501234567", "+972521234567", BLACKLIST_SENTINEL}
    assert redis_sync.exists(BLACKLIST_LEASE)


def test_embedded_store_is_shared_by_every_command_wherever_it_runs(tmp_path: Path) -> None:
    """`make run` and `optout check` in another shell (another directory) read the same embedded store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_", "OPTOUT_"))}
    env.update(OPTOUT_DEFAULT_REGION="IL", XDG_STATE_HOME=str(tmp_path / "state"))
    here, there = tmp_path / "a", tmp_path / "b"
    here.mkdir()
    there.mkdir()

    def run(cwd: Path, *a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", *a], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=60)

    assert run(here, "migrate").returncode == 0
    assert run(here, "add", "0501234567").returncode == 0
    assert run(there, "check", "0501234567").returncode == 1
    data = tmp_path / "state" / "optout-agent"
    assert (data / "optout.db").exists() and (data / "journal.db").exists()


def test_check_against_a_store_without_the_schema_is_an_error_never_clear(tmp_path: Path, pg_schema: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_", "OPTOUT_"))}
    env.update(OPTOUT_DEFAULT_REGION="IL", OPTOUT_DB_PATH=str(tmp_path / "wrong.db"),
               OPTOUT_JOURNAL_PATH=str(tmp_path / "j.db"))
    for extra in ({}, {"DATABASE_URL": f"{PG_BASE}?options=-csearch_path%3D{pg_schema}"}):
        out = subprocess.run([sys.executable, "-m", "agent.cli", "check", "0501234567"], env={**env, **extra},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "clear" not in out.stdout
        assert "optout migrate" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "wrong.db").exists(), "a reader never creates an empty store"


@pytest.mark.parametrize(("content", "problem"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00" + bytes(range(256)) * 4, "binary"),
    ("phone\n0501234567\n".encode("utf-16"), "UTF-16"),
])
def test_import_of_a_file_that_is_not_text_exits_2_with_the_line(env: dict[str, str], tmp_path: Path,
                                                                 content: bytes, problem: str) -> None:
    assert optout(env, "migrate").returncode == 0
    path = tmp_path / "numbers.csv"
    path.write_bytes(content)
    out = optout(env, "import", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "line 1" in out.stderr and problem in out.stderr and "0 numbers were committed" in out.stderr


def test_import_reports_a_bad_line_and_reads_on(env: dict[str, str], tmp_path: Path, redis_sync: redis.Redis) -> None:
    assert optout(env, "migrate").returncode == 0
    path = tmp_path / "numbers.csv"
    path.write_bytes(b"name,phone\nann,0501234567\nbob,\"0521234567\ncy," + b"9" * 5000 + b"\n"
                     b"dee,05\xff31234567\neve,0541234567\n")
    out = optout(env, "import", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{path}:3: field line: is not a CSV row" in out.stderr
    assert f"{path}:4: field phone: is 5000 characters long" in out.stderr
    assert f"{path}:5: field line: is not UTF-8 text" in out.stderr
    assert "added 2" in out.stdout, "rows after the bad ones are still read"
    assert redis_sync.smismember(BLACKLIST_SET, ["+972501234567", "+972541234567"]) == [1, 1]


def test_history_shows_the_whole_timeline_and_audit_verify_walks_the_chain(env: dict[str, str]) -> None:
    assert optout(env, "migrate").returncode == 0
    optout(env, "add", "0501234567")
    head = optout(env, "audit", "head")
    assert head.returncode == 0 and len(head.stdout.split()[0]) == 64
    verify = optout(env, "audit", "verify", "--head", head.stdout.split()[0])
    assert verify.returncode == 0 and verify.stdout.startswith("chain intact: 1 rows, head ")
    assert optout(env, "audit", "verify", "--head", "0" * 64).returncode == 1


def test_parked_lists_nothing_on_a_clean_journal(env: dict[str, str]) -> None:
    assert optout(env, "migrate").returncode == 0
    out = optout(env, "parked")
    assert out.returncode == 0 and "nothing parked" in out.stderr


def test_report_writes_one_html_file_and_csv_tables(env: dict[str, str], tmp_path: Path) -> None:
    assert optout(env, "migrate").returncode == 0
    optout(env, "add", "0501234567")
    out = optout(env, "report", "--out", str(tmp_path / "r.html"), "--csv", str(tmp_path / "csv"),
                 "--since", "2026-01-01")
    assert out.returncode == 0, out.stderr
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert (tmp_path / "csv" / "per_day.csv").exists()
    assert optout(env, "report", "--out", str(tmp_path / "x.html"), "--since", "yesterday").returncode == 2


def test_check_with_the_store_down_answers_from_what_redis_proves(env: dict[str, str]) -> None:
    assert optout(env, "migrate").returncode == 0
    assert optout(env, "add", "0501234567").returncode == 0
    down = {**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}
    listed = optout(down, "check", "0501234567")
    assert listed.returncode == 1 and listed.stdout.rstrip().endswith("BLACKLISTED"), listed.stderr
    unknown = optout(down, "check", "0521234567")
    assert unknown.returncode == 2 and "clear" not in unknown.stdout


# --- every outcome's message, pinned: a new status or result without its line fails here ---------------------
ADD_LINES = {
    (Status.STORED, Outcome.BLACKLISTED): (0, "050***67: blacklisted"),
    (Status.STORED, Outcome.ALREADY_BLACKLISTED): (0, "050***67: already_blacklisted"),
    (Status.DUPLICATE, None): (0, "050***67: already recorded (this event was seen before): nothing changed"),
    (Status.JOURNALED, None): (2, "050***67: journaled and in Redis; the store is unavailable, the agent's replayer "
                                  "stores it"),
    (Status.REFUSED, None): (2, "050***67: journaled and in Redis, but the store REFUSED it; the agent's replayer "
                                "retries it and parks it after 3 refusals (`optout parked` lists it)"),
}


@pytest.mark.parametrize("status", list(Status))
def test_optout_add_says_what_happened_for_every_status(status: Status) -> None:
    cases = {key: line for key, line in ADD_LINES.items() if key[0] is status}
    assert cases, f"no pinned message for {status}"
    for (_, outcome), line in cases.items():
        result = PipelineResult(status, make_record(), outcome)
        assert cli.add_message(result, "050***67") == line


def test_optout_remove_and_check_say_what_happened_for_every_result() -> None:
    assert {r: cli.REMOVAL_MESSAGES[r] for r in RemoveResult} == {
        RemoveResult.REMOVED: "removed (audited)",
        RemoveResult.NOT_LISTED: "was not on the blacklist",
        RemoveResult.OPTED_OUT_SINCE: "NOT removed: it opted out again after this removal was asked for (the newer "
                                      "opt-out wins)",
    }
    assert cli.CHECK_WORDS == {True: "BLACKLISTED", False: "clear", None: "unknown (nobody can answer now)"}



def test_replay_writes_again_what_a_restored_store_lost(env: dict[str, str], pg_schema: str,
                                                        redis_sync: redis.Redis) -> None:
    """The restore procedure's last step: the store went back to an (empty) backup and Redis lost its view;
    the journal still holds what this host took, and `optout replay --since` writes it again."""
    assert optout(env, "migrate").returncode == 0
    assert optout(env, "add", "0501234567", "--reason", "asked").returncode == 0
    with psycopg.connect(PG_BASE, autocommit=True) as conn:  # restored from a dump taken before the add
        conn.execute(f"DROP SCHEMA {pg_schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {pg_schema}")
    redis_sync.flushdb()
    assert optout(env, "migrate").returncode == 0
    assert optout(env, "check", "0501234567").stdout.strip().endswith("clear"), "the double fault, as documented"
    bad = optout(env, "replay", "--since", "yesterday")
    assert bad.returncode == 2 and "--since is not an ISO 8601 time" in bad.stderr
    done = optout(env, "replay", "--since", "2000-01-01")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 opt-outs journaled here since 2000-01-01T00:00:00+00:00 replayed: 1 through")
    assert optout(env, "check", "0501234567").stdout.strip().endswith("BLACKLISTED")
    assert optout(env, "replay", "--since", "2000-01-01").returncode == 0
    history = optout(env, "history", "0501234567", "--json").stdout
    assert history.count('"outcome": "blacklisted"') == 1, "a second replay writes nothing twice"
