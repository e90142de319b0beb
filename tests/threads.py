"""What the tests read of librdkafka's threads (ADR 0020)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable

from orchestrator.kafka.threads import LOWER_BY, KafkaThreadPriority, kafka_thread_ids

# A thread's scheduling: (nice value, policy).
Scheduling = tuple[int, int]


def scheduling(threads: Iterable[int]) -> dict[int, Scheduling]:
    """The nice value and policy of each of `threads` still running (librdkafka ends some on
    its own)."""
    found = {}
    for thread in threads:
        with contextlib.suppress(ProcessLookupError):
            found[thread] = (os.getpriority(os.PRIO_PROCESS, thread),
                             os.sched_getscheduler(thread))
    return found


def lowered_to(priority: KafkaThreadPriority) -> Scheduling:
    """Where `priority` puts a thread created by this (unlowered) thread."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if priority == "normal":
        return own, os.SCHED_OTHER
    return (min(19, own + LOWER_BY),
            os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER)


async def lowered_since(before: dict[int, Scheduling], priority: KafkaThreadPriority,
                        timeout_s: float = 10.0, tick: Callable[[], object] = lambda: None,
                        all_of_them: bool = True) -> dict[int, Scheduling]:
    """Wait until the librdkafka threads started since `before` (a `scheduling` snapshot) are
    all at `priority` (or, not `all_of_them`, some are and the others are not lowered at all),
    calling `tick` between looks; returns those at `priority`. Fails after `timeout_s`."""
    want = lowered_to(priority)
    deadline = time.monotonic() + timeout_s
    while True:
        new = scheduling(kafka_thread_ids() - set(before))
        at = {thread: it for thread, it in new.items() if it == want}
        if at and (set(new.values()) == {want} if all_of_them
                   else set(new.values()) == {want, lowered_to("normal")}):
            return at
        assert time.monotonic() < deadline, f"threads {new} not all at {want}"
        await asyncio.sleep(0.05)
        tick()


def unchanged(before: dict[int, Scheduling]) -> bool:
    """Whether the threads of `before` still running are scheduled as they were."""
    still = scheduling(before)
    return still == {thread: it for thread, it in before.items() if thread in still}
