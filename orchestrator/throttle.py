"""Rate-limited logging of a failure that repeats: one line per key per interval.

A refusal that comes back on every pass (a record the broker will never take, an unknown
topic) must not flood the log with a line or a traceback per pass; the first occurrence is
logged at once, and later ones at most once per `every_s`, saying how many were left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

_MAX_KEYS = 10_000  # keys are forgotten past this (oldest first), so memory stays bounded


class LogThrottle:
    def __init__(self, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        # key -> (when its last line was logged, occurrences left out since)
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None: stay quiet (the occurrence is counted). Otherwise log now; the number is how
        many occurrences of `key` were left out since its last line."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)  # re-inserted: the dict's order is the logging order
        while len(self._seen) > _MAX_KEYS:
            del self._seen[next(iter(self._seen))]
        return last[1] if last is not None else 0
