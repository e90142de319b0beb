"""librdkafka's threads are lowered below the process's own (orchestrator.kafka.threads, ADR
0020): only the threads of the clients an owner created, never a Python thread, never back up,
and not at all with niceness 0."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from orchestrator.kafka.threads import OwnKafkaThreads, kafka_thread_ids, lower_kafka_threads
from tests.threads import lowered_since, nices, unchanged

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


async def test_only_the_threads_started_since_are_lowered(application: Producer) -> None:
    before = nices(kafka_thread_ids())
    own = os.getpriority(os.PRIO_PROCESS, 0)
    producer = client()
    try:
        assert kafka_thread_ids() - set(before), "a librdkafka client starts threads rdk:*"
        assert lower_kafka_threads(0, exclude=before) == 0
        assert set(nices(kafka_thread_ids() - set(before)).values()) == {own}

        assert lower_kafka_threads(3, exclude=before) >= 1
        # (librdkafka may start another thread meanwhile: lowered on the next call)
        mine = await lowered_since(before, 3, tick=lambda: lower_kafka_threads(3, before))
        assert unchanged(before)
        assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the calling thread is not one

        # There already: nothing to change; and a smaller niceness never raises one back.
        lower_kafka_threads(3, exclude=before)  # any thread started meanwhile
        assert lower_kafka_threads(3, exclude=before) == 0
        assert lower_kafka_threads(1, exclude=before) == 0
        assert set(nices(mine).values()) == {min(19, own + 3)}
    finally:
        producer.flush(0)


async def test_an_owner_lowers_its_clients_threads_on_its_ticks(application: Producer) -> None:
    threads = OwnKafkaThreads(niceness=4)
    threads.tick()  # no client yet: nothing
    before = nices(kafka_thread_ids())
    threads.client_starting()
    producer = client()
    try:
        threads.tick()
        await lowered_since(before, 4, tick=threads.tick)
        assert unchanged(before)
    finally:
        producer.flush(0)


async def test_an_owner_with_niceness_zero_lowers_nothing(application: Producer) -> None:
    threads = OwnKafkaThreads(niceness=0)
    before = nices(kafka_thread_ids())
    threads.client_starting()
    producer = client()
    try:
        threads.tick()
        assert set(nices(kafka_thread_ids() - set(before)).values()) == {
            os.getpriority(os.PRIO_PROCESS, 0)}
    finally:
        producer.flush(0)
