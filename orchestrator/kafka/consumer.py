"""The Kafka edge: topic setup and faststream batch subscribers (the producer is in
`orchestrator.kafka.producer`).

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

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from faststream import AckPolicy
from faststream.confluent import KafkaBroker
from faststream.confluent.annotations import KafkaMessage
from faststream.confluent.helpers.client import AsyncConfluentConsumer, check_msg_error

from orchestrator.errors import BusError, ConfigurationError
from orchestrator.metrics import CONSUMER_REWINDS
from orchestrator.postgres.leases import Partition, PartitionLeases
from orchestrator.settings import Settings
from schemas import TOPIC_DEAD_LETTERS, TOPIC_REPLIES, TOPIC_TRANSFER_COMMANDS, step_topic

log = logging.getLogger(__name__)

PARTICIPANTS = ("risk", "ledger", "notify")
ORCHESTRATOR_GROUP = "saga-orchestrator"
# Dead-letter records kept on the embedded broker's topic when its logs are trimmed (no worker
# consumes that topic: every dead letter is in PostgreSQL, `saga dlq`).
DEAD_LETTERS_KEPT = 10_000


def participant_group(name: str) -> str:
    return f"saga-participant-{name}"


def consuming_groups(settings: Settings) -> dict[str, list[str]]:
    """The consumer groups that read each topic: what they all committed may be trimmed."""
    groups = {settings.topic(TOPIC_TRANSFER_COMMANDS): [ORCHESTRATOR_GROUP],
              settings.topic(TOPIC_REPLIES): [ORCHESTRATOR_GROUP]}
    for name in PARTICIPANTS:
        groups[settings.topic(step_topic(name))] = [participant_group(name)]
    return groups


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


def listed_topics(admin: AdminClient, timeout_s: float) -> set[str]:
    """The names of the topics the broker has (raises KafkaException when it does not answer)."""
    return set(admin.list_topics(timeout=timeout_s).topics)


def trim_committed(settings: Settings, keep_dead_letters: int = DEAD_LETTERS_KEPT,
                   timeout_s: float = 10.0) -> int:
    """Delete the records every consuming group has committed (DeleteRecords), and dead-letter
    records beyond the newest `keep_dead_letters` per partition; returns how many went.

    For a broker that holds its logs in memory or rewrites a snapshot of them (the embedded
    noida): without it a long-running stack grows without bound. A record is never deleted
    before every group that reads it committed past it, so nothing unread goes; a consumer
    that reads a partition again after a broker loss starts from its committed offset, which
    is at or past the new start of the log (ADR 0007)."""
    assert settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    present = admin.list_topics(timeout=timeout_s).topics
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "saga-trim",
                       "enable.auto.commit": False})
    targets: list[TopicPartition] = []
    deleted = 0
    try:
        wanted = dict(consuming_groups(settings))
        wanted[settings.topic(TOPIC_DEAD_LETTERS)] = []
        for topic, groups in wanted.items():
            if topic not in present:
                continue
            partitions = [TopicPartition(topic, p) for p in sorted(present[topic].partitions)]
            upto: dict[int, int] = {}
            for group in groups:
                member = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                   "group.id": group, "enable.auto.commit": False})
                try:
                    for tp in member.committed(partitions, timeout=timeout_s):
                        # A group with no offset here holds everything back.
                        offset = tp.offset if tp.error is None and tp.offset >= 0 else 0
                        upto[tp.partition] = min(upto.get(tp.partition, offset), offset)
                finally:
                    member.close()
            for tp in partitions:
                low, high = reader.get_watermark_offsets(tp, timeout=timeout_s)
                cut = upto.get(tp.partition, 0) if groups else high - keep_dead_letters
                cut = min(cut, high)
                if cut > low:
                    targets.append(TopicPartition(topic, tp.partition, cut))
                    deleted += cut - low
    finally:
        reader.close()
    if targets:
        for future in admin.delete_records(targets, request_timeout=timeout_s).values():
            future.result(timeout_s + 5)
    return deleted


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
    # consumer-group membership (see `orchestrator.postgres.leases`).
    lease_settings: Settings | None = None
    leases: PartitionLeases | None = None
    # Set by `make_broker` from `kafka_trust_watermarks` (see `_rewind_shortened_logs`).
    trust_watermarks = True
    # How often the positions are compared with the ends of the logs, in seconds.
    log_check_every_s = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The same consumer, with an error callback: it is how a lost broker is noticed (see
        # `_resume_after_broker_loss`). faststream builds its config and client in one go.
        self.config = {**self.config, "error_cb": self._on_error}
        old, self.consumer = self.consumer, Consumer(self.config, logger=log)
        old.close()
        self._brokers_lost = False
        self._positions_at_loss: dict[tuple[str, int], int] | None = None
        # Bumped whenever positions are moved back: a batch handed out before is not
        # committed (its offsets may belong to a log the broker no longer has).
        self._generation = 0
        self._handed_out_generation = 0
        self._next_log_check = time.monotonic() + self.log_check_every_s
        self.rewinds = 0

    def _on_error(self, error: KafkaError) -> None:
        # Called by librdkafka on the consumer's own thread, inside poll().
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_lost = True

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
            if self._brokers_lost:
                # Whatever this poll returned is read again from the resumed positions.
                self._resume_after_broker_loss()
                return []
            if time.monotonic() >= self._next_log_check:
                self._next_log_check = time.monotonic() + self.log_check_every_s
                if self._rewind_shortened_logs():
                    return []
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
        self._handed_out_generation = self._generation
        return batch

    def _resume_after_broker_loss(self) -> None:
        """Every broker was lost (a restart, a crash, a network cut): read every owned
        partition again from what the broker now says was committed, never from where this
        consumer was. A broker that lost its logs, or their last seconds, has new records at
        offsets this consumer already passed; reading from its own position would skip them
        for ever (issue 9: 367 acknowledged requests never became sagas). A broker that kept
        everything costs a second reading of the uncommitted tail, which the inbox and the
        participants' stored replies make harmless. Runs on the consumer's own thread; while
        the broker is still away, it is tried again at the next poll."""
        self._brokers_lost = False
        assignment = self.consumer.assignment()
        if not assignment:
            return
        if self._positions_at_loss is None:  # where it was, for the log and the count
            self._positions_at_loss = {(tp.topic, tp.partition): tp.offset
                                       for tp in self.consumer.position(assignment)}
        try:
            committed = self.consumer.committed(assignment, timeout=2)
            targets = [self._resume_target(tp) for tp in committed]
            self._reposition(targets)
        except KafkaException as error:
            self._brokers_lost = True  # still away: again at the next poll
            log.warning("cannot resume %s yet: %s", self.config.get("group.id"), error)
            return
        self._generation += 1
        positions, self._positions_at_loss = self._positions_at_loss, None
        moved = [t for t in targets
                 if positions.get((t.topic, t.partition), -1) != t.offset]
        self._count_rewinds(moved, "every broker was lost")

    def _reposition(self, targets: Sequence[TopicPartition]) -> None:
        for target in targets:
            try:
                self.consumer.seek(target)
            except KafkaException:
                # A partition that has not started fetching cannot be sought; assigned again
                # with an offset, it starts there.
                bare = TopicPartition(target.topic, target.partition)
                self.consumer.incremental_unassign([bare])
                self.consumer.incremental_assign([target])

    def _resume_target(self, committed: TopicPartition) -> TopicPartition:
        """Where to read a partition again: its committed offset if the log still reaches it,
        else its start (a committed offset past the end belongs to a log that is gone)."""
        if committed.error is not None:
            raise KafkaException(committed.error)
        offset = committed.offset
        if offset >= 0 and self.trust_watermarks:
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(committed.topic, committed.partition), timeout=2)
            if not low <= offset <= high:
                offset = OFFSET_BEGINNING
        elif offset >= 0:
            # tansu keeps no committed offsets across a restart, and its watermarks cannot
            # tell a committed offset of the lost log from one of the new: start over.
            offset = OFFSET_BEGINNING
        if offset < 0:
            offset = OFFSET_BEGINNING
        return TopicPartition(committed.topic, committed.partition, offset)

    def _rewind_shortened_logs(self) -> bool:
        """Compare each owned partition's position with the end of its log: a position past
        the end means the log was shortened or re-created under a running consumer (a topic
        deleted and created again, retention, an unclean leader election); the partition is
        read again from its committed offset, or its start. Only where the broker's high
        watermark can be trusted (tansu's cannot: it reports ends below records it serves)."""
        if not self.trust_watermarks:
            return False
        try:
            shortened = []
            for tp in self.consumer.position(self.consumer.assignment()):
                if tp.offset < 0:
                    continue  # nothing fetched yet: it starts from the committed offset
                # As the last fetch response told it: no request on the hot path.
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if 0 <= high < tp.offset:
                    shortened.append(tp)
            if not shortened:
                return False
            committed = self.consumer.committed(shortened, timeout=2)
            targets = [self._resume_target(tp) for tp in committed]
            self._reposition(targets)
        except KafkaException as error:
            log.debug("cannot compare positions with the logs' ends: %s", error)
            return False
        self._generation += 1
        self._count_rewinds(targets, "its log is shorter than its position")
        return True

    def _count_rewinds(self, targets: Sequence[TopicPartition], why: str) -> None:
        if not targets:
            return
        self.rewinds += len(targets)
        group = str(self.config.get("group.id"))
        CONSUMER_REWINDS.add(len(targets), {"group": group})
        where = ", ".join(
            f"{t.topic}[{t.partition}]@" + ("start" if t.offset < 0 else str(t.offset))
            for t in targets)
        log.warning("consumer %s reads %d partitions again because %s: %s", group,
                    len(targets), why, where)

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
        if not offsets or self._brokers_lost or self._handed_out_generation != self._generation:
            # Positions were moved back since this batch was handed out: its offsets may be
            # past the end of the broker's new log, and committing them would skip records.
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
        self._generation += 1  # the new consumer starts from the committed offsets
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
        """Whether the broker holds records past where this consumer reads. A partition with
        no position yet (nothing fetched since it was assigned) reads from its committed
        offset, or from the start of the log when its group committed none (comparing every
        such partition with the start of the log took each idle, freshly assigned consumer
        for a starved one: issue 9)."""
        try:
            assignment = self.consumer.assignment()
            committed = {(tp.topic, tp.partition): tp.offset
                         for tp in self.consumer.committed(assignment, timeout=2)}
            for tp in self.consumer.position(assignment):
                low, high = self.consumer.get_watermark_offsets(tp, timeout=2)
                reads_from = tp.offset if tp.offset >= 0 else committed.get(
                    (tp.topic, tp.partition), -1)
                if high > (reads_from if reads_from >= 0 else low):
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
        consumer.trust_watermarks = settings.kafka_trust_watermarks
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
