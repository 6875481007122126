"""The real recogniser on a short clip set, its pinned files, and its pool (worker processes, shedding)."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the speech extra is not installed (make test installs it)")

from agent import metrics
from agent.speech import model, runtime
from agent.speech.audio import FRAME_SAMPLES, to_model_rate
from agent.speech.errors import ModelFileMismatch, SpeechNotInstalled
from agent.speech.matcher import Matcher
from agent.speech.pool import RecogniserPool
from agent.speech.vad import Segmenter

CLIPS = Path(__file__).resolve().parent / "clips"


def read(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


@pytest.fixture(scope="module")
def recogniser() -> model.Recogniser:
    rec = model.Recogniser()
    rec.set_phrases(Matcher().phrases)
    return rec


@pytest.mark.parametrize("clip", sorted(p.name for p in CLIPS.glob("*.wav")))
def test_short_clip_set_is_decided_as_labelled(recogniser: model.Recogniser, clip: str) -> None:
    """Clips named optout-* are opt-outs, negative-* are not (from tests/bench/speech_corpus.py: telephone band,
    G.711, GSM, noise, a quiet talker, non-speech), through the VAD as on a call."""
    matcher = Matcher()
    pcm = read(CLIPS / clip)
    segmenter = Segmenter()
    cut = [u for i in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES)
           if (u := segmenter.push(pcm[i:i + FRAME_SAMPLES].astype("<i2").tobytes())) is not None]
    if (tail := segmenter.flush()) is not None:
        cut.append(tail)
    verdicts = []
    for utterance in cut:
        hypothesis = recogniser.recognise(to_model_rate(utterance.pcm))
        assert len(hypothesis.phrase_scores) == len(matcher.phrases) and hypothesis.cpu_seconds > 0
        verdicts.append((hypothesis.text, matcher.score(hypothesis.text, hypothesis.phrase_scores)))
    assert any(matcher.is_optout(m) for _, m in verdicts) == clip.startswith("optout-"), verdicts


def test_a_model_file_that_is_not_the_pinned_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    package, path, _ = model.PINNED["tokenizer"]
    monkeypatch.setitem(model.PINNED, "tokenizer", (package, path, "0" * 64))
    with pytest.raises(ModelFileMismatch, match=r"tokenizer\.json: SHA-256 is b68b9"):
        model.locate()


def test_a_missing_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(model.PINNED, "encoder", ("no_such_moonshine_package", "x.ort", "0" * 64))
    with pytest.raises(SpeechNotInstalled, match=r"optout-agent\[speech\]"):
        model.locate()
    monkeypatch.setattr(runtime, "REQUIRED_MODULES", ("numpy", "no_such_onnxruntime"))
    with pytest.raises(SpeechNotInstalled, match=r"no_such_onnxruntime is not installed: pip install"):
        runtime.check_installed()


async def test_pool_recognises_in_a_worker_and_sheds_what_it_cannot_take() -> None:
    pcm = read(CLIPS / "optout-please-stop-calling-me.wav")
    shed_before = metrics.SPEECH_SHED_SECONDS._value.get()
    async with RecogniserPool(workers=1, phrases=Matcher().phrases, max_pending=1) as pool:
        first = asyncio.ensure_future(pool.recognise(pcm))
        await asyncio.sleep(0)  # the first has taken the only slot
        assert await pool.recognise(pcm) is None  # shed at once, not queued
        hypothesis = await first
    assert hypothesis is not None and "stop calling" in hypothesis.text.lower()
    assert metrics.SPEECH_SHED_SECONDS._value.get() - shed_before == pytest.approx(len(pcm) / 8000)
