"""The producing half of the Kafka edge: an idempotent producer and the record it sends.

Kept apart from `orchestrator.kafka.consumer` so that a worker can create its producer first thing,
before the heavy imports (SQLAlchemy above all): a fresh idempotent producer gets its producer id
only ~0.5 s after it is created (librdkafka retries its first InitProducerId on a fixed 500 ms
timer, before any broker connection is up), and every record waits for that id. Created at process
start, the id arrives while the rest of the worker starts, not in front of its first publish, which
is what a restarted worker's in-flight sagas wait on (docs/performance.md, recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from orchestrator.errors import BusError, RecordRefused, TopicRefused
from orchestrator.settings import Settings

log = logging.getLogger(__name__)

# The largest record this producer sends (librdkafka's `message.max.bytes`, its default): one
# constant for the producer's config and for what must fit under it (a dead letter's copy).
MESSAGE_MAX_BYTES = 1_000_000
# How long a record may wait for its acknowledgement (librdkafka's `message.timeout.ms`); what
# `deliver` waits at most.
DELIVERY_TIMEOUT_S = 30

# librdkafka error codes that refuse a record for what it is: sending the same bytes again is
# refused again. Everything not listed here or in `_DESTINATION_REFUSALS` (a timeout, a purge
# after a lost broker, a transport error) says nothing about the record and is retried.
_RECORD_REFUSALS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE, KafkaError._INVALID_ARG,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT, KafkaError.POLICY_VIOLATION,
    KafkaError.TOPIC_EXCEPTION,  # an illegal topic name: no topic of that name can exist
})
# Refused for the destination, which can change: a topic created (again), access granted.
_DESTINATION_REFUSALS = frozenset({
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
})


def delivery_error(error: KafkaError, topic: str = "") -> BusError:
    """A librdkafka error about one record as ours: `RecordRefused` (never deliverable as it
    is), `TopicRefused` (not deliverable to that topic now) or `BusError` (transient)."""
    code = error.code()
    text = f"{topic}: {error.name()}: {error.str()}" if topic else f"{error.name()}: {error.str()}"
    if code in _RECORD_REFUSALS:
        return RecordRefused(text, error.name())
    if code in _DESTINATION_REFUSALS:
        return TopicRefused(text, error.name())
    return BusError(text)


@dataclass(frozen=True)
class Record:
    """One message to produce. Headers are bytes, as Kafka carries them."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def record_size(record: Record) -> int:
    """What a record weighs against `message.max.bytes`, without the protocol's own overhead
    (a few dozen bytes per record and per batch, which callers leave room for)."""
    return (len(record.value) + len(record.key or b"")
            + sum(len(name.encode()) + len(value) for name, value in record.headers))


class KafkaProducer:
    """An idempotent producer (no duplicates or reordering from its own retries) that sends a
    batch and waits until every record has its delivery report."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        assert settings.kafka_bootstrap
        self._config: dict[str, Any] = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            # Latency over batching: a saga's next step waits on this record.
            "linger.ms": 0,
            "message.timeout.ms": DELIVERY_TIMEOUT_S * 1000,
            # Topics are created with their partition count by `ensure_topics` (workers at
            # start, the recovery worker after a broker restart), never by a produce.
            "allow.auto.create.topics": False,
            # A record for a topic the broker does not know waits this long for the topic to
            # appear before it is refused as UNKNOWN_TOPIC_OR_PART. Under message.timeout.ms,
            # so an unknown topic is reported as such (at 30 s it would end as a timeout,
            # which says nothing); above the ~2 s the recovery worker takes to re-create the
            # topics of a restarted broker, so that window costs no refusal.
            "topic.metadata.propagation.max.ms": 10000,
            "message.max.bytes": MESSAGE_MAX_BYTES,
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

    async def deliver(self, records: Sequence[Record]) -> list[BusError | None]:
        """Produce `records` and wait for each one's outcome; returns one entry per record, in
        order: None when the broker acknowledged it, else why not (`RecordRefused`,
        `TopicRefused`, or a transient `BusError`: a timeout, a lost broker). One refused
        record never fails the others: each is produced and reported on its own."""
        if not records:
            return []
        self._renew_if_brokers_lost()
        results: list[BusError | None] = [None] * len(records)
        reported = [False] * len(records)

        def reporter(index: int, topic: str) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(error: KafkaError | None, _message: Message) -> None:
                reported[index] = True
                if error is not None:
                    results[index] = delivery_error(error, topic)
            return on_delivery

        for index, record in enumerate(records):
            while True:
                try:
                    self._producer.produce(
                        record.topic,
                        value=record.value,
                        key=record.key,
                        headers=list(record.headers),
                        on_delivery=reporter(index, record.topic),
                    )
                    break
                except BufferError:
                    # The local queue is full: let deliveries drain, then go on.
                    await asyncio.to_thread(self._producer.poll, 0.05)
                except KafkaException as error:
                    # Refused before it left (larger than message.max.bytes, a topic known
                    # not to exist): this record has its outcome and no delivery report.
                    results[index] = delivery_error(error.args[0], record.topic)
                    reported[index] = True
                    break
        # Done when every record has its delivery report, whichever producer served it: a
        # concurrent send (the recovery worker's relay shares this object) may have replaced
        # the producer, which reports the records it held as purged.
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while not all(reported):
            if self._brokers_lost:
                # Not worth waiting for: these records may never be acknowledged. Replacing
                # the producer reports them as purged.
                self._renew_if_brokers_lost()
            elif time.monotonic() > deadline:
                late = BusError(f"not acknowledged by the broker in {DELIVERY_TIMEOUT_S} s")
                return [result if done else late
                        for result, done in zip(results, reported, strict=True)]
            else:
                await asyncio.to_thread(self._producer.flush, 0.5)
        return list(results)

    async def send(self, records: Sequence[Record]) -> None:
        """Produce `records`; return once the broker acknowledged every one of them. Raises if
        one was not: a transient `BusError` if any failure was transient (the caller sends the
        whole batch again), else the first refusal."""
        errors = [error for error in await self.deliver(records) if error is not None]
        if errors:
            raise next((error for error in errors if error.retryable), errors[0])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._producer.flush(5)
