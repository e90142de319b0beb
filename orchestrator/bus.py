"""The Kafka edge: topic setup and faststream batch subscribers (the producer is in
`orchestrator.producer`).

Consumers are faststream batch subscribers on confluent-kafka with manual acknowledgement: a batch
is acknowledged (its offsets committed) only after the handler returned, that is after the
database transaction that recorded it committed. A handler that raises is nacked: faststream seeks
back and the batch is redelivered, so handlers raise only for infrastructure faults, never for bad
input (bad input is dead-lettered inside the transaction).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from faststream import AckPolicy
from faststream.confluent import KafkaBroker
from faststream.confluent.annotations import KafkaMessage
from faststream.confluent.helpers.client import AsyncConfluentConsumer, check_msg_error

from orchestrator.errors import BusError, ConfigurationError
from orchestrator.leases import Partition, PartitionLeases
from orchestrator.settings import Settings
from schemas import TOPIC_DEAD_LETTERS, TOPIC_REPLIES, TOPIC_TRANSFER_COMMANDS, step_topic

log = logging.getLogger(__name__)

PARTICIPANTS = ("risk", "ledger", "notify")


def all_topics(settings: Settings) -> list[str]:
    names = [TOPIC_TRANSFER_COMMANDS, TOPIC_REPLIES, TOPIC_DEAD_LETTERS]
    names += [step_topic(p) for p in PARTICIPANTS]
    return [settings.topic(name) for name in names]


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create the topics if missing. Idempotent; an existing topic is left as it is."""
    assert settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, settings.topic_partitions, 1) for name in all_topics(settings)],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout_s)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BusError(f"cannot create topic {name}: {error}") from error


def missing_topics(settings: Settings, timeout_s: float = 10.0) -> list[str]:
    """The topics of `all_topics` the broker does not have."""
    assert settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    present = set(admin.list_topics(timeout=timeout_s).topics)
    return [name for name in all_topics(settings) if name not in present]


@dataclass(frozen=True)
class Consumed:
    """What a handler needs of one consumed Kafka record, free of the client's types."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode(errors="replace")
        return None

    @classmethod
    def from_confluent(cls, message: Message) -> Consumed:
        kind, timestamp = message.timestamp()
        raw_headers = message.headers() or []
        headers = list(raw_headers.items() if isinstance(raw_headers, dict) else raw_headers)
        return cls(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=message.key(),
            value=message.value() or b"",
            headers=tuple((k, _as_bytes(v)) for k, v in headers),
            timestamp_ms=timestamp if kind != 0 else None,
        )


def _as_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> list[list[str]]:
    """Headers as JSON (for the outbox and dead-letter rows), lossless for binary values."""
    return [[name, base64.b64encode(value).decode()] for name, value in headers]


def decode_headers(stored: Sequence[Sequence[str]]) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, base64.b64decode(value)) for name, value in stored)


async def _raw_decoder(message: KafkaMessage) -> tuple[Message, ...]:
    # The handlers parse bytes themselves (bad input must be dead-lettered, not crash decoding):
    # the "decoded" body is the raw batch.
    return message.raw_message  # type: ignore[return-value]


BatchHandler = Callable[[list[Consumed]], Awaitable[None]]


class DrainingConsumer(AsyncConfluentConsumer):
    """faststream's consumer, with a batch read that does not wait for a full batch.

    faststream's `getmany` is librdkafka's batch consume, which blocks for its whole timeout
    unless the batch fills: the poll interval became a latency floor on every hop and, set
    small, a busy loop. This one blocks until the *first* record arrives (or `timeout` passes),
    then takes whatever else is already queued without waiting: one record costs no extra
    wait, and under load the batches still fill from the prefetch queue.
    """

    # Starvation watchdog (see `_starving`): how long without a record, while the broker holds
    # records past our position, before the fetch wait is doubled, and up to what wait.
    stall_after_s = 3.0
    max_fetch_wait_ms = 256

    # Set (by `make_broker`) when partitions are owned through PostgreSQL leases rather than
    # consumer-group membership (see `orchestrator.leases`).
    lease_settings: Settings | None = None
    leases: PartitionLeases | None = None

    async def start(self) -> None:
        if self.lease_settings is None:
            await super().start()
            return
        loop = asyncio.get_running_loop()
        names = [t.name for t in self.topics]

        def describe() -> list[Partition]:
            metadata = self.consumer.list_topics(timeout=10)
            found: list[Partition] = []
            for name in names:
                topic = metadata.topics.get(name)
                if topic is None or topic.error is not None:
                    raise BusError(f"topic {name} is missing: create it first (ensure_topics)")
                found += [Partition(name, p) for p in sorted(topic.partitions)]
            return found

        partitions = await loop.run_in_executor(self._thread_pool, describe)
        self.leases = PartitionLeases(self.lease_settings, str(self.config["group.id"]),
                                      partitions, self._reassign)
        await self.leases.start()
        await self.leases.wait_first_pass()
        if self._on_assign is not None:
            self._on_assign(self.consumer, [])

    async def _reassign(self, acquired: Sequence[Partition], released: Sequence[Partition]
                        ) -> None:
        """Apply lease changes to the librdkafka consumer, on its own thread."""

        def apply() -> None:
            if released:
                self.consumer.incremental_unassign(
                    [TopicPartition(p.topic, p.partition) for p in released])
            if acquired:
                # No offset given: each partition resumes from the group's committed offset.
                self.consumer.incremental_assign(
                    [TopicPartition(p.topic, p.partition) for p in acquired])

        await asyncio.get_running_loop().run_in_executor(self._thread_pool, apply)

    async def stop(self) -> None:
        leases, self.leases = self.leases, None
        if leases is not None:
            leases.on_change = _ignore_changes  # the consumer is closing with its assignment
        try:
            await super().stop()
        finally:
            if leases is not None:
                await leases.stop()

    async def getmany(self, timeout: float = 0.1, max_records: int | None = 10  # noqa: ASYNC109
                      ) -> tuple[Message, ...]:
        limit = max(1, max_records or 10)

        def first_then_queued() -> list[Message | None]:
            first = self.consumer.poll(timeout)
            if first is None:
                self._check_starvation()
                return [first]
            self._last_record_at = time.monotonic()
            if limit == 1:
                return [first]
            return [first, *self.consumer.consume(num_messages=limit - 1, timeout=0)]

        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(self._thread_pool, first_then_queued)
        batch = tuple(m for m in map(check_msg_error, raw) if m is not None)
        handed_out: dict[tuple[str, int], int] = {}
        for message in batch:
            key = (str(message.topic()), int(message.partition() or 0))
            handed_out[key] = max(handed_out.get(key, -1), int(message.offset() or 0) + 1)
        self._handed_out = handed_out
        return batch

    async def commit(self, asynchronous: bool = True) -> None:
        """Commit exactly the batch last handed out, the one its handler just finished
        (faststream acknowledges a batch before it asks for the next one).

        Not librdkafka's commit without offsets: that commits the offsets *stored* when its
        own thread serves the request, and by then the next poll may have stored the offsets
        of records nobody has handled yet. A worker killed while handling those (say, after
        storing a step's reply and before sending it) left them committed: the reply was
        never sent and the command never consumed again, until the step's deadline made the
        recovery worker re-send it (seen as a rare 10 s recovery in bench/recovery.py)."""
        offsets = [TopicPartition(topic, partition, offset)
                   for (topic, partition), offset in getattr(self, "_handed_out", {}).items()]
        if not offsets:
            return

        def commit() -> None:
            # Two calls, not `asynchronous=asynchronous`: the library's stubs type `commit`
            # by the literal value (the synchronous one returns the committed offsets).
            if asynchronous:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=False)

        await asyncio.get_running_loop().run_in_executor(self._thread_pool, commit)

    def _check_starvation(self) -> None:
        """Runs on the consumer's own thread, between polls.

        The embedded broker (tansu, memory storage) scans a partition's log to answer a fetch,
        and answers *empty* if the scan outlasts fetch.wait.max.ms; the scan grows with the log
        (measured: a 1 ms wait fails from ~3,000 single-record batches, 5 ms from ~12,000), so
        a consumer with a short wait eventually starves for good while records wait. When no
        record came for `stall_after_s` although the broker holds some past our position, the
        librdkafka consumer is rebuilt with twice the wait; its partitions resume from the
        committed offsets (everything after them is redelivered and deduplicated).
        """
        now = time.monotonic()
        last = getattr(self, "_last_record_at", None)
        if last is None:
            self._last_record_at = now
            return
        if now - last < self.stall_after_s:
            return
        self._last_record_at = now  # check again only after another quiet period
        wait_ms = int(self.config.get("fetch.wait.max.ms", 500))
        if wait_ms >= self.max_fetch_wait_ms or not self._records_waiting():
            return
        new_wait = min(wait_ms * 2, self.max_fetch_wait_ms)
        log.warning(
            "consumer %s got nothing for %.0f s while the broker holds records past its "
            "position: the broker cannot answer within fetch.wait.max.ms=%d ms; rebuilding the "
            "consumer with %d ms (set SAGA_KAFKA_FETCH_WAIT_MS to start there)",
            self.config.get("group.id"), self.stall_after_s, wait_ms, new_wait)
        self.config = {**self.config, "fetch.wait.max.ms": new_wait}
        old, self.consumer = self.consumer, Consumer(self.config, logger=log)
        with contextlib.suppress(Exception):
            old.close()
        if self.leases is not None:
            self.consumer.assign([TopicPartition(p.topic, p.partition)
                                  for p in sorted(self.leases.owned)])
            return
        subscribe: dict[str, Any] = {"topics": [t.name for t in self.topics]}
        for name, callback in (("on_assign", self._on_assign), ("on_revoke", self._on_revoke),
                               ("on_lost", self._on_lost)):
            if callback is not None:
                subscribe[name] = callback
        self.consumer.subscribe(**subscribe)

    def _records_waiting(self) -> bool:
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                low, high = self.consumer.get_watermark_offsets(tp, timeout=2)
                # No position yet (nothing fetched since assignment): count from the log start.
                if high > (tp.offset if tp.offset >= 0 else low):
                    return True
        except KafkaException:
            return False
        return False


async def _ignore_changes(_acquired: Sequence[Partition], _released: Sequence[Partition]
                          ) -> None:
    return None


def make_broker(settings: Settings) -> KafkaBroker:
    assert settings.kafka_bootstrap
    broker = KafkaBroker(
        settings.kafka_bootstrap,
        client_id=settings.worker_name or "saga",
        logger=None,
        # No dependency injection on the handlers: they take the raw batch. FastDepends'
        # argument validation cost ~0.5 ms per consumed batch, on every hop of every saga.
        apply_types=False,
        config={"linger.ms": 0},
        # Topics are created only by `ensure_topics`, with `topic_partitions`. A consumer that
        # may auto-create them re-creates its topics on its first metadata request after a
        # broker restart, with the broker's default partition count (4 on the embedded one):
        # the recovery worker then finds them existing, and partitions above it never return.
        allow_auto_create_topics=False,
    )
    config = broker.config.broker_config
    default_builder: Any = config.builder  # faststream's ConsumerBuilder: config, admin, logger

    def build(*topics: Any, **kwargs: Any) -> DrainingConsumer:
        consumer = DrainingConsumer(*topics, config=default_builder.config,
                                    admin_service=default_builder.admin,
                                    logger=default_builder.logger, **kwargs)
        if settings.partition_ownership == "lease":
            if not settings.database_url:
                raise ConfigurationError("partition_ownership=lease needs SAGA_DATABASE_URL "
                                         "(or set SAGA_PARTITION_OWNERSHIP=group)")
            consumer.lease_settings = settings
        return consumer

    config.builder = build
    return broker


def subscribe_batches(
    broker: KafkaBroker,
    settings: Settings,
    topics: Sequence[str],
    group_id: str,
    handler: BatchHandler,
    on_assign: Callable[..., None] | None = None,
) -> None:
    """Register `handler` for batches from `topics` in consumer group `group_id`.

    `on_assign` is called (on the consumer's thread) when the group hands it partitions.
    """

    @broker.subscriber(
        *topics,
        group_id=group_id,
        batch=True,
        max_records=settings.consume_batch_max,
        polling_interval=settings.consume_poll_s,
        fetch_max_wait_ms=settings.kafka_fetch_wait_ms,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(500, settings.kafka_session_timeout_ms // 6),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=_raw_decoder,
        on_assign=on_assign,
        title=f"{group_id}:{','.join(topics)}",
    )
    async def _on_batch(raw_batch: tuple[Message, ...]) -> None:
        consumed = [Consumed.from_confluent(raw) for raw in raw_batch]
        try:
            await handler(consumed)
        except Exception:
            log.exception("batch of %d from %s failed; it will be redelivered", len(consumed),
                          group_id)
            # Redelivery is immediate; a short pause keeps a database outage from spinning a core.
            await asyncio.sleep(0.5)
            raise
