"""`optout bridge` end to end: run_bridge with the HTTP endpoint and the SQS poller, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import EVENT, Wiring, event_json
from pydantic import SecretStr

from agent.errors import ConfigError
from agent.settings import Settings
from agent.store_postgres import PostgresStore
from sns_bridge.app import run_bridge


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_bridge_applies_sqs_optouts_serves_http_and_stops_on_sigterm(
    sns: Any, wiring: Wiring, moto_url: str, pg_store: PostgresStore, pg_dsn: str, redis_url: str, tmp_path: Path,
) -> None:
    port = free_port()
    settings = Settings(
        database_url=SecretStr(pg_dsn), redis_url=SecretStr(redis_url), optout_journal_path=tmp_path / "bridge.db",
        aws_endpoint_url=moto_url, bridge_sqs_queue_url=wiring.queue_url, bridge_topic_arns=wiring.topic_arn,
        bridge_http_port=port,
    )
    bridge = asyncio.create_task(run_bridge(settings))
    await sns.publish(TopicArn=wiring.topic_arn, Message=event_json(),
                      MessageAttributes={"origin": {"DataType": "String", "StringValue": "crm"}})
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            if await pg_store.blacklisted([EVENT["phoneNumber"]]):
                break
            await asyncio.sleep(0.05)
        health = await client.get(f"http://127.0.0.1:{port}/health")

    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(bridge, 10) == 0
    assert health.status_code == 200
    assert await pg_store.blacklisted([EVENT["phoneNumber"]]) == {EVENT["phoneNumber"]}


async def test_http_endpoint_without_topic_allow_list_is_a_config_error(tmp_path: Path) -> None:
    settings = Settings(optout_journal_path=tmp_path / "j.db", bridge_topic_arns="")

    with pytest.raises(ConfigError, match="BRIDGE_TOPIC_ARNS"):
        await run_bridge(settings)
