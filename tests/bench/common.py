"""Shared helpers for the benchmark scripts (they print figures; they assert nothing about time)."""

from __future__ import annotations

import os
import platform
import statistics


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()} {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(name: str, values: list[float], unit: str = "ms") -> str:
    if not values:
        return f"{name}: no samples"
    return (f"{name}: n={len(values)} p50={statistics.median(values):.2f}{unit} p95={pct(values, 95):.2f}{unit} "
            f"p99={pct(values, 99):.2f}{unit} max={max(values):.2f}{unit}")
