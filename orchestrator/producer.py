"""The producing half of the Kafka edge: an idempotent producer and the record it sends.

Kept apart from `orchestrator.bus` so that a worker can create its producer first thing, before
the heavy imports (SQLAlchemy, faststream): a fresh idempotent producer gets its producer id only
~0.5 s after it is created (librdkafka retries its first InitProducerId on a fixed 500 ms timer,
before any broker connection is up), and every record waits for that id. Created at process
start, the id arrives while the rest of the worker starts, not in front of its first publish,
which is what a restarted worker's in-flight sagas wait on (docs/performance.md, recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from orchestrator.errors import BusError
from orchestrator.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One message to produce. Headers are bytes, as Kafka carries them."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


class KafkaProducer:
    """An idempotent producer (no duplicates or reordering from its own retries) that sends a
    batch and waits until the broker acknowledged every record."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        assert settings.kafka_bootstrap
        self._config: dict[str, Any] = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            # Latency over batching: a saga's next step waits on this record.
            "linger.ms": 0,
            "message.timeout.ms": 30000,
            # Topics are created with their partition count by `ensure_topics` (workers at
            # start, the recovery worker after a broker restart), never by a produce.
            "allow.auto.create.topics": False,
            "error_cb": self._on_error,
        }
        self._producer = Producer(self._config)
        self._brokers_lost = False

    def _on_error(self, error: KafkaError) -> None:
        # Every broker went away, as in a restart. An idempotent producer's id does not survive
        # a broker that keeps no state (the embedded one): it would be refused with
        # UNKNOWN_PRODUCER_ID on every record for ever, each record failing only at
        # message.timeout.ms. So the producer is replaced (a new id) before it sends again.
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_lost = True

    def _renew_if_brokers_lost(self) -> None:
        """Replace the producer if every broker was lost since it last sent. The records it
        still held are reported to their senders as purged (failed); they send them again, and
        receivers deduplicate."""
        self._producer.poll(0)  # serve pending error callbacks
        if not self._brokers_lost:
            return
        self._brokers_lost = False
        old, self._producer = self._producer, Producer(self._config)
        old.purge()
        old.flush(0)  # serves the purged records' delivery reports
        log.warning("every broker was lost: replaced the Kafka producer (a new producer id)")

    async def send(self, records: Sequence[Record]) -> None:
        """Produce `records`; return once the broker acknowledged every one of them. Raises
        BusError if one was refused, not acknowledged in 30 s, or dropped with a lost broker."""
        if not records:
            return
        self._renew_if_brokers_lost()
        errors: list[str] = []
        reported = 0

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            nonlocal reported
            reported += 1
            if error is not None:
                errors.append(str(error))

        for record in records:
            while True:
                try:
                    self._producer.produce(
                        record.topic,
                        value=record.value,
                        key=record.key,
                        headers=list(record.headers),
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    # The local queue is full: let deliveries drain, then go on.
                    await asyncio.to_thread(self._producer.poll, 0.05)
        # Done when every record has its delivery report, whichever producer served it: a
        # concurrent send (the recovery worker's relay shares this object) may have replaced
        # the producer, which reports the records it held as purged.
        deadline = time.monotonic() + 30
        while reported < len(records):
            if self._brokers_lost:
                # Not worth waiting for: these records may never be acknowledged. Replacing
                # the producer reports them as purged.
                self._renew_if_brokers_lost()
            elif time.monotonic() > deadline:
                raise BusError(f"{len(records) - reported} records were not acknowledged by the"
                               " broker in 30 s")
            else:
                await asyncio.to_thread(self._producer.flush, 0.5)
        if errors:
            raise BusError(f"the broker refused records: {errors[:3]}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._producer.flush(5)
