"""The embedded broker's known limit, and the consumer's answer to it.

tansu's memory engine scans a partition's log to answer a fetch and answers empty when the scan
outlasts fetch.wait.max.ms; past a few thousand records a 1 ms wait starves a consumer for good.
The consumer's watchdog must notice and widen its wait until every record arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator.dev.embedded import EmbeddedBroker
from orchestrator.kafka.consumer import BatchConsumer, Consumed
from orchestrator.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def own_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    broker = EmbeddedBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def tansu(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The broker whose fetch limit the watchdog is for (ADR 0003)."""
    broker = EmbeddedBroker(tmp_path, "tansu")
    broker.start()
    yield broker
    broker.stop()


def new_topic(broker: EmbeddedBroker, prefix: str) -> str:
    """A fresh topic of one partition."""
    topic = f"{prefix}-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(10)
    return topic


async def test_a_starving_consumer_widens_its_fetch_wait_and_gets_every_record(
        tansu: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    own_broker = tansu
    monkeypatch.setattr(BatchConsumer, "stall_after_s", 1.0)
    topic = new_topic(own_broker, "long")
    records = 5000
    producer = Producer({"bootstrap.servers": own_broker.bootstrap, "linger.ms": 0})
    for i in range(records):  # one record per batch: the longest log for the count
        producer.produce(topic, str(i).encode())
        producer.flush(5)

    # No database here: the consumer owns its partition through the consumer group.
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, kafka_fetch_wait_ms=1,
                        kafka_trust_watermarks=False,
                        partition_ownership="group")
    received: set[bytes] = set()
    all_in = asyncio.Event()

    async def handler(batch: list[Consumed]) -> None:
        received.update(m.value for m in batch)
        if len(received) == records:
            all_in.set()

    consumer = BatchConsumer(settings, [topic], "watchdog-test", handler)
    caplog.set_level(logging.WARNING, logger="orchestrator.kafka.consumer")
    await consumer.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 90)
    finally:
        await consumer.stop()

    assert len(received) == records
    assert any("rebuilding the consumer" in r.getMessage() for r in caplog.records), (
        "the log never outgrew a 1 ms fetch: the test no longer exercises the watchdog")


async def test_an_offset_is_committed_only_for_records_whose_handler_finished(
        own_broker: EmbeddedBroker) -> None:
    """While a batch is being handled, the group's committed offset must not cover it: a worker
    killed then must get the batch again. librdkafka's commit without offsets commits what is
    stored when its own thread serves the request, which can already include the next poll's
    records; the consumer therefore commits explicit offsets (`BatchConsumer._settle`)."""
    topic = new_topic(own_broker, "commit")
    records = 60
    producer = Producer({"bootstrap.servers": own_broker.bootstrap, "linger.ms": 0})
    for i in range(records):
        producer.produce(topic, str(i).encode())
    producer.flush(10)

    group = f"commit-test-{uuid.uuid4().hex[:6]}"
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, kafka_fetch_wait_ms=1,
                        kafka_trust_watermarks=own_broker.kind != "tansu",
                        partition_ownership="group", consume_batch_max=1)
    observer = Consumer({"bootstrap.servers": own_broker.bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    overreaching: list[tuple[int, int]] = []
    handled = 0
    done = asyncio.Event()

    async def handler(batch: list[Consumed]) -> None:
        nonlocal handled
        await asyncio.sleep(0.01)  # time for a commit requested before this batch to land
        [position] = await asyncio.to_thread(
            observer.committed, [TopicPartition(topic, 0)], 10)
        for message in batch:
            if position.offset > message.offset:  # committed past a record still in hand
                overreaching.append((message.offset, position.offset))
        handled += len(batch)
        if handled >= records:
            done.set()

    consumer = BatchConsumer(settings, [topic], group, handler)
    await consumer.start()
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await consumer.stop()
        observer.close()
    assert handled >= records
    assert not overreaching, f"(record in hand, committed offset): {overreaching[:5]}"
