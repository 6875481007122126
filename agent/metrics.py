"""Prometheus metrics (prometheus_client), served on the agent's /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OPTOUTS = Counter("optout_optouts_total", "Opt-outs processed, by origin and outcome", ["origin", "outcome"])
DUPLICATES = Counter("optout_duplicates_total", "Opt-outs recognised as already recorded", ["origin"])
BLACKLIST_ADDITIONS = Counter("optout_blacklist_additions_total", "Numbers newly added to the blacklist")
REJECTED = Counter("optout_rejected_total", "Opt-out inputs rejected as invalid", ["origin"])
JOURNAL_DEPTH = Gauge("optout_journal_depth", "Opt-outs journaled but not yet in the store")
STORE_ERRORS = Counter("optout_store_errors_total", "Store (PostgreSQL/SQLite) failures")
CACHE_ERRORS = Counter("optout_cache_errors_total", "Redis failures")
HANGUPS = Counter("optout_hangups_total", "Hangups requested, by origin and result", ["origin", "result"])
PIPELINE_LATENCY = Histogram(
    "optout_pipeline_seconds",
    "From receiving an opt-out to its store commit",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PRESS_TO_HANGUP = Histogram(
    "optout_press_to_hangup_seconds",
    "From the digit press (Asterisk's timestamp) to the hangup request answered",
    ["origin"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
CONNECTED = Gauge("optout_connected", "1 when the named upstream is connected", ["upstream"])
PUBLISHED = Counter("optout_published_total", "Opt-outs published to SNS")
PUBLISH_ERRORS = Counter("optout_publish_errors_total", "SNS publish failures")
