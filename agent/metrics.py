"""Prometheus metrics (prometheus_client), served on the agent's /metrics. The README suggests alerts.

Every label value comes from a fixed set (`Bounded`): a value outside it is counted as `other`, so no input
(a far end's reply text, a producer's field) can create series. Add a value to its set before using it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from agent.constants import Origin, Outcome

_FAST = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
OTHER = "other"
ORIGINS = frozenset(o.value for o in Origin)
OUTCOMES = frozenset({*(o.value for o in Outcome), "unknown"})
HANGUP_RESULTS = frozenset({"ok", "gone", "not-found", "timeout", "error", "unknown"})
"""How a hangup request ended (`hangup_result`): the label of optout_hangups_total."""
UPSTREAMS = frozenset({"ari", "ami", "agi", "redis", "store", "sns", "sqs"})
LOOPS = frozenset({"store", "replayer", "publisher", "sqs", "bridge", "lambda", "keeper"})
"""Where a record's failure was isolated (optout_isolated_failures_total)."""
M = TypeVar("M", Counter, Gauge, Histogram)


class Bounded(Generic[M]):
    """A labelled metric whose label values come from fixed sets (one per label); anything else is `other`."""

    def __init__(self, metric: M, *allowed: Collection[str]) -> None:
        self.metric: M = metric
        self._allowed = allowed

    def labels(self, *values: object) -> M:
        if len(values) != len(self._allowed):
            raise ValueError(f"{len(values)} label values for {len(self._allowed)} labels")
        shown = [v if isinstance(v, str) and v in ok else OTHER for v, ok in zip(values, self._allowed, strict=True)]
        child: M = self.metric.labels(*shown)
        return child


def hangup_label(result: str | None) -> str:
    """The fixed label of a hangup result: `ok`, `gone`, `not-found`, `timeout`, `error` (any text starting
    so, or an HTTP status), else `unknown`."""
    if not result:
        return "unknown"
    if result in HANGUP_RESULTS:
        return result
    return "error" if result.startswith(("error", "http")) else "unknown"


OPTOUTS = Bounded(Counter("optout_optouts_total", "Opt-outs stored, by origin and outcome", ["origin", "outcome"]),
                  ORIGINS, OUTCOMES)
DUPLICATES = Bounded(Counter("optout_duplicates_total", "Opt-outs recognised as already stored", ["origin"]), ORIGINS)
BLACKLIST_ADDITIONS = Counter("optout_blacklist_additions_total", "Numbers newly added to the blacklist")
REJECTED = Bounded(Counter("optout_rejected_total", "Opt-out inputs rejected as invalid", ["origin"]), ORIGINS)
FIELDS_DROPPED = Bounded(Counter("optout_fields_dropped_total", "Invalid optional fields left out of an opt-out",
                                 ["origin"]), ORIGINS)
NUMBER_UNKNOWN = Bounded(Counter(
    "optout_number_unknown_total", "Presses on calls whose number could not be proven (hung up, audited, not listed)",
    ["origin"]), ORIGINS)
MISSING_OPTOUT_NUMBER = Bounded(Counter(
    "optout_calls_without_optout_number_total", "Calls that reached the agent without the OPTOUT_NUMBER channel "
    "variable", ["origin"]), ORIGINS)
EVENT_ID_CONFLICTS = Counter("optout_event_id_conflicts_total",
                             "Producer eventIds reused for another number (each stored as its own opt-out)")
JOURNAL_DEPTH = Gauge("optout_journal_depth", "Opt-outs journaled but not yet in the store")
JOURNAL_PARKED = Gauge("optout_journal_parked", "Opt-outs the store keeps refusing (kept in the journal)")
JOURNAL_UP = Gauge("optout_journal_up", "1 while the journal can be written")
HELD = Gauge("optout_held_in_memory", "Opt-outs neither the journal nor the store took: held in memory, retried")
JOURNAL_ERRORS = Counter("optout_journal_errors_total", "Journal write failures")
STORE_UP = Gauge("optout_store_up", "1 while the store answers")
STORE_ERRORS = Counter("optout_store_errors_total", "Store (PostgreSQL/SQLite) failures")
CACHE_ERRORS = Counter("optout_cache_errors_total", "Redis failures")
CACHE_CURRENT = Gauge("optout_cache_current", "1 while Redis is proven to hold every change of the store")
CACHE_BEHIND = Gauge("optout_cache_behind", "Store changes Redis did not hold at the last check")
HANGUPS = Bounded(Counter("optout_hangups_total", "Hangups requested, by origin and result", ["origin", "result"]),
                  ORIGINS, HANGUP_RESULTS)
PIPELINE_LATENCY = Histogram(
    "optout_pipeline_seconds",
    "From receiving an opt-out to its store commit",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PRESS_TO_HANGUP = Bounded(Histogram(
    "optout_press_to_hangup_seconds",
    "From the digit press (Asterisk's timestamp) to the hangup request answered",
    ["origin"],
    buckets=_FAST,
), ORIGINS)
PRESS_TO_VISIBLE = Histogram(
    "optout_press_to_visible_seconds",
    "From the press (or receipt) to the number confirmed in Redis, where the dialers see it",
    buckets=(*_FAST, 2.5, 5, 10, 30, 60, 300),
)
PREVENTED = Bounded(Counter("optout_prevented_calls_total", "Calls to blacklisted numbers stopped before dialling",
                            ["via"]), ORIGINS)
CONNECTED = Bounded(Gauge("optout_connected", "1 when the named upstream is connected", ["upstream"]), UPSTREAMS)
PUBLISHED = Counter("optout_published_total", "Opt-outs published to SNS")
PUBLISH_ERRORS = Counter("optout_publish_errors_total", "SNS publish failures")
PUBLISH_REFUSED = Counter("optout_publish_refused_total", "Opt-outs SNS refused for good (left out of the outbox)")
ISOLATED = Bounded(Counter(
    "optout_isolated_failures_total", "Failures of one record (or one pass) contained so that the loop goes on, by "
    "where", ["loop"]), LOOPS)
SPEECH_STREAMS = Gauge("optout_speech_streams", "Callee audio streams open (spoken opt-out)")
SPEECH_AUDIO_SECONDS = Counter("optout_speech_audio_seconds_total", "Seconds of utterance audio recognised")
SPEECH_SHED_SECONDS = Counter("optout_speech_shed_seconds_total",
                              "Seconds of utterance audio dropped because the recogniser pool was full")
SPEECH_MODES = ("act", "flag")
SPEECH_DETECTIONS = Bounded(Counter("optout_speech_detections_total", "Utterances taken as opt-outs, by mode",
                                    ["mode"]), SPEECH_MODES)
SPEECH_DECISION = Bounded(Histogram(
    "optout_speech_decision_seconds", "From the end of speech to the hangup answered (act) or the candidate recorded "
    "(flag)", ["mode"], buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)), SPEECH_MODES)
SPEECH_CPU_SECONDS = Counter("optout_speech_recogniser_cpu_seconds_total", "CPU seconds the recogniser spent")
SPEECH_SETUP_ERRORS = Counter("optout_speech_setup_errors_total",
                              "Calls whose audio could not be tapped (snoop, external media or bridge refused)")
LOOP_LAG = Histogram("optout_event_loop_lag_seconds", "How late the agent's event loop ran a 100 ms timer",
                     buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
