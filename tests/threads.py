"""What the tests read of librdkafka's threads (ADR 0020)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable

from orchestrator.kafka.threads import kafka_thread_ids


def nices(threads: Iterable[int]) -> dict[int, int]:
    """The nice value of each of `threads` still running (librdkafka ends some on its own)."""
    found = {}
    for thread in threads:
        with contextlib.suppress(ProcessLookupError):
            found[thread] = os.getpriority(os.PRIO_PROCESS, thread)
    return found


async def lowered_since(before: dict[int, int], niceness: int, timeout_s: float = 10.0,
                        tick: Callable[[], object] = lambda: None) -> dict[int, int]:
    """Wait until the librdkafka threads started since `before` (a `nices` snapshot) are all
    `niceness` above this thread's nice value, calling `tick` between looks; returns them.
    Fails after `timeout_s`."""
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    deadline = time.monotonic() + timeout_s
    while True:
        new = nices(kafka_thread_ids() - set(before))
        if new and set(new.values()) == {want}:
            return new
        assert time.monotonic() < deadline, f"threads {new} not all at nice {want}"
        await asyncio.sleep(0.05)
        tick()


def unchanged(before: dict[int, int]) -> bool:
    """Whether the threads of `before` still running have the nice values they had."""
    still = nices(before)
    return still == {thread: nice for thread, nice in before.items() if thread in still}
