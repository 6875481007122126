"""One backoff helper for every reconnect and retry (ARI, AMI, Redis, PostgreSQL, SNS)."""

from __future__ import annotations

import logging
import random


class Backoff:
    """Exponential backoff with jitter: `delay()` grows from `initial` to `maximum`; `reset()` on success."""

    def __init__(
        self, what: str, *, initial: float = 0.1, maximum: float = 5.0, factor: float = 2.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.what = what
        self._initial = initial
        self._max = maximum
        self._factor = factor
        self._next = initial
        self.attempt = 0
        self._log = logger or logging.getLogger("agent.backoff")

    def delay(self, error: object = None) -> float:
        """The delay before the next attempt (logged with the attempt number and the error)."""
        self.attempt += 1
        delay = min(self._max, self._next) * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not crypto
        self._next = min(self._max, self._next * self._factor)
        self._log.warning(
            "%s: attempt %d failed, retrying in %.2fs", self.what, self.attempt, delay,
            extra={"attempt": self.attempt, "delay_s": round(delay, 3), "error": str(error) if error else None},
        )
        return delay

    def reset(self) -> None:
        if self.attempt:
            self._log.info("%s: recovered after %d attempts", self.what, self.attempt)
        self._next = self._initial
        self.attempt = 0
