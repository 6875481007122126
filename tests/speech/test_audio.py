"""The audio path's pieces: G.711, RTP, resampling, voice activity, the clip keeper."""

from __future__ import annotations

import os
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("webrtcvad", reason="the speech extra is not installed (make test installs it)")

from agent.speech.audio import FRAME_SAMPLES, parse_rtp, to_model_rate, ulaw_decode, ulaw_encode
from agent.speech.clips import ClipKeeper
from agent.speech.vad import Segmenter

CLIPS = Path(__file__).resolve().parent / "clips"


def read(name: str) -> np.ndarray:
    with wave.open(str(CLIPS / name)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def test_mu_law_round_trip_keeps_the_signal() -> None:
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(800) / 8000)).astype(np.int16)
    back = ulaw_decode(ulaw_encode(tone)).astype(float)
    assert np.max(np.abs(back - tone)) < 300  # G.711 quantisation at this level
    assert ulaw_decode(b"\xff\x7f\x00\x80").tolist() == [0, 0, -32124, 32124]


def test_rtp_payload_is_found_past_csrcs_and_an_extension() -> None:
    header = struct.pack("!BBHII", 0x80 | 0x10 | 1, 0, 7, 160, 42) + b"\x00" * 4  # one CSRC, extension bit
    extension = struct.pack("!HH", 0xBEDE, 1) + b"\x00" * 4
    packet = parse_rtp(header + extension + b"\x55" * 160)
    assert packet is not None and packet.payload_type == 0 and packet.sequence == 7 and packet.payload == b"\x55" * 160
    assert parse_rtp(b"\x00" * 20) is None  # not version 2


def test_upsampling_keeps_a_voice_band_tone_at_its_level() -> None:
    tone = (10000 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000)).astype(np.int16)
    up = to_model_rate(tone)
    assert len(up) == 16000
    assert abs(np.sqrt(np.mean(up[1000:-1000] ** 2)) - 10000 / 32768 / np.sqrt(2)) < 0.01


def frames(pcm: np.ndarray) -> list[bytes]:
    return [pcm[i:i + FRAME_SAMPLES].astype("<i2").tobytes() for i in range(0, len(pcm) - FRAME_SAMPLES + 1,
                                                                            FRAME_SAMPLES)]


def test_segmenter_cuts_one_utterance_from_a_spoken_clip_and_none_from_silence() -> None:
    quiet = np.zeros(8000, dtype=np.int16)
    clip = np.concatenate([quiet, read("optout-please-stop-calling-me.wav"), quiet])
    seg = Segmenter()
    cut = [u for f in frames(clip) if (u := seg.push(f)) is not None]
    assert len(cut) == 1 and 1.0 < cut[0].seconds < 3.0 and not cut[0].cut
    seg = Segmenter()
    assert [u for f in frames(np.zeros(16000, dtype=np.int16)) if seg.push(f)] == [] and seg.flush() is None


def test_clips_are_private_and_pruned_after_their_retention(tmp_path: Path) -> None:
    keeper = ClipKeeper(tmp_path / "clips", retention_days=1)
    kept = keeper._keep("a" * 64, np.zeros(800, dtype=np.int16))
    assert kept.name == "a" * 64 + ".wav" and (kept.stat().st_mode & 0o777) == 0o600
    old = keeper._keep("b" * 64, np.zeros(800, dtype=np.int16))
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    assert keeper.prune() == 1 and kept.exists() and not old.exists()
