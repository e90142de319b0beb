"""A consumer never skips a record it has not processed, whatever the broker does to its logs
(issue 9, ADR 0007): after a broker crash that lost its logs (all of them on tansu, the last
seconds on noida), after a topic deleted and created again under it, and it never takes an
idle, freshly assigned partition for a starved one.

Each test runs a real consumer (`BatchConsumer`, partitions owned through PostgreSQL leases as
in the workers) against a broker of its own, which it kills or changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator.dev.embedded import EmbeddedBroker
from orchestrator.kafka.consumer import (
    ORCHESTRATOR_GROUP,
    BatchConsumer,
    Consumed,
    ensure_topics,
    trim_committed,
)
from orchestrator.settings import Settings
from schemas import TOPIC_DEAD_LETTERS, TOPIC_TRANSFER_COMMANDS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BROKERS = ["noida", "tansu"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedBroker]:
    started = EmbeddedBroker(tmp_path, request.param)
    started.start()
    yield started
    started.stop()


def create_topic(bootstrap: str, topic: str, partitions: int = 2) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 20
    while True:
        try:
            for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
                future.result(10)
            return
        except Exception as error:
            if "already exists" in str(error).lower():
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def publish(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for i, value in enumerate(values):
        producer.produce(topic, value, partition=i % 2)
    assert producer.flush(20) == 0, "the broker did not acknowledge every record"


def committed(bootstrap: str, group: str, topic: str) -> list[int]:
    observer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        return [tp.offset for tp in observer.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)]
    finally:
        observer.close()


class Collector:
    """What a running consumer handed to its handler."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self.arrived = asyncio.Event()

    async def handle(self, batch: list[Consumed]) -> None:
        self.values.extend(m.value for m in batch)
        self.arrived.set()

    async def wait_for(self, wanted: set[bytes], timeout_s: float) -> set[bytes]:
        deadline = time.monotonic() + timeout_s
        while not wanted <= set(self.values) and time.monotonic() < deadline:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.5)
        return wanted - set(self.values)


async def start_consumer(settings: Settings, topic: str, group: str, collector: Collector
                         ) -> BatchConsumer:
    kafka = BatchConsumer(settings, [topic], group, collector.handle)
    await kafka.start()
    return kafka


def settings_for_broker(broker: EmbeddedBroker, database_url: str) -> Settings:
    tuned = {"kafka_fetch_wait_ms": 1, "kafka_trust_watermarks": False} if (
        broker.kind == "tansu") else {}
    return Settings(kafka_bootstrap=broker.bootstrap, database_url=database_url,
                    topic_prefix=f"rw-{uuid.uuid4().hex[:6]}.", **tuned)


async def test_after_a_broker_crash_every_record_of_the_new_log_is_read(
        broker: EmbeddedBroker, stack_settings: Settings,
        caplog: pytest.LogCaptureFixture) -> None:
    """The broker is SIGKILLed right after a consumer committed 40 records and comes back 2 s
    later, with a log shorter than the consumer's position when it lost records (tansu keeps
    nothing; noida keeps only its last snapshot). With no later publish, the consumer must
    move back by itself; records published after the restart land at offsets it had passed,
    and every one of them must still be read."""
    assert stack_settings.database_url
    settings = settings_for_broker(broker, stack_settings.database_url)
    topic, group = settings.topic("rewind"), f"rw-{uuid.uuid4().hex[:6]}"
    create_topic(broker.bootstrap, topic)
    collector = Collector()
    kafka = await start_consumer(settings, topic, group, collector)
    caplog.set_level(logging.WARNING, logger="orchestrator.kafka.consumer")
    try:
        before = [f"before-{i}".encode() for i in range(40)]
        await asyncio.to_thread(publish, broker.bootstrap, topic, before)
        assert not await collector.wait_for(set(before), 30)
        await asyncio.sleep(0.5)  # the last commit lands
        # On this thread, which outlives the broker (see EmbeddedBroker.restart); the
        # consumer polls on threads of its own meanwhile.
        broker.restart(down_s=2, kill=True)
        # What the recovery worker does after a restart: the topic as it was made.
        await asyncio.to_thread(create_topic, broker.bootstrap, topic)
        kept = await asyncio.to_thread(records_on, broker.bootstrap, topic)
        for _ in range(150):  # no publish yet: the consumer must notice by itself
            if kafka.rewinds or kept == len(before):
                break
            await asyncio.sleep(0.2)
        rewinds_before_publishing = kafka.rewinds
        after = [f"after-{i}".encode() for i in range(20)]
        await asyncio.to_thread(publish, broker.bootstrap, topic, after)
        missing = await collector.wait_for(set(after), 60)
    finally:
        await kafka.stop()
    assert not missing, f"{len(missing)} records published after the restart were never read"
    if kept < len(before):  # the broker lost records: the consumer had to move back
        assert rewinds_before_publishing >= 1, (
            f"the broker kept {kept} of {len(before)} records and the consumer never moved back")
        assert any("reads" in r.getMessage() and "again" in r.getMessage()
                   for r in caplog.records), "a rewind is logged"


def records_on(bootstrap: str, topic: str) -> int:
    """How many records the broker holds on `topic` (0 if it has no such topic), read to the
    end rather than taken from watermarks, which tansu reports wrong."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"n-{uuid.uuid4().hex}",
                       "enable.auto.commit": False, "enable.partition.eof": True,
                       "auto.offset.reset": "earliest"})
    try:
        reader.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        count, ended, deadline = 0, set(), time.monotonic() + 10
        while len(ended) < 2 and time.monotonic() < deadline:
            message = reader.poll(0.2)
            if message is None:
                continue
            if message.error() is not None:
                ended.add(message.partition())
            else:
                count += 1
        return count
    finally:
        reader.close()


async def test_a_topic_created_again_under_a_running_consumer_is_read_from_its_start(
        stack_settings: Settings, tmp_path: Path) -> None:
    """No broker restart: the topic is deleted and created again while the consumer runs, and
    the new log holds fewer records than the consumer had read. Its positions are restored:
    it reads the new records and commits offsets of the new log, not of the old."""
    assert stack_settings.database_url
    broker = EmbeddedBroker(tmp_path, "noida")  # tansu 0.6 cannot delete topics
    broker.start()
    try:
        settings = settings_for_broker(broker, stack_settings.database_url)
        topic, group = settings.topic("recreated"), f"rc-{uuid.uuid4().hex[:6]}"
        create_topic(broker.bootstrap, topic)
        collector = Collector()
        kafka = await start_consumer(settings, topic, group, collector)
        try:
            old = [f"old-{i}".encode() for i in range(60)]
            await asyncio.to_thread(publish, broker.bootstrap, topic, old)
            assert not await collector.wait_for(set(old), 30)
            await asyncio.sleep(0.5)
            assert await asyncio.to_thread(committed, broker.bootstrap, group, topic) == [30, 30]
            admin = AdminClient({"bootstrap.servers": broker.bootstrap})
            for future in admin.delete_topics([topic], operation_timeout=10).values():
                future.result(10)
            await asyncio.to_thread(create_topic, broker.bootstrap, topic)
            new = [f"new-{i}".encode() for i in range(10)]
            await asyncio.to_thread(publish, broker.bootstrap, topic, new)
            missing = await collector.wait_for(set(new), 30)
            await asyncio.sleep(0.5)
            offsets = await asyncio.to_thread(committed, broker.bootstrap, group, topic)
        finally:
            await kafka.stop()
    finally:
        broker.stop()
    assert not missing, f"records of the re-created topic never read: {sorted(missing)}"
    assert offsets == [5, 5], f"committed offsets not restored to the new log: {offsets}"


async def test_idle_freshly_assigned_consumers_keep_their_fetch_wait(
        stack_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A consumer that has fetched nothing since its partitions were assigned, on a log whose
    records its group already committed, is idle, not starved: after a dozen of the
    watchdog's quiet periods its fetch wait is still the configured one (the watchdog once
    compared such a consumer with the start of the log, and widened every idle consumer's wait
    up to 256 ms)."""
    assert stack_settings.database_url
    broker = EmbeddedBroker(tmp_path, "tansu")  # the broker the watchdog is for
    broker.start()
    try:
        settings = settings_for_broker(broker, stack_settings.database_url)
        topic, group = settings.topic("idle"), f"idle-{uuid.uuid4().hex[:6]}"
        create_topic(broker.bootstrap, topic)
        records = [f"r-{i}".encode() for i in range(20)]
        await asyncio.to_thread(publish, broker.bootstrap, topic, records)
        first = Collector()
        kafka = await start_consumer(settings, topic, group, first)
        try:
            assert not await first.wait_for(set(records), 30)
            await asyncio.sleep(0.5)
        finally:
            await kafka.stop()
        # A fresh consumer of the same group: everything is committed, nothing comes.
        idle = Collector()
        caplog.set_level(logging.WARNING, logger="orchestrator.kafka.consumer")
        kafka = await start_consumer(settings, topic, group, idle)
        # The watchdog looks after each quiet period (3 s in production); a shorter one makes
        # the same dozen looks in seconds instead of a minute.
        kafka.stall_after_s = 0.5
        try:
            await asyncio.sleep(6)
            wait_ms = int(kafka.config["fetch.wait.max.ms"])
        finally:
            await kafka.stop()
    finally:
        broker.stop()
    assert idle.values == [], "the committed records were read again"
    assert wait_ms == 1, f"an idle consumer's fetch wait was widened to {wait_ms} ms"
    assert not [r for r in caplog.records if "rebuilding the consumer" in r.getMessage()]


async def test_trimming_deletes_only_what_every_consuming_group_committed(
        tmp_path: Path) -> None:
    """The embedded noida's logs stay bounded: records every consuming group committed are
    deleted, records not yet committed stay, and the dead-letter topic keeps its newest."""
    broker = EmbeddedBroker(tmp_path, "noida")
    broker.start()
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap, topic_partitions=2,
                            topic_prefix=f"tr-{uuid.uuid4().hex[:6]}.")
        await asyncio.to_thread(ensure_topics, settings)
        commands = settings.topic(TOPIC_TRANSFER_COMMANDS)
        dead_letters = settings.topic(TOPIC_DEAD_LETTERS)
        await asyncio.to_thread(publish, broker.bootstrap, commands,
                                [f"c-{i}".encode() for i in range(40)])
        await asyncio.to_thread(publish, broker.bootstrap, dead_letters,
                                [f"d-{i}".encode() for i in range(40)])
        # The orchestrator's group committed 12 of partition 0's 20, nothing of partition 1.
        member = Consumer({"bootstrap.servers": broker.bootstrap,
                           "group.id": ORCHESTRATOR_GROUP, "enable.auto.commit": False})
        member.commit(offsets=[TopicPartition(commands, 0, 12)], asynchronous=False)
        member.close()

        deleted = await asyncio.to_thread(trim_committed, settings, 5)

        reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "tr-reader"})
        try:
            marks = {(topic, p): reader.get_watermark_offsets(TopicPartition(topic, p), 10)
                     for topic in (commands, dead_letters) for p in (0, 1)}
        finally:
            reader.close()
        again = await asyncio.to_thread(trim_committed, settings, 5)
    finally:
        broker.stop()
    assert marks[(commands, 0)] == (12, 20)
    assert marks[(commands, 1)] == (0, 20)  # nothing committed: nothing deleted
    assert marks[(dead_letters, 0)] == (15, 20)
    assert marks[(dead_letters, 1)] == (15, 20)
    assert deleted == 12 + 15 + 15
    assert again == 0
