"""Security properties: no default credentials, loopback binds, a least-privilege AMI user, and ARI
credentials that never travel in a URL."""

from __future__ import annotations

import configparser
import os
from pathlib import Path

import pytest
from aiohttp import web

from agent.ari import _HeaderAuthHttpClient
from agent.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ARI_", "AMI_", "AGENT_", "BRIDGE_")):
            monkeypatch.delenv(name)


def test_no_credential_has_a_default(clean_env: None) -> None:
    s = Settings()
    assert s.ari_password is None and s.ami_secret is None and s.agent_api_token is None
    assert s.bridge_worker_token is None


def test_everything_binds_to_loopback_by_default(clean_env: None) -> None:
    s = Settings()
    assert s.agent_http_host == "127.0.0.1" and s.bridge_http_host == "127.0.0.1" and s.agi_host == "127.0.0.1"
    assert s.ari_url.startswith("http://127.0.0.1:")


def test_secrets_can_come_from_files(clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ari").write_text("from-a-file\n")
    monkeypatch.setenv("ARI_PASSWORD_FILE", str(tmp_path / "ari"))
    s = Settings()
    assert s.ari_password is not None and s.ari_password.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(s)


def test_ami_user_has_only_the_classes_the_agent_needs() -> None:
    conf = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=(";",))
    conf.read(REPO / "asterisk-docker" / "conf" / "manager.conf")
    users = [sec for sec in conf.sections() if sec != "general"]
    assert users
    for user in users:
        classes = {c.strip() for key in ("read", "write") for c in conf[user].get(key, "").split(",")}
        assert not classes & {"system", "originate", "command", "all", "config", "user"}, (user, classes)
        assert conf[user].get("permit", "").startswith("127.0.0.1")


async def test_ari_websocket_sends_credentials_in_a_header_not_the_url(unused_tcp_port: int) -> None:
    seen: dict[str, str] = {}

    async def events(request: web.Request) -> web.WebSocketResponse:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("Authorization", "")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ari/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    client = _HeaderAuthHttpClient("127.0.0.1", "optout", "s3cret-pw")
    try:
        ws = await client.ws_connect(f"ws://127.0.0.1:{unused_tcp_port}/ari/events", params={"app": "optout-agent"})
        await ws.close()
    finally:
        await client.close()
        await runner.cleanup()
    assert "s3cret" not in seen["url"] and "api_key" not in seen["url"]
    assert seen["auth"].startswith("Basic ")


def test_a_short_api_token_is_refused_at_start(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from agent.settings import Settings

    monkeypatch.setenv("AGENT_API_TOKEN", "short")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()


def test_a_national_number_invalid_in_the_default_region_is_accepted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import agent.phone
    from agent.phone import normalise

    agent.phone._region_warned.clear()
    caplog.set_level("WARNING", "agent.phone")
    assert normalise("0501234567", region="US") == "+10501234567"
    assert "check OPTOUT_DEFAULT_REGION" in caplog.text and "0501234567" not in caplog.text
