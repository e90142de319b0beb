"""librdkafka's threads are lowered below the process's own (orchestrator.kafka.threads, ADR
0020): only the threads of the clients an owner created, never a Python thread, never back up,
and not at all at "normal"."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from orchestrator.kafka.threads import OwnKafkaThreads, kafka_thread_ids, lower_kafka_threads
from tests.threads import lowered_since, lowered_to, scheduling, unchanged

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread ids come from /proc")


def client() -> Producer:
    # A client's threads start at once, broker or not (its bootstrap thread keeps retrying).
    return Producer({"bootstrap.servers": "127.0.0.1:9", "log_level": 0})


@pytest.fixture
def application() -> Iterator[Producer]:
    """Another owner's client in the same process."""
    producer = client()
    yield producer
    producer.flush(0)


async def test_lower_lowers_the_threads_started_since_and_no_others(
        application: Producer) -> None:
    before = scheduling(kafka_thread_ids())
    own = scheduling([0])[0]
    producer = client()
    try:
        assert kafka_thread_ids() - set(before), "a librdkafka client starts threads rdk:*"
        assert lower_kafka_threads("normal", exclude=before) == 0
        assert set(scheduling(kafka_thread_ids() - set(before)).values()) == {own}

        assert lower_kafka_threads("lower", exclude=before) >= 1
        # (librdkafka may start another thread meanwhile: lowered on the next call)
        mine = await lowered_since(before, "lower", tick=lambda: lower_kafka_threads(
            "lower", before))
        assert unchanged(before)
        assert scheduling([0])[0] == own  # the calling (Python) thread is not one of them

        # There already: nothing to change; and "normal" never raises one back.
        lower_kafka_threads("lower", exclude=before)  # any thread started meanwhile
        assert lower_kafka_threads("lower", exclude=before) == 0
        assert lower_kafka_threads("normal", exclude=before) == 0
        assert set(scheduling(mine).values()) == {lowered_to("lower")}
    finally:
        producer.flush(0)


async def test_idle_also_gives_them_the_idle_policy(application: Producer) -> None:
    before = scheduling(kafka_thread_ids())
    producer = client()
    try:
        mine = await lowered_since(before, "idle", tick=lambda: lower_kafka_threads(
            "idle", before))
        assert {policy for _nice, policy in mine.values()} == {os.SCHED_IDLE}
        assert unchanged(before)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        producer.flush(0)


async def test_an_owner_lowers_its_clients_threads_on_its_ticks(application: Producer) -> None:
    threads = OwnKafkaThreads("lower")
    threads.tick()  # no client yet: nothing
    before = scheduling(kafka_thread_ids())
    threads.client_starting()
    producer = client()
    try:
        threads.tick()
        await lowered_since(before, "lower", tick=threads.tick)
        assert unchanged(before)
    finally:
        producer.flush(0)


async def test_an_owner_at_normal_lowers_nothing(application: Producer) -> None:
    threads = OwnKafkaThreads("normal")
    before = scheduling(kafka_thread_ids())
    threads.client_starting()
    producer = client()
    try:
        threads.tick()
        assert set(scheduling(kafka_thread_ids() - set(before)).values()) == {
            lowered_to("normal")}
    finally:
        producer.flush(0)
