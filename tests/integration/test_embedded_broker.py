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
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator.bus import Consumed, DrainingConsumer, make_broker, subscribe_batches
from orchestrator.embedded import EmbeddedBroker
from orchestrator.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def own_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    broker = EmbeddedBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


async def test_a_starving_consumer_widens_its_fetch_wait_and_gets_every_record(
        own_broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(DrainingConsumer, "stall_after_s", 1.0)
    topic = f"long-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": own_broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(10)
    records = 5000
    producer = Producer({"bootstrap.servers": own_broker.bootstrap, "linger.ms": 0})
    for i in range(records):  # one record per batch: the longest log for the count
        producer.produce(topic, str(i).encode())
        producer.flush(5)

    # No database here: the consumer owns its partition through the consumer group.
    settings = Settings(kafka_bootstrap=own_broker.bootstrap, kafka_fetch_wait_ms=1,
                        partition_ownership="group")
    received: set[bytes] = set()
    all_in = asyncio.Event()

    async def handler(batch: list[Consumed]) -> None:
        received.update(m.value for m in batch)
        if len(received) == records:
            all_in.set()

    broker = make_broker(settings)
    subscribe_batches(broker, settings, [topic], "watchdog-test", handler)
    caplog.set_level(logging.WARNING, logger="orchestrator.bus")
    await broker.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 90)
    finally:
        await broker.stop()

    assert len(received) == records
    assert any("rebuilding the consumer" in r.getMessage() for r in caplog.records), (
        "the log never outgrew a 1 ms fetch: the test no longer exercises the watchdog")
