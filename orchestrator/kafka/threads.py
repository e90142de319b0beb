"""librdkafka's threads yield the CPU to the process's own threads (ADR 0020).

A consumer's librdkafka broker thread sends its next fetch the moment the last one is answered.
A broker that holds an empty fetch for `fetch.wait.max.ms` (Apache Kafka) makes that one request
per wait; one that answers at once (the embedded noida) makes it a spin: ~60,000 fetches a
second for one idle consumer, about 0.9 of a core between its thread and the broker. Under load
that spin takes its share of the CPU from the threads doing the work: the worker's event loop,
PostgreSQL, and the broker appending and serving records.

Lowered (10 nice values; or the SCHED_IDLE policy, which the embedded noida stack sets) the
librdkafka threads still get every moment nobody else wants, so an idle consumer's spin is
unchanged and a record is still fetched the moment it is there; but when the CPU is contended
the work runs first, and the spin (and the broker's share of serving it) shrinks instead of the
work. The price is paid by a record whose thread waits for a core: the tail of the latency at
low load (docs/performance.md). With a broker that does not spin, the threads mostly wait on
their sockets and their priority changes little.

Linux only: a thread's nice value and policy are set through its id, read from
`/proc/self/task`. Elsewhere this does nothing. Lowering one's own threads needs no privilege;
nothing here ever raises one back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

# librdkafka names its threads `rdk:main`, `rdk:broker<id>`, `rdk:broker-1` (a bootstrap server)...
_PREFIX = "rdk:"
_TASKS = Path("/proc/self/task")
# The highest nice value Linux has.
_LOWEST_PRIORITY = 19
# How far "lower" puts a thread below its creator, in nice values.
LOWER_BY = 10

KafkaThreadPriority = Literal["normal", "lower", "idle"]


def kafka_thread_ids() -> set[int]:
    """The ids of this process's librdkafka threads (empty where there is no /proc)."""
    if not _TASKS.is_dir():
        return set()
    found = set()
    for task in _TASKS.iterdir():
        try:
            if (task / "comm").read_text().startswith(_PREFIX):
                found.add(int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
    return found


def _lower_one(thread_id: int, priority: KafkaThreadPriority, nice: int) -> bool:
    """Lower one thread to `nice` (and SCHED_IDLE for "idle"); whether anything changed."""
    changed = False
    if os.getpriority(os.PRIO_PROCESS, thread_id) < nice:
        os.setpriority(os.PRIO_PROCESS, thread_id, nice)
        changed = True
    if priority == "idle" and os.sched_getscheduler(thread_id) != os.SCHED_IDLE:
        os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
        changed = True
    return changed


def lower_kafka_threads(priority: KafkaThreadPriority, exclude: Collection[int] = ()) -> int:
    """Lower this process's librdkafka threads, but those in `exclude`, to `priority`, unless
    they are there already: "lower" is `LOWER_BY` nice values above the calling thread's (at
    most 19); "idle" is that and the SCHED_IDLE policy (a thread that runs only when no other
    thread wants the CPU); "normal" changes nothing. Returns how many threads were changed.
    Call it again after new Kafka clients or brokers appeared: librdkafka starts a thread per
    broker it learns of, at its creator's priority."""
    if priority == "normal":
        return 0
    nice = min(_LOWEST_PRIORITY, os.getpriority(os.PRIO_PROCESS, 0) + LOWER_BY)
    changed = 0
    for thread_id in kafka_thread_ids().difference(exclude):
        try:
            changed += _lower_one(thread_id, priority, nice)
        except ProcessLookupError:
            continue  # the thread ended while we looked
        except PermissionError as error:  # not expected: lowering one's own is allowed
            log.debug("could not lower the priority of thread %s: %s", thread_id, error)
    return changed


class OwnKafkaThreads:
    """Lowers the librdkafka threads of the clients one owner creates, and no others.

    Call `client_starting` just before creating a client, and `tick` now and then (it is cheap
    when there is nothing to do): for `settle_s` after each creation, the threads that were not
    there before it are lowered, so the broker threads librdkafka starts as it learns of brokers
    are caught too. A thread another owner starts within that window is taken for ours: the
    price of telling threads apart only by when they appeared."""

    settle_s = 10.0
    check_every_s = 0.5

    def __init__(self, priority: KafkaThreadPriority) -> None:
        self.priority = priority
        self._others: set[int] = set()
        self._settle_by = 0.0
        self._next_check = float("inf")  # no client yet

    def client_starting(self) -> None:
        if self.priority == "normal":
            self._next_check = float("inf")  # never
            return
        self._others = kafka_thread_ids()
        self._settle_by = time.monotonic() + self.settle_s
        self._next_check = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        # The first tick after a creation lowers whenever it comes (a consumer may first wait
        # for its partitions' leases); later ones until the window closes.
        if self._next_check == 0.0 or self._next_check <= now < self._settle_by:
            self._next_check = now + self.check_every_s
            lower_kafka_threads(self.priority, self._others)


__all__ = ["LOWER_BY", "KafkaThreadPriority", "OwnKafkaThreads", "kafka_thread_ids",
           "lower_kafka_threads"]
