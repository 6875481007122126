"""The README's first flow, exactly as a newcomer runs it: `make run` in one shell, then in a second shell
where nothing is exported, `optout call` and `optout check`. Both shells get a clean environment (a fresh
HOME, so the default data directory is new): one store location and one settings file for the agent and
every command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.asterisk.conftest import REPO

pytestmark = pytest.mark.asterisk

NUMBER = "+15551234567"


def clean_env(home: Path) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home), "LANG": "C.UTF-8"}


def second_shell(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".venv" / "bin" / "optout"), *args], cwd=REPO, env=clean_env(home),
                          capture_output=True, text=True, timeout=90, check=False)


def test_the_readme_second_shell_flow_works_with_nothing_exported(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    run = subprocess.Popen(["make", "run"], cwd=REPO, env=clean_env(home), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert run.poll() is None, f"make run exited: {run.stdout.read() if run.stdout else ''}"
            try:
                ready = httpx.get("http://127.0.0.1:8080/ready", timeout=1).json()
                if ready.get("ari") and ready.get("journal"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "the agent of `make run` never became ready"
            time.sleep(0.2)
        call = second_shell(home, "call", NUMBER, "--press", "9", "--via", "sip")
        assert call.returncode == 0, call.stdout + call.stderr
        assert "hung up: yes" in call.stdout and "blacklisted: yes" in call.stdout, call.stdout + call.stderr
        check = second_shell(home, "check", NUMBER)
        assert check.returncode == 1 and "BLACKLISTED" in check.stdout, check.stdout + check.stderr
        store = home / ".local" / "state" / "optout-agent" / "optout.db"
        assert store.exists(), "the agent's store is in the default data directory"
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
