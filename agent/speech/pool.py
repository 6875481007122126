"""The recogniser pool: worker processes that each hold one model; the event loop never runs the model.

- Workers start with the `forkserver` method (forking an asyncio process that has threads is unsafe) and
  load and check the model in their initializer; `open()` waits until every worker answered, so a missing
  extra or a wrong file is an error at start (naming the file), not at the first utterance.
- At most `max_pending` utterances wait or run at once. Past that, an utterance is shed: dropped and
  counted (`optout_speech_shed_seconds_total`), never queued behind the others, so no call waits for the
  pool and the key-press path never does either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from agent import metrics
from agent.lifecycle import Resource
from agent.speech.audio import to_model_rate
from agent.speech.errors import SpeechUnavailable
from agent.speech.model import Hypothesis, Recogniser

log = logging.getLogger("agent.speech.pool")

_RECOGNISER: Recogniser | None = None


def _load(phrases: Sequence[str], threads: int) -> None:
    global _RECOGNISER
    # One thread per worker: several workers share the cores better than one worker with many threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _RECOGNISER = Recogniser(threads=threads)
    _RECOGNISER.set_phrases(phrases)


def _ready() -> int:
    if _RECOGNISER is None:
        raise SpeechUnavailable("the worker has no recogniser loaded")
    return os.getpid()


def _recognise(pcm8k: bytes) -> Hypothesis:
    if _RECOGNISER is None:
        raise SpeechUnavailable("the worker has no recogniser loaded")
    return _RECOGNISER.recognise(to_model_rate(np.frombuffer(pcm8k, dtype=np.int16)))


class RecogniserPool(Resource):
    """`async with RecogniserPool(...)`, then `await recognise(pcm)` from the event loop."""

    def __init__(self, *, workers: int = 1, phrases: Sequence[str], max_pending: int | None = None,
                 threads_per_worker: int = 1) -> None:
        self._workers = max(1, workers)
        self._phrases = tuple(phrases)
        self._threads = threads_per_worker
        self.max_pending = max_pending if max_pending is not None else 2 * self._workers
        self._pending = 0
        self._executor: ProcessPoolExecutor | None = None

    @property
    def ready(self) -> bool:
        """The workers are up (until then, and after `close`, every utterance would be shed)."""
        return self._executor is not None

    @property
    def pending(self) -> int:
        return self._pending

    async def open(self) -> None:
        """Start the workers and wait until each has loaded the model. Raises SpeechUnavailable."""
        if self._executor is not None:
            return
        context = multiprocessing.get_context("forkserver")
        self._executor = ProcessPoolExecutor(max_workers=self._workers, mp_context=context, initializer=_load,
                                             initargs=(self._phrases, self._threads))
        loop = asyncio.get_running_loop()
        try:
            pids = await asyncio.gather(*(loop.run_in_executor(self._executor, _ready)
                                          for _ in range(self._workers)))
        except concurrent.futures.process.BrokenProcessPool as exc:
            await self.close()
            raise SpeechUnavailable(f"the recogniser workers could not start: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        log.info("speech recogniser pool ready", extra={"workers": self._workers, "pids": sorted(set(pids))})

    async def close(self) -> None:
        """Stop the workers (an utterance still running is abandoned). Safe to call twice."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def recognise(self, pcm8k: np.ndarray) -> Hypothesis | None:
        """The recogniser's hypothesis for 8 kHz samples; None when shed (the pool is full or closed)."""
        seconds = len(pcm8k) / 8000
        if self._executor is None or self._pending >= self.max_pending:
            metrics.SPEECH_SHED_SECONDS.inc(seconds)
            return None
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            hypothesis = await loop.run_in_executor(self._executor, _recognise, pcm8k.astype(np.int16).tobytes())
        except concurrent.futures.process.BrokenProcessPool:
            log.error("a recogniser worker died; the utterance is dropped and the pool restarted")
            metrics.SPEECH_SHED_SECONDS.inc(seconds)
            await self._restart()
            return None
        finally:
            self._pending -= 1
        metrics.SPEECH_AUDIO_SECONDS.inc(seconds)
        metrics.SPEECH_CPU_SECONDS.inc(hypothesis.cpu_seconds)
        return hypothesis

    async def _restart(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        try:
            await self.open()
        except SpeechUnavailable as exc:
            log.error("the recogniser pool could not be restarted: %s", exc)
