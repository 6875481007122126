"""Audio as it arrives from Asterisk: RTP packets, G.711 mu-law at 8 kHz, and the 16 kHz float the model takes.

The benchmark corpus goes through these same functions, so what is measured is what runs on a call.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

LINE_RATE = 8_000
FRAME_MS = 20
FRAME_SAMPLES = LINE_RATE * FRAME_MS // 1000
RTP_HEADER = struct.Struct("!BBHII")
PT_ULAW = 0


def _ulaw_table() -> npt.NDArray[np.int16]:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


ULAW_TO_PCM = _ulaw_table()


def ulaw_decode(payload: bytes) -> npt.NDArray[np.int16]:
    """G.711 mu-law bytes -> 16-bit linear samples."""
    return ULAW_TO_PCM[np.frombuffer(payload, dtype=np.uint8)]


def ulaw_encode(pcm: npt.NDArray[np.int16]) -> bytes:
    """16-bit linear samples -> G.711 mu-law bytes (tests and the corpus generator)."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    codes: npt.NDArray[np.uint8] = (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)
    return codes.tobytes()


@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes


def parse_rtp(data: bytes) -> RtpPacket | None:
    """One RTP packet (RFC 3550; CSRCs and a header extension skipped); None when it is not one."""
    if len(data) < RTP_HEADER.size:
        return None
    first, second, seq, stamp, ssrc = RTP_HEADER.unpack_from(data)
    if first >> 6 != 2:
        return None
    offset = RTP_HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:  # header extension
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
    end = len(data)
    if first & 0x20 and end > offset:  # padding
        end -= data[-1]
    if end < offset:
        return None
    return RtpPacket(second & 0x7F, seq, stamp, ssrc, data[offset:end])


def _halfband(taps: int = 63) -> npt.NDArray[np.float32]:
    n = np.arange(taps) - (taps - 1) / 2
    kernel = np.sinc(n / 2) * np.hamming(taps)
    result: npt.NDArray[np.float32] = (kernel / kernel.sum() * 2).astype(np.float32)
    return result


_HALFBAND = _halfband()


def to_model_rate(pcm8k: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
    """8 kHz 16-bit samples -> 16 kHz float in [-1, 1] (zero-stuffing and a windowed-sinc half-band filter)."""
    up = np.zeros(len(pcm8k) * 2, dtype=np.float32)
    up[::2] = pcm8k.astype(np.float32) / 32768.0
    out: npt.NDArray[np.float32] = np.convolve(up, _HALFBAND, mode="same").astype(np.float32)
    return out
