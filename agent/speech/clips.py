"""Keeping utterance audio (SPEECH_CLIP_DIR): off by default, since a voice is personal data.

When on, each utterance that was taken as an opt-out or a candidate is written as `{sha256}.wav` (8 kHz,
16-bit mono, the bytes the audit row's SHA-256 covers), readable by the agent's user only, and files older
than the retention are deleted (checked at each write and at most hourly).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import wave
from pathlib import Path

import numpy as np

log = logging.getLogger("agent.speech.clips")


class ClipKeeper:
    def __init__(self, directory: Path, *, retention_days: float) -> None:
        self.directory = directory
        self._retention = retention_days * 86_400
        self._pruned = 0.0

    async def keep(self, sha256: str, pcm: np.ndarray) -> Path:
        return await asyncio.to_thread(self._keep, sha256, pcm)

    def _keep(self, sha256: str, pcm: np.ndarray) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / f"{sha256}.wav"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, wave.open(raw, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(pcm.astype("<i2").tobytes())
        if time.monotonic() - self._pruned > 3600 or not self._pruned:
            self.prune()
        return path

    def prune(self, now: float | None = None) -> int:
        """Delete clips older than the retention; how many."""
        self._pruned = time.monotonic()
        cutoff = (now or time.time()) - self._retention
        gone = 0
        for path in self.directory.glob("*.wav"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        if gone:
            log.info("deleted %d speech clips past their retention", gone)
        return gone
