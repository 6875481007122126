"""A real headless Chromium (Debian's package, installed by tests/chromium.sh) to look at the compliance report:
screenshot a page, dump its DOM after rendering, and decode the PNG (pure Python: zlib and the PNG filters)
to count what was drawn.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_SH = Path(__file__).with_name("chromium.sh")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--hide-scrollbars", "--mute-audio",
)  # fmt: skip


class NoChromium(RuntimeError):
    """tests/chromium.sh could not provide a Chromium."""


def chromium() -> str:
    """The browser's path, installing it with tests/chromium.sh where it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    done = subprocess.run(["bash", str(CHROMIUM_SH)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise NoChromium(f"tests/chromium.sh failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


def _run(page: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
            capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return done


def screenshot(page: Path, png: Path, *, width: int = 1200, height: int = 3000, scale: float = 1.0) -> Path:
    """A PNG of `page` as Chromium draws it in a `width` x `height` window."""
    png.unlink(missing_ok=True)
    _run(page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}",
         f"--force-device-scale-factor={scale}")
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def dump_dom(page: Path) -> str:
    """The page's DOM after Chromium loaded and laid it out, serialised."""
    return _run(page, "--dump-dom").stdout.decode("utf-8")


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]
    """Unfiltered pixel rows (8 bits per channel)."""

    def pixel(self, x: int, y: int) -> tuple[int, ...]:
        c = self.channels
        return tuple(self.rows[y][x * c:(x + 1) * c])

    def ink(self, x0: int = 0, y0: int = 0, x1: int | None = None, y1: int | None = None) -> int:
        """Pixels in the box that are not near-white."""
        x1 = self.width if x1 is None else x1
        y1 = self.height if y1 is None else y1
        c = self.channels
        count = 0
        for y in range(y0, y1):
            row = self.rows[y]
            for x in range(x0, x1):
                if min(row[x * c:x * c + 3]) < 235:
                    count += 1
        return count

    def colour_pixels(self, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
        """Pixels within `tolerance` of `rgb` (e.g. a chart's bar colour)."""
        c = self.channels
        r0, g0, b0 = rgb
        count = 0
        for row in self.rows:
            for i in range(0, self.width * c, c):
                if abs(row[i] - r0) <= tolerance and abs(row[i + 1] - g0) <= tolerance \
                        and abs(row[i + 2] - b0) <= tolerance:
                    count += 1
        return count


def decode_png(data: bytes) -> Image:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes), decoded with zlib and the five filters."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, []
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    bpp = channels
    prev = bytearray(stride)
    rows: list[bytes] = []
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        row = bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 0xFF
        elif kind == 2:
            row = bytearray(_add_bytes(row, prev))
        elif kind == 3:
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        elif kind != 0:
            raise ValueError(f"bad PNG filter {kind} on row {y}")
        rows.append(bytes(row))
        prev = row
    return Image(width, height, channels, rows)


def _add_bytes(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """Bytewise (a + b) mod 256, on whole rows at once (SWAR on Python integers: no carries between bytes)."""
    n = len(a)
    x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
    low = int.from_bytes(b"\x7f" * n, "big")
    high = int.from_bytes(b"\x80" * n, "big")
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(n, "big")
