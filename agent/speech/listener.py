"""The ARI audio path: hear the callee of every call in the app, cut utterances, judge them, act or flag.

Per call (when speech is on for it: SPEECH_ENABLED, or the call's OPTOUT_SPEECH variable):

    POST /channels/externalMedia (ulaw, RTP to our UDP socket)  -> UnicastRTP channel
    POST /bridges (mixing) + addChannel(external media)
    POST /channels/{call}/snoop?spy=in                             -> Snoop channel (the callee only)
    addChannel(snoop)

The IVR prompt keeps playing on the call and is not in what `spy=in` carries. Audio comes as 8 kHz mu-law
(what the line carries; the benchmark corpus goes through the same decoder and resampler). One UDP socket
takes every stream; packets are told apart by Asterisk's source port (UNICASTRTP_LOCAL_PORT).

Teardown: the snoop goes with the call; the external media channel and the bridge are deleted when the
call leaves the app. Every id the listener creates starts with SPEECH_ID_PREFIX and names its call, so a
sweep (at start, then every `sweep_interval`) deletes whatever a previous run left, after a restart too.

Everything here is off the key-press path: the ARI reader only calls `call_started`/`call_ended`, which
start tasks; the recogniser runs in worker processes (agent/speech/pool.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aiohttp
import numpy as np

from agent import metrics
from agent.ari import basic_auth
from agent.constants import SPEECH_ID_PREFIX
from agent.intake import Intake
from agent.lifecycle import Resource
from agent.optout import HangupInfo, SpeechEvidence
from agent.phone import mask
from agent.speech.audio import FRAME_MS, FRAME_SAMPLES, PT_ULAW, parse_rtp, ulaw_decode
from agent.speech.candidates import CandidateRecorder
from agent.speech.clips import ClipKeeper
from agent.speech.errors import SpeechUnavailable
from agent.speech.matcher import Matcher
from agent.speech.model import locate
from agent.speech.pool import RecogniserPool
from agent.speech.vad import Segmenter, Utterance
from agent.telephony import ChannelFacts

log = logging.getLogger("agent.speech")

Mode = Literal["flag", "act"]
HangUpChannel = Callable[[str], Awaitable[HangupInfo]]
_ON = frozenset({"1", "on", "true", "yes"})
_OFF = frozenset({"0", "off", "false", "no"})
_KINDS = ("em", "br", "sn")


def speech_id(kind: str, call_id: str) -> str:
    """The id of the listener's `kind` (em: external media, br: bridge, sn: snoop) for a call."""
    return f"{SPEECH_ID_PREFIX}{kind}-{call_id}"


def call_of(resource_id: str) -> str | None:
    """The call a listener id belongs to; None when it is not one of ours."""
    if not resource_id.startswith(SPEECH_ID_PREFIX):
        return None
    kind, _, call = resource_id[len(SPEECH_ID_PREFIX):].partition("-")
    return call if kind in _KINDS and call else None


@dataclass
class Stream:
    """One call being listened to."""

    facts: ChannelFacts
    segmenter: Segmenter
    source_port: int | None = None
    pending: bytearray = field(default_factory=bytearray)
    ended: bool = False

    @property
    def call_id(self) -> str:
        return self.facts.uniqueid


class _Rtp(asyncio.DatagramProtocol):
    def __init__(self, on_packet: Callable[[int, bytes], None]) -> None:
        self._on_packet = on_packet

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._on_packet(addr[1], data)


class SpeechListener(Resource):
    """Follows the ARI app's calls (it is the AriAgent's `watcher`); `run()` sweeps leftovers until cancelled."""

    def __init__(
        self, *, url: str, username: str, password: str, app: str, intake: Intake, pool: RecogniserPool,
        matcher: Matcher, hang_up: HangUpChannel, candidates: CandidateRecorder, mode: Mode = "flag",
        default_on: bool = False, rtp_host: str = "127.0.0.1", rtp_port: int = 0, clips: ClipKeeper | None = None,
        sweep_interval: float = 60.0, request_timeout: float = 3.0, segmenter: Callable[[], Segmenter] = Segmenter,
    ) -> None:
        self._url = url.rstrip("/")
        self._auth = basic_auth(username, password)
        self._app = app
        self._intake = intake
        self._pool = pool
        self._matcher = matcher
        self._hang_up = hang_up
        self._candidates = candidates
        self.mode: Mode = mode
        self._default_on = default_on
        self._rtp_host = rtp_host
        self._rtp_port = rtp_port
        self._clips = clips
        self._sweep_interval = sweep_interval
        self._timeout = request_timeout
        self._new_segmenter = segmenter
        self.judged = 0
        """Utterances judged so far (recognised and matched, or shed)."""
        self._judging: set[asyncio.Task[Any]] = set()
        self._streams: dict[str, Stream] = {}
        self._by_port: dict[int, Stream] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rest: aiohttp.ClientSession | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Bind the UDP socket and open the REST session (the pool is opened by the caller)."""
        self._rest = aiohttp.ClientSession(headers={"Authorization": self._auth},
                                           timeout=aiohttp.ClientTimeout(total=self._timeout))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Rtp(self._on_packet),
                                                           local_addr=(self._rtp_host, self._rtp_port))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        log.info("speech listener ready", extra={"rtp_port": self.port, "mode": self.mode,
                                                 "default_on": self._default_on})

    async def close(self) -> None:
        """Tear down every stream's channels and bridge, then close the socket. Safe to call twice."""
        for call_id in list(self._streams):
            self.call_ended(call_id)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._rest is not None:
            rest, self._rest = self._rest, None
            await rest.close()

    async def run(self) -> None:
        """Start the recogniser pool (unless it is up), then sweep leftovers now and every `sweep_interval`
        seconds, until cancelled. The pool loads here, in a task of its own, so the agent's key-press ways in
        are up while the model loads; calls that start before it is ready are not listened to."""
        if not self._pool.ready:
            try:
                await asyncio.to_thread(locate)  # each file's SHA-256, named when it is not the pinned one
                await self._pool.open()
            except SpeechUnavailable as exc:
                log.error("spoken opt-out is off: %s", exc)
                return
        while True:
            try:
                await self.sweep()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("could not sweep the speech listener's leftovers: %s", exc)
            await asyncio.sleep(self._sweep_interval)

    @property
    def streams(self) -> int:
        return len(self._streams)

    @property
    def idle(self) -> bool:
        """No utterance is being judged."""
        return not self._judging

    # --- what the ARI reader tells (synchronous, never waits) --------------------------------------------
    def owns(self, channel_id: str) -> bool:
        return channel_id.startswith(SPEECH_ID_PREFIX)

    def call_started(self, facts: ChannelFacts) -> None:
        if facts.uniqueid in self._streams or not self._pool.ready:
            return
        stream = self._streams[facts.uniqueid] = Stream(facts, self._new_segmenter())
        metrics.SPEECH_STREAMS.set(len(self._streams))
        self._spawn(self._attach(stream), name=f"speech-attach-{facts.uniqueid}")

    def call_ended(self, channel_id: str) -> None:
        stream = self._streams.pop(channel_id, None)
        if stream is None:
            return
        metrics.SPEECH_STREAMS.set(len(self._streams))
        stream.ended = True
        if stream.source_port is not None:
            self._by_port.pop(stream.source_port, None)
        # The callee may say it and hang up at once: what was being said is still judged.
        utterance = stream.segmenter.flush()
        if utterance is not None:
            self._judge_later(stream, utterance, time.monotonic(), datetime.now(UTC))
        self._spawn(self._detach(stream.call_id), name=f"speech-detach-{channel_id}")

    # --- the audio path --------------------------------------------------------------------------------
    async def _request(self, method: str, path: str, **params: str) -> tuple[int, Any]:
        if self._rest is None:
            raise aiohttp.ClientConnectionError("the speech listener is closed")
        async with self._rest.request(method, f"{self._url}/ari{path}", params=params) as resp:
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, body

    async def _wanted(self, call_id: str) -> bool:
        status, body = await self._request("GET", f"/channels/{call_id}/variable", variable="OPTOUT_SPEECH")
        value = str(body.get("value") or "").strip().lower() if status == 200 and isinstance(body, dict) else ""
        if value in _ON:
            return True
        if value in _OFF:
            return False
        return self._default_on

    async def _attach(self, stream: Stream) -> None:
        call_id = stream.call_id
        em, br, sn = (speech_id(k, call_id) for k in _KINDS)
        try:
            if not await self._wanted(call_id):
                self._streams.pop(call_id, None)
                metrics.SPEECH_STREAMS.set(len(self._streams))
                return
            await self._delete_all(call_id)  # a previous run's, for a call that survived an agent restart
            status, media = await self._request(
                "POST", "/channels/externalMedia", app=self._app, channelId=em, format="ulaw",
                external_host=f"{self._rtp_host}:{self.port}", encapsulation="rtp", transport="udp")
            if status != 200:
                raise _SetupRefused(f"externalMedia: HTTP {status}")
            port = int((media.get("channelvars") or {}).get("UNICASTRTP_LOCAL_PORT") or 0)
            if stream.ended:
                return
            stream.source_port = port
            self._by_port[port] = stream
            for step, (method, path, params) in enumerate((
                ("POST", "/bridges", {"type": "mixing", "bridgeId": br}),
                ("POST", f"/bridges/{br}/addChannel", {"channel": em}),
                ("POST", f"/channels/{call_id}/snoop", {"spy": "in", "app": self._app, "snoopId": sn}),
                ("POST", f"/bridges/{br}/addChannel", {"channel": sn}),
            )):
                if stream.ended:
                    return
                status, _ = await self._request(method, path, **params)
                # A channel Asterisk just created enters the app a moment after the POST answered; until
                # then addChannel answers 422 ("not in Stasis application").
                for _ in range(50):
                    if status != 422 or stream.ended:
                        break
                    await asyncio.sleep(0.02)
                    status, _ = await self._request(method, path, **params)
                if status >= 300:
                    raise _SetupRefused(f"step {step + 1} ({method} {path.replace(call_id, '{call}')}): HTTP {status}")
            log.info("listening to the callee", extra={"channel": call_id, "rtp_source_port": port})
        except (aiohttp.ClientError, TimeoutError, _SetupRefused, ValueError) as exc:
            metrics.SPEECH_SETUP_ERRORS.inc()
            if not stream.ended:
                log.warning("could not listen to the callee (the call goes on, keys still work): %s", exc,
                            extra={"channel": call_id})
                self.call_ended(call_id)
        finally:
            if stream.ended:
                await self._delete_all(call_id)

    async def _detach(self, call_id: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self._delete_all(call_id)

    async def _delete_all(self, call_id: str) -> None:
        em, br, sn = (speech_id(k, call_id) for k in _KINDS)
        await asyncio.gather(self._request("DELETE", f"/channels/{em}"), self._request("DELETE", f"/channels/{sn}"),
                             self._request("DELETE", f"/bridges/{br}"))

    async def sweep(self) -> int:
        """Delete every listener channel and bridge whose call is not being listened to now; how many."""
        deleted = 0
        for kind in ("channels", "bridges"):
            status, items = await self._request("GET", f"/{kind}")
            if status != 200 or not isinstance(items, list):
                continue
            for item in items:
                rid = str(item.get("id", ""))
                call = call_of(rid)
                if call is not None and call not in self._streams:
                    status, _ = await self._request("DELETE", f"/{kind}/{rid}")
                    deleted += status in (200, 204)
        if deleted:
            log.info("swept %d speech channels and bridges left by calls that ended", deleted)
        return deleted

    def _on_packet(self, source_port: int, data: bytes) -> None:
        stream = self._by_port.get(source_port)
        if stream is None or stream.ended:
            return
        packet = parse_rtp(data)
        if packet is None or packet.payload_type != PT_ULAW:
            return
        stream.pending += ulaw_decode(packet.payload).tobytes()
        frame_bytes = FRAME_SAMPLES * 2
        while len(stream.pending) >= frame_bytes:
            frame = bytes(stream.pending[:frame_bytes])
            del stream.pending[:frame_bytes]
            utterance = stream.segmenter.push(frame)
            if utterance is not None:
                late = (stream.segmenter.frames_seen - utterance.ended_frame) * FRAME_MS / 1000
                self._judge_later(stream, utterance, time.monotonic() - late,
                                  datetime.now(UTC) - timedelta(seconds=late))

    # --- deciding ----------------------------------------------------------------------------------------
    def _judge_later(self, stream: Stream, utterance: Utterance, ended_mono: float, ended_at: datetime) -> None:
        task = self._spawn(self._judge(stream, utterance, ended_mono, ended_at),
                           name=f"speech-judge-{stream.call_id}")
        self._judging.add(task)
        task.add_done_callback(self._judging.discard)

    async def _judge(self, stream: Stream, utterance: Utterance, ended_mono: float, ended_at: datetime) -> None:
        try:
            hypothesis = await self._pool.recognise(utterance.pcm)
        finally:
            self.judged += 1
        if hypothesis is None:
            return  # shed (counted by the pool)
        match = self._matcher.score(hypothesis.text, hypothesis.phrase_scores)
        if not self._matcher.is_optout(match):
            log.debug("utterance is not an opt-out", extra={"channel": stream.call_id, "score": match.score})
            return
        audio_sha256 = pcm_sha256(utterance.pcm)
        evidence = SpeechEvidence(transcript=hypothesis.text, score=match.score, phrase=match.phrase,
                                  audio_sha256=audio_sha256)
        if self._clips is not None:
            await self._clips.keep(audio_sha256, utterance.pcm)
        metrics.SPEECH_DETECTIONS.labels(self.mode).inc()
        number = stream.facts.var("OPTOUT_NUMBER")
        log.info("spoken opt-out %s", "honoured" if self.mode == "act" else "flagged for review",
                 extra={"channel": stream.call_id, "score": match.score, "phrase": match.phrase, "how": match.how,
                        "number": mask(number) if number else None, "mode": self.mode})
        if self.mode == "act":
            call_id = stream.call_id
            pressed = self._intake.spoken(stream.facts, evidence=evidence, spoken_at=ended_at,
                                          hang_up=lambda: self._hang_up(call_id))
            if pressed is not None:
                await pressed.hung_up
                metrics.SPEECH_DECISION.labels("act").observe(time.monotonic() - ended_mono)
            return
        await self._candidates.record(stream.facts, evidence, spoken_at=ended_at)
        metrics.SPEECH_DECISION.labels("flag").observe(time.monotonic() - ended_mono)

    def _spawn(self, coro: Awaitable[Any], *, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(_logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _SetupRefused(Exception):
    """Asterisk refused a step of tapping a call's audio."""


async def _logged(coro: Awaitable[Any], name: str) -> Any:
    try:
        return await coro
    except Exception:
        log.exception("speech task %s failed", name)
        return None


def pcm_sha256(pcm: np.ndarray) -> str:
    """The SHA-256 the audit row names: of the utterance as 16-bit little-endian 8 kHz samples."""
    return hashlib.sha256(pcm.astype("<i2").tobytes()).hexdigest()
