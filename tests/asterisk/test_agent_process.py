"""The agent as operators run it (`python -m agent`): ready, handles a call, serves metrics, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from agent.store_postgres import PostgresStore
from agent.testcall import CallObserver
from tests.asterisk.conftest import REPO, AriEnv, eventually


async def test_agent_process_handles_a_call_and_stops_cleanly_on_sigterm(
    ari_env: AriEnv, pg_dsn: str, pg_store: PostgresStore, redis_url: str, tmp_path: Path, unused_tcp_port: int
) -> None:
    env = {**os.environ, "DATABASE_URL": pg_dsn, "REDIS_URL": redis_url, "OPTOUT_DEFAULT_REGION": "IL",
           "OPTOUT_JOURNAL_PATH": str(tmp_path / "journal.db"), "AGENT_HTTP_PORT": str(unused_tcp_port),
           "AGI_ENABLED": "false", "AMI_HOST": ""}
    proc = subprocess.Popen([sys.executable, "-m", "agent"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        async with httpx.AsyncClient() as client:

            async def ready() -> bool:
                try:
                    return (await client.get(f"{base}/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            assert await eventually(ready, within=15), "the agent never became ready"
            assert (await client.get(f"{base}/health")).json() == {"status": "ok"}
            async with CallObserver(ari_url=ari_env.url, username=ari_env.username, password=ari_env.password) as obs:
                call = await obs.wait(await obs.place("+972507654321", press="9", via="sip"), timeout=15)
            assert call.hung_up
            assert await eventually(lambda: pg_store.history("+972507654321"))
            metrics = (await client.get(f"{base}/metrics")).text
            assert 'optout_optouts_total{origin="ari",outcome="blacklisted"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        _, err = proc.communicate()
        assert "Traceback" not in err and "+972507654321" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
