"""The workers' batch loop (`orchestrator.kafka.consumer.BatchConsumer`) on the real broker,
partitions owned through PostgreSQL leases as in the workers: a handler that raises gets its batch
again from its first offset and the loop goes on, nothing is skipped or committed ahead of its
handler, and a stop lets the batch in hand finish and commits it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator.kafka.consumer import BatchConsumer, Consumed
from orchestrator.kafka.threads import kafka_thread_ids
from orchestrator.settings import Settings
from tests.threads import lowered_since, scheduling, unchanged

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def new_topic(settings: Settings, partitions: int) -> str:
    assert settings.kafka_bootstrap
    topic = settings.topic(f"loop-{uuid.uuid4().hex[:6]}")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(10)
    return topic


def publish(settings: Settings, topic: str, count: int, partitions: int) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
    for i in range(count):
        producer.produce(topic, f"r-{i}".encode(), partition=i % partitions)
    assert producer.flush(10) == 0


def committed(settings: Settings, group: str, topic: str, partitions: int) -> list[int]:
    observer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        return [tp.offset for tp in observer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10)]
    finally:
        observer.close()


async def test_a_failed_batch_comes_again_from_its_first_offset_and_nothing_is_skipped(
        stack_settings: Settings) -> None:
    """Two batches fail once each. The loop survives, reads each again from its first offset,
    commits nothing past a record whose handler has not returned, and in the end every record
    was handled successfully exactly once (no rewind past the failed batch, none skipped)."""
    settings = stack_settings.model_copy(update={"consume_batch_max": 3})
    topic, group = new_topic(settings, 2), f"loop-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(publish, settings, topic, 40, 2)
    fail_once = {b"r-7", b"r-24"}
    handled: dict[int, list[int]] = {0: [], 1: []}  # partition -> offsets handled successfully
    failed: list[list[tuple[int, int]]] = []
    overreaching: list[tuple[int, int, int]] = []
    done = asyncio.Event()

    async def handler(batch: list[Consumed]) -> None:
        positions = await asyncio.to_thread(committed, settings, group, topic, 2)
        for m in batch:
            if positions[m.partition] > m.offset:
                overreaching.append((m.partition, m.offset, positions[m.partition]))
        if fail_once & {m.value for m in batch}:
            fail_once.difference_update(m.value for m in batch)
            failed.append([(m.partition, m.offset) for m in batch])
            raise RuntimeError("the database is away (a test's stand-in)")
        for m in batch:
            handled[m.partition].append(m.offset)
        if sum(map(len, handled.values())) >= 40:
            done.set()

    consumer = BatchConsumer(settings, [topic], group, handler)
    consumer.retry_pause_s = 0.05
    await consumer.start()
    try:
        await asyncio.wait_for(done.wait(), 60)
        for _ in range(100):  # the last commit lands
            offsets = await asyncio.to_thread(committed, settings, group, topic, 2)
            if offsets == [20, 20]:
                break
            await asyncio.sleep(0.1)
        running = consumer.running
    finally:
        await consumer.stop()
    assert len(failed) == 2, f"both records failed once: {failed}"
    assert handled == {0: list(range(20)), 1: list(range(20))}, handled
    assert not overreaching, f"(partition, record in hand, committed): {overreaching[:5]}"
    assert offsets == [20, 20]
    assert running, "the loop ended after a handler raised"


async def test_a_stop_lets_the_batch_in_hand_finish_and_commits_it(
        stack_settings: Settings) -> None:
    """Stopped while its handler runs, the consumer waits for the handler, commits that batch
    and handles nothing after it; the next consumer of the group starts exactly there."""
    settings = stack_settings.model_copy(update={"consume_batch_max": 4})
    topic, group = new_topic(settings, 1), f"stop-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(publish, settings, topic, 12, 1)
    in_hand = asyncio.Event()
    release = asyncio.Event()
    first: list[int] = []

    async def slow(batch: list[Consumed]) -> None:
        if not first:
            first.extend(m.offset for m in batch)
            in_hand.set()
            await release.wait()
        else:
            first.append(-1)  # a batch after the first: must not happen once stopping

    consumer = BatchConsumer(settings, [topic], group, slow)
    await consumer.start()
    await asyncio.wait_for(in_hand.wait(), 30)
    stopping = asyncio.create_task(consumer.stop())
    await asyncio.sleep(0.3)
    assert not stopping.done(), "stop did not wait for the batch in hand"
    release.set()
    await asyncio.wait_for(stopping, 30)
    end = first[-1] + 1
    assert first == list(range(end)), first
    assert await asyncio.to_thread(committed, settings, group, topic, 1) == [end]

    rest: list[int] = []
    got_all = asyncio.Event()

    async def collect(batch: list[Consumed]) -> None:
        rest.extend(m.offset for m in batch)
        if len(rest) >= 12 - end:
            got_all.set()

    consumer = BatchConsumer(settings, [topic], group, collect)
    await consumer.start()
    try:
        await asyncio.wait_for(got_all.wait(), 30)
    finally:
        await consumer.stop()
    assert rest == list(range(end, 12))


async def test_the_consumers_kafka_threads_yield_and_no_others(stack_settings: Settings) -> None:
    """ADR 0020: the consumer lowers the librdkafka threads of its own client (the worker's
    Python threads and the process's other clients keep their priority)."""
    settings = stack_settings.model_copy(update={"kafka_thread_priority": "lower"})
    topic, group = new_topic(settings, 1), f"nice-{uuid.uuid4().hex[:6]}"
    other = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    await asyncio.to_thread(other.list_topics, timeout=10)  # its broker threads are up
    before = scheduling(kafka_thread_ids())

    async def ignore(batch: list[Consumed]) -> None:
        pass

    consumer = BatchConsumer(settings, [topic], group, ignore)
    await consumer.start()
    try:
        await lowered_since(before, "lower")
        assert unchanged(before)
    finally:
        await consumer.stop()
        other.flush(0)
