"""Spoken opt-out on the real sandbox: a real SIP call whose far end speaks a generated clip.

The far end: a Local channel whose other half dials the loopback SIP endpoint (a real SIP + RTP call into
`optout-ivr`, the agent's Stasis app); the test holds the Local half in an app of its own and plays the clip
on it with ARI (`/channels/{id}/play`, the file copied into the sandbox's root). The agent listens to the
IVR leg (snoop spy=in + external media), recognises with the real model in a worker process, and acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from agent.ari import AriAgent, basic_auth
from agent.constants import BLACKLIST_SET, SPEECH_ID_PREFIX
from agent.intake import Intake
from agent.store_postgres import PostgresStore
from tests.asterisk.conftest import AriEnv, eventually, serving_ari

pytest.importorskip("onnxruntime", reason="the speech extra is not installed (make test installs it)")

from agent.speech.candidates import CandidateRecorder
from agent.speech.listener import SpeechListener
from agent.speech.matcher import Matcher
from agent.speech.pool import RecogniserPool

CLIPS = Path(__file__).resolve().parents[1] / "speech" / "clips"
SANDBOX_ROOT = Path(os.environ.get("ASTERISK_SANDBOX_ROOT", "/var/cache/optout-agent/asterisk-root"))
CLIP_DIR_IN_SANDBOX = "/tmp/optout-speech-test"


class FarEnd:
    """The called party: places a SIP call into the IVR and speaks clips on it (its own ARI app)."""

    def __init__(self, env: AriEnv) -> None:
        self._env = env
        self.app = f"optout-speechtest-{uuid.uuid4().hex[:8]}"
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self.started: dict[str, asyncio.Event] = {}
        self.ended: dict[str, asyncio.Event] = {}
        self.played: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> FarEnd:
        self._session = aiohttp.ClientSession(headers={"Authorization": basic_auth(self._env.username,
                                                                                  self._env.password)})
        url = self._env.url.replace("http", "ws", 1) + "/ari/events"
        self._ws = await self._session.ws_connect(url, params={"app": self.app}, heartbeat=20)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel_id, ended in self.ended.items():  # a failed test must not leave its call up
            if not ended.is_set():
                with contextlib.suppress(aiohttp.ClientError):
                    await self.hang_up(channel_id)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            event: dict[str, Any] = json.loads(msg.data)
            kind = event.get("type")
            chan = (event.get("channel") or {}).get("id", "")
            if kind == "StasisStart":
                self.started.setdefault(chan, asyncio.Event()).set()
            elif kind in ("StasisEnd", "ChannelDestroyed"):
                self.ended.setdefault(chan, asyncio.Event()).set()
            elif kind == "PlaybackFinished":
                self.played.setdefault(event["playback"]["id"], asyncio.Event()).set()

    async def call(self, number: str) -> str:
        """A SIP call into optout-ivr with OPTOUT_NUMBER=`number`; the far end's channel id, once answered."""
        assert self._session is not None
        channel_id = f"speechtest-{uuid.uuid4().hex[:12]}"
        self.started[channel_id] = asyncio.Event()
        self.ended[channel_id] = asyncio.Event()
        params = {"endpoint": "Local/ari@optout-test-sip-out", "app": self.app, "channelId": channel_id,
                  "formats": "ulaw", "timeout": "20"}
        variables = {"CALL_ID": f"call-{channel_id}", "CAMPAIGN_ID": "speech-campaign", "OPTOUT_NUMBER": number}
        async with self._session.post(f"{self._env.url}/ari/channels", params=params,
                                      json={"variables": variables}) as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.wait_for(self.started[channel_id].wait(), 15)
        return channel_id

    async def say(self, channel_id: str, clip: str) -> None:
        """Play a clip (a file in CLIPS) to the IVR and wait until it has been played."""
        assert self._session is not None
        playback = f"pb-{uuid.uuid4().hex[:12]}"
        self.played[playback] = asyncio.Event()
        media = f"sound:{CLIP_DIR_IN_SANDBOX}/{Path(clip).stem}"
        async with self._session.post(f"{self._env.url}/ari/channels/{channel_id}/play",
                                      params={"media": media, "playbackId": playback}) as resp:
            assert resp.status in (200, 201), await resp.text()
        await asyncio.wait_for(self.played[playback].wait(), 20)

    async def hang_up(self, channel_id: str) -> None:
        assert self._session is not None
        async with self._session.delete(f"{self._env.url}/ari/channels/{channel_id}") as resp:
            await resp.read()

    async def speech_resources(self) -> list[str]:
        """Channels and bridges the speech listener created that Asterisk still has."""
        assert self._session is not None
        found = []
        for kind in ("channels", "bridges"):
            async with self._session.get(f"{self._env.url}/ari/{kind}") as resp:
                found += [i["id"] for i in await resp.json() if i["id"].startswith(SPEECH_ID_PREFIX)]
        return found


@pytest.fixture(scope="module", autouse=True)
def clips_in_sandbox() -> None:
    """The clips where Asterisk (in its chroot) can play them."""
    target = SANDBOX_ROOT / CLIP_DIR_IN_SANDBOX.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    for clip in CLIPS.glob("*.wav"):
        shutil.copyfile(clip, target / clip.name)


@pytest.fixture(scope="module")
def pool() -> Iterator[RecogniserPool]:
    """One recogniser worker for the module (loading the model takes seconds); its process pool is not
    tied to an event loop, so each test's loop uses it."""
    opened = RecogniserPool(workers=1, phrases=Matcher().phrases)
    asyncio.run(opened.open())
    yield opened
    asyncio.run(opened.close())


@contextlib.asynccontextmanager
async def listening(ari_env: AriEnv, intake: Intake, pool: RecogniserPool, store: PostgresStore,
                    mode: str) -> AsyncIterator[tuple[AriAgent, SpeechListener]]:
    async with serving_ari(ari_env, intake) as agent:
        listener = SpeechListener(
            url=ari_env.url, username=ari_env.username, password=ari_env.password, app=ari_env.app,
            intake=intake, pool=pool, matcher=Matcher(), hang_up=agent.hang_up_channel, mode=mode,  # type: ignore[arg-type]
            default_on=True, candidates=CandidateRecorder(store=store, region="IL"))
        async with listener:
            agent.watcher = listener
            try:
                yield agent, listener
            finally:
                agent.watcher = None


def unique_number() -> str:
    return f"+97250{uuid.uuid4().int % 10_000_000:07d}"


async def test_callee_saying_stop_calling_is_hung_up_and_listed_with_origin_speech(
    ari_env: AriEnv, intake: Intake, pool: RecogniserPool, pg_store: PostgresStore, redis_sync: redis.Redis,
) -> None:
    number = unique_number()
    async with listening(ari_env, intake, pool, pg_store, "act") as (_, listener), FarEnd(ari_env) as far:
        callee = await far.call(number)
        await eventually(lambda: _async(listener.streams == 1), within=5)
        await far.say(callee, "optout-please-stop-calling-me.wav")
        await asyncio.wait_for(far.ended[callee].wait(), 30)  # the agent hung the call up
        rows = await eventually(lambda: pg_store.history(number), within=10)
        assert len(rows) == 1
        row = rows[0]
        assert row.origin == "speech" and row.outcome == "blacklisted" and row.digit is None
        assert row.hangup_method == "ari" and row.hangup_result == "ok"
        assert "stop calling" in row.speech_transcript.lower()
        assert float(row.speech_score) >= 0.8 and row.speech_phrase
        assert len(row.speech_audio_sha256) == 64
        assert await pg_store.blacklisted([number]) == {number}
        assert redis_sync.sismember(BLACKLIST_SET, number)
        assert await eventually(lambda: _async(not listener.streams), within=5)
        assert await eventually(lambda: _none_left(far), within=5)


async def test_callee_saying_something_else_is_not_hung_up_nor_listed(
    ari_env: AriEnv, intake: Intake, pool: RecogniserPool, pg_store: PostgresStore,
) -> None:
    number = unique_number()
    async with listening(ari_env, intake, pool, pg_store, "act") as (_, listener), FarEnd(ari_env) as far:
        callee = await far.call(number)
        await eventually(lambda: _async(listener.streams == 1), within=5)
        await far.say(callee, "negative-call-me-any-time-after-five.wav")
        assert await eventually(lambda: _async(listener.judged >= 1 and listener.idle), within=20)
        assert not far.ended[callee].is_set(), "the agent hung up a call whose callee did not opt out"
        assert await pg_store.history(number) == []
        assert await pg_store.blacklisted([number]) == set()
        await far.hang_up(callee)
        await asyncio.wait_for(far.ended[callee].wait(), 10)
        assert await eventually(lambda: _none_left(far), within=5)


async def test_flag_mode_records_a_candidate_and_hangs_nothing_up(
    ari_env: AriEnv, intake: Intake, pool: RecogniserPool, pg_store: PostgresStore,
) -> None:
    number = unique_number()
    async with listening(ari_env, intake, pool, pg_store, "flag") as (_, listener), FarEnd(ari_env) as far:
        callee = await far.call(number)
        await eventually(lambda: _async(listener.streams == 1), within=5)
        await far.say(callee, "optout-please-stop-calling-me.wav")
        rows = await eventually(lambda: pg_store.history(number), within=20)
        assert [r.outcome for r in rows] == ["speech_candidate"]
        assert rows[0].origin == "speech" and "stop calling" in rows[0].speech_transcript.lower()
        assert not far.ended[callee].is_set(), "flag mode must not hang up"
        assert await pg_store.blacklisted([number]) == set()
        await far.hang_up(callee)
        await asyncio.wait_for(far.ended[callee].wait(), 10)


async def test_a_restarted_agent_sweeps_what_a_previous_run_left(
    ari_env: AriEnv, intake: Intake, pool: RecogniserPool, pg_store: PostgresStore,
) -> None:
    async with listening(ari_env, intake, pool, pg_store, "flag") as (_, listener), FarEnd(ari_env) as far:
        # What a run killed mid-call leaves: an external media channel and a bridge named for a gone call.
        await listener._request("POST", "/channels/externalMedia", app=ari_env.app, format="ulaw",
                                channelId=f"{SPEECH_ID_PREFIX}em-gone.1", external_host="127.0.0.1:9")
        await listener._request("POST", "/bridges", type="mixing", bridgeId=f"{SPEECH_ID_PREFIX}br-gone.1")
        left = {f"{SPEECH_ID_PREFIX}em-gone.1", f"{SPEECH_ID_PREFIX}br-gone.1"}
        assert left <= set(await far.speech_resources())
        assert await listener.sweep() >= 2

        async def swept() -> bool:  # Asterisk hangs a deleted channel up asynchronously: listed a moment longer
            return not left & set(await far.speech_resources())
        assert await eventually(swept, within=5), left & set(await far.speech_resources())


async def _async(value: Any) -> Any:
    return value


async def _none_left(far: FarEnd) -> bool:
    return not await far.speech_resources()
