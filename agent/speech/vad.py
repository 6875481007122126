"""Voice activity: 20 ms frames of 8 kHz audio in, utterances out.

webrtcvad-wheels (Google's WebRTC detector, a small C extension with wheels for current Pythons): it costs
microseconds a frame, so it runs on every stream in the event loop and only speech ever reaches the
recogniser; it needs no model file and no torch (silero-vad, the other packaged detector, imports torch).
Non-speech (silence, noise, tones, music, DTMF) that it lets through is handled by the matcher, which must
find opt-out words in what the recogniser makes of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.speech.audio import FRAME_MS, FRAME_SAMPLES, LINE_RATE


@dataclass(frozen=True)
class Utterance:
    """One stretch of speech, with a little audio on either side."""

    pcm: npt.NDArray[np.int16]
    """8 kHz 16-bit samples."""
    ended_frame: int
    """Frame index (20 ms each, since the stream began) of the last speech frame."""
    cut: bool = False
    """True when it was cut at the maximum length while speech went on."""

    @property
    def seconds(self) -> float:
        return len(self.pcm) / LINE_RATE


@dataclass
class Segmenter:
    """Cuts one stream into utterances. `push` one 20 ms frame at a time; no I/O, not thread-safe.

    An utterance starts when `start_frames` of the last `start_window` frames are speech, and ends after
    `end_frames` frames of non-speech (the hangover, which is most of the decision latency), or at
    `max_frames`. Shorter than `min_speech_frames` of speech: dropped (clicks, a cough).
    """

    aggressiveness: int = 2
    start_window: int = 10
    start_frames: int = 6
    end_frames: int = 12
    max_frames: int = 400
    min_speech_frames: int = 12
    pre_frames: int = 10
    _vad: object = field(init=False, repr=False)
    _ring: list[tuple[bytes, bool]] = field(default_factory=list, init=False, repr=False)
    _frames: list[bytes] = field(default_factory=list, init=False, repr=False)
    _speech: int = field(default=0, init=False)
    _silent: int = field(default=0, init=False)
    _index: int = field(default=0, init=False)
    _last_speech: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        import webrtcvad  # the speech extra; callers check it is installed first (agent/speech/runtime.py)

        self._vad = webrtcvad.Vad(self.aggressiveness)

    @property
    def frames_seen(self) -> int:
        """Frames pushed so far (an utterance's `ended_frame` is on this clock)."""
        return self._index

    def push(self, frame: bytes) -> Utterance | None:
        """One frame of 16-bit little-endian PCM (FRAME_SAMPLES samples); an utterance when one just ended."""
        if len(frame) != FRAME_SAMPLES * 2:
            raise ValueError(f"a frame is {FRAME_SAMPLES * 2} bytes ({FRAME_MS} ms at {LINE_RATE} Hz), "
                             f"got {len(frame)}")
        speech = bool(self._vad.is_speech(frame, LINE_RATE))  # type: ignore[attr-defined]
        self._index += 1
        if not self._frames:
            self._ring.append((frame, speech))
            if len(self._ring) > max(self.start_window, self.pre_frames):
                self._ring.pop(0)
            recent = self._ring[-self.start_window:]
            if sum(s for _, s in recent) >= self.start_frames:
                self._frames = [f for f, _ in self._ring[-self.pre_frames:]]
                self._speech = sum(s for _, s in recent)
                self._silent = 0
                self._last_speech = self._index
                self._ring.clear()
            return None
        self._frames.append(frame)
        if speech:
            self._speech += 1
            self._silent = 0
            self._last_speech = self._index
        else:
            self._silent += 1
        if self._silent >= self.end_frames:
            return self._finish(cut=False)
        if len(self._frames) >= self.max_frames:
            return self._finish(cut=True)
        return None

    def flush(self) -> Utterance | None:
        """The stream ended: what is left, if it holds enough speech."""
        return self._finish(cut=False) if self._frames else None

    def _finish(self, *, cut: bool) -> Utterance | None:
        frames, speech, silent = self._frames, self._speech, self._silent
        self._frames, self._speech, self._silent = [], 0, 0
        if speech < self.min_speech_frames:
            return None
        keep = len(frames) - max(0, silent - 5)  # keep 100 ms of the hangover
        pcm = np.frombuffer(b"".join(frames[:keep] if keep > 0 else frames), dtype="<i2").astype(np.int16)
        return Utterance(pcm=pcm, ended_frame=self._last_speech, cut=cut)
