"""The Kafka edge: topic setup, and the consuming workers' batch loop (`BatchConsumer`, on
confluent-kafka directly; the producer is in `orchestrator.kafka.producer`).

A batch's offsets are committed only after its handler returned, that is after the database
transaction that recorded it committed. A handler that raises gets its batch again from its
first offsets, so handlers raise only for infrastructure faults, never for bad input (bad input
is dead-lettered inside the transaction). Why this loop is ours and not a framework's:
ADR 0013.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator import metrics
from orchestrator.errors import BusError, ConfigurationError
from orchestrator.kafka.threads import OwnKafkaThreads
from orchestrator.metrics import CONSUMER_REWINDS
from orchestrator.postgres.leases import Partition, PartitionLeases
from orchestrator.settings import Settings
from orchestrator.throttle import LogThrottle
from schemas import (
    TOPIC_DEAD_LETTERS,
    TOPIC_REPLIES,
    TOPIC_TRANSFER_COMMANDS,
    TOPIC_TRANSFER_EVENTS,
    step_topic,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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
    names = [TOPIC_TRANSFER_COMMANDS, TOPIC_TRANSFER_EVENTS, TOPIC_REPLIES, TOPIC_DEAD_LETTERS]
    names += [step_topic(p) for p in PARTICIPANTS]
    return [settings.topic(name) for name in names]


def ensure_topics(settings: Settings, extra: Iterable[str] = (), timeout_s: float = 30.0) -> None:
    """Create the engine's topics and `extra` (an application's start and step topics, before
    `SAGA_TOPIC_PREFIX`) if missing, in one request. Idempotent; an existing topic is left as it
    is."""
    assert settings.kafka_bootstrap
    wanted = sorted({*all_topics(settings), *(settings.topic(name) for name in extra)})
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, settings.topic_partitions, 1) for name in wanted],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, future in futures.items():
        # `exception()`, not `result()` in a try: a re-raised error's traceback holds this
        # frame, whose `futures` hold the error: a cycle that kept the admin client (a thread
        # and a broker connection) alive in every worker until the next full GC.
        error = future.exception(timeout_s)
        if error is None:
            continue
        if not (isinstance(error, KafkaException)
                and error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
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

BatchHandler = Callable[[list[Consumed]], Awaitable[None]]
OnReady = Callable[[], Awaitable[None]]
PartitionKey = tuple[str, int]


@dataclass(frozen=True)
class _Span:
    """A batch's records of one partition: the first offset, the offset after the last, and
    the partition's epoch when the batch was handed out (see `BatchConsumer._epochs`)."""

    first: int
    end: int
    epoch: int


@dataclass(frozen=True)
class _Outcome:
    """What became of the last batch handed out: its spans, and whether its handler returned
    (commit them) or raised (read them again)."""

    spans: dict[PartitionKey, _Span]
    handled: bool


def consumer_config(settings: Settings, group_id: str,
                    error_cb: Callable[[KafkaError], None]) -> dict[str, Any]:
    """The librdkafka configuration of a worker's consumer."""
    assert settings.kafka_bootstrap
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": settings.worker_name or "saga",
        # Offsets live in Kafka under the group id, whether partitions come from the group or
        # from leases (ADR 0004); the loop commits them itself, after the handler returned.
        "group.id": group_id,
        "enable.auto.commit": False,
        # A partition its group never committed is read from the start: nothing skipped.
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": settings.kafka_fetch_wait_ms,
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.kafka_session_timeout_ms // 6),
        "partition.assignment.strategy": "roundrobin",
        # Topics are created only by `ensure_topics`, with `topic_partitions`. A consumer that
        # may auto-create them re-creates its topics on its first metadata request after a
        # broker restart, with the broker's default partition count (4 on the embedded one):
        # the recovery worker then finds them existing, and partitions above it never return.
        "allow.auto.create.topics": False,
        # A topic created again after a broker loss is seen within a second, and a failed
        # fetch is tried again after 100 ms (librdkafka's defaults: 5 min, 500 ms).
        "topic.metadata.refresh.interval.ms": 1000,
        "fetch.error.backoff.ms": 100,
        "check.crcs": True,
        # No producer here is transactional: every record is committed as it is written, and
        # the fetch need not wait for a last stable offset (librdkafka's default waits).
        "isolation.level": "read_uncommitted",
        # How a lost broker is noticed (see `BatchConsumer._resume_after_broker_loss`).
        "error_cb": error_cb,
    }
    if metrics.RECORDING:
        # The consumer lag gauge, from librdkafka's own statistics (served by the loop's
        # polls on the consumer's thread): no request to the broker and nothing per record.
        config["statistics.interval.ms"] = max(1000, int(settings.metrics_sample_s * 1000))
        config["stats_cb"] = functools.partial(metrics.consumer_lag, group_id)
    return config


class BatchConsumer:
    """A worker's consuming loop: batches from `topics` handed to `handler`, one at a time.

    Guarantees, for every owned partition:

    - **commit after the handler**: a batch's offsets (exactly the batch's, never librdkafka's
      stored ones) are committed only after `handler` returned, that is after the database
      transaction that recorded the batch committed. A worker killed before that reads the
      batch again; the inbox and the participants' stored replies make that harmless.
    - **nothing skipped**: a handler that raises (infrastructure trouble: handlers dead-letter
      bad input themselves) gets the batch again, from its first offset, after
      `retry_pause_s`; the loop itself never ends on an error. After a broker loss or under a
      shortened log the partitions are read again from what the broker says was committed, or
      the log's start (ADR 0007).
    - **generation guard**: every move of a partition's position that this loop did not ask
      for (a resume, a rewind, a rebuilt client, a fresh assignment) bumps that partition's
      epoch; a batch handed out under an older epoch is neither committed nor sought on that
      partition (its offsets may belong to a log the broker no longer has).

    Every librdkafka call of this consumer runs on its one executor thread, so the calls never
    overlap and the epochs are only ever read and changed there. Each turn of the loop is one
    hop to that thread: settle the previous batch (commit or seek back), then read the next:
    block until the *first* record arrives (or `consume_poll_s` passes), then take whatever
    else is already queued without waiting, up to `consume_batch_max` (ADR 0002: one record
    costs no extra wait; under load the batches fill from the prefetch queue).

    Partitions are owned through PostgreSQL leases (`orchestrator.leases`, ADR 0004) or, with
    `partition_ownership=group`, through consumer-group membership.
    """

    # Starvation watchdog (see `_check_starvation`): how long without a record, while the
    # broker holds records past our position, before the fetch wait is doubled, and up to what.
    stall_after_s = 3.0
    max_fetch_wait_ms = 256
    # How often the positions are compared with the ends of the logs, in seconds.
    log_check_every_s = 2.0
    # How long after a handler raised its batch is read again (a database outage must not spin
    # a core), and how long `stop` lets a batch in hand finish.
    retry_pause_s = 0.5
    stop_grace_s = 10.0

    def __init__(self, settings: Settings, topics: Sequence[str], group_id: str,
                 handler: BatchHandler, on_ready: OnReady | None = None) -> None:
        if settings.partition_ownership == "lease" and not settings.database_url:
            raise ConfigurationError("partition_ownership=lease needs SAGA_DATABASE_URL "
                                     "(or set SAGA_PARTITION_OWNERSHIP=group)")
        self.settings = settings
        self.topics = list(topics)
        self.group_id = group_id
        self.handler = handler
        self.on_ready = on_ready
        self.config = consumer_config(settings, group_id, self._on_error)
        self.trust_watermarks = settings.kafka_trust_watermarks
        self.batch_max = max(1, settings.consume_batch_max)
        self.leases: PartitionLeases | None = None
        self.rewinds = 0  # partitions read again from their committed offset or start
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"consumer-{group_id}")
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Future[Any]] = set()
        # Below: touched only on the executor thread (or before it starts, or after it ended).
        self._epochs: dict[PartitionKey, int] = {}
        self._outcome: _Outcome | None = None
        self._brokers_lost = False
        self._positions_at_loss: dict[PartitionKey, int] | None = None
        self._next_log_check = time.monotonic() + self.log_check_every_s
        # The client's librdkafka threads yield the CPU to the worker's own (ADR 0020).
        self._threads = OwnKafkaThreads(settings.kafka_thread_priority)
        self._last_record_at: float | None = None
        self._errors = LogThrottle()

    # -- the event loop's side ----------------------------------------------------------------

    async def start(self) -> None:
        """Create the client, take partitions (leases: after the first lease pass), call
        `on_ready` once partitions are owned, and start the loop."""
        self._loop = asyncio.get_running_loop()
        self._consumer = await self._call(self._new_client)
        if self.settings.partition_ownership == "lease":
            partitions = await self._call(self._describe)
            self.leases = PartitionLeases(self.settings, self.group_id, partitions,
                                          self._reassign)
            await self.leases.start()
            await self.leases.wait_first_pass()
            if self.on_ready is not None:
                await self.on_ready()
        else:
            await self._call(self._subscribe)
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group_id}")

    async def stop(self) -> None:
        """Let a batch in hand finish (up to `stop_grace_s`), commit it, close the client, then
        give the leases back: a partition is never read without its lease."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.stop_grace_s)
            except TimeoutError:
                log.warning("consumer %s: a batch was still in hand after %.0f s; cancelled "
                            "(it is read again)", self.group_id, self.stop_grace_s)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        leases, self.leases = self.leases, None
        if leases is not None:
            leases.on_change = _ignore_changes  # the client is closing with its assignment
        try:
            if self._consumer is not None:
                await self._call(self._close)
        finally:
            self._executor.shutdown(wait=False)
            if leases is not None:
                await leases.stop()

    @property
    def running(self) -> bool:
        """Whether the loop runs (it ends only when stopped)."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, spans = await self._call(self._next_batch)
            except Exception:
                # Not expected from librdkafka (it reports trouble as events); never the end of
                # the loop, whatever it is.
                log.exception("consumer %s: reading failed; trying again", self.group_id)
                await self._pause(1.0)
                continue
            if not raw or self._stopping.is_set():
                continue  # a batch read while stopping is not handled, nor committed
            batch = [Consumed.from_confluent(message) for message in raw]
            try:
                await self.handler(batch)
            except Exception:
                log.exception("batch of %d from %s failed; it will be redelivered", len(batch),
                              self.group_id)
                self._outcome = _Outcome(spans, handled=False)
                await self._pause(self.retry_pause_s)
            else:
                self._outcome = _Outcome(spans, handled=True)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, function, *args)

    async def _reassign(self, acquired: Sequence[Partition], released: Sequence[Partition]
                        ) -> None:
        """Apply lease changes to the client (called by `PartitionLeases`)."""
        await self._call(self._apply_leases, acquired, released)

    def _ready_from_thread(self) -> None:
        """The group assigned partitions (called on the executor thread, inside a poll)."""
        if self.on_ready is None or self._loop is None:
            return
        on_ready = self.on_ready

        def schedule() -> None:
            future = asyncio.ensure_future(on_ready())
            self._background.add(future)
            future.add_done_callback(self._background.discard)

        self._loop.call_soon_threadsafe(schedule)

    # -- the executor thread's side -----------------------------------------------------------

    @property
    def client(self) -> Consumer:
        assert self._consumer is not None, "the consumer is not started"
        return self._consumer

    def _new_client(self) -> Consumer:
        self._threads.client_starting()
        return Consumer(self.config, logger=log)

    def _describe(self) -> list[Partition]:
        metadata = self.client.list_topics(timeout=10)
        found: list[Partition] = []
        for name in self.topics:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                raise BusError(f"topic {name} is missing: create it first (ensure_topics)")
            found += [Partition(name, p) for p in sorted(topic.partitions)]
        return found

    def _subscribe(self) -> None:
        def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            self._bump(partitions)  # they start from the committed offsets
            self._ready_from_thread()

        def on_revoke(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            self._bump(partitions)

        self.client.subscribe(self.topics, on_assign=on_assign, on_revoke=on_revoke,
                              on_lost=on_revoke)

    def _apply_leases(self, acquired: Sequence[Partition], released: Sequence[Partition]
                      ) -> None:
        if released:
            self.client.incremental_unassign(
                [TopicPartition(p.topic, p.partition) for p in released])
        if acquired:
            # No offset given: each partition resumes from the group's committed offset.
            assigned = [TopicPartition(p.topic, p.partition) for p in acquired]
            self._bump(assigned)
            self.client.incremental_assign(assigned)

    def _bump(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._epochs[key] = self._epochs.get(key, 0) + 1

    def _close(self) -> None:
        self._settle()
        self.client.close()

    def _next_batch(self) -> tuple[list[Message], dict[PartitionKey, _Span]]:
        """Settle the last batch, then read the next one, with its spans (empty: nothing came,
        or positions moved and the records read are read again from there)."""
        raw = self._read()
        return raw, self._spans(raw)

    def _spans(self, raw: Sequence[Message]) -> dict[PartitionKey, _Span]:
        spans: dict[PartitionKey, _Span] = {}
        for message in raw:
            key = (message.topic() or "", message.partition() or 0)
            offset = message.offset() or 0
            span = spans.get(key)
            spans[key] = (_Span(offset, offset + 1, self._epochs.get(key, 0)) if span is None
                          else _Span(min(span.first, offset), max(span.end, offset + 1),
                                     span.epoch))
        return spans

    def _read(self) -> list[Message]:
        # A zero-wait poll first serves the callbacks waiting (a lost broker among them), so
        # no batch is committed to a broker that restarted unnoticed (the residual window of
        # ADR 0007); it may return the next batch's first record.
        first = self._record_or_none(self.client.poll(0))
        if self._brokers_lost:
            self._resume_after_broker_loss()
            first = None  # read again from the resumed positions
        moved: set[PartitionKey] = set()
        if time.monotonic() >= self._next_log_check:
            # Before the settle: a batch of a log shortened under it is not committed.
            self._next_log_check = time.monotonic() + self.log_check_every_s
            moved = self._rewind_shortened_logs()
        moved |= self._settle()
        self._threads.tick()
        if first is not None and (first.topic(), first.partition()) in moved:
            first = None  # its partition was sought back: it comes again
        if first is None:
            first = self._record_or_none(self.client.poll(self.settings.consume_poll_s))
        if self._brokers_lost:
            self._resume_after_broker_loss()
            return []
        if first is None:
            self._check_starvation()
            return []
        self._last_record_at = time.monotonic()
        raw = [first]
        if self.batch_max > 1:
            raw += self.client.consume(num_messages=self.batch_max - 1, timeout=0)
        if self._brokers_lost:
            self._resume_after_broker_loss()
            return []
        return [message for message in raw if self._record_or_none(message) is not None]

    def _record_or_none(self, message: Message | None) -> Message | None:
        """The message if it is a record; an error event (an unknown topic, a failed fetch:
        no record, nothing skipped) is logged, at most once per `LogThrottle` interval."""
        if message is None:
            return None
        error = message.error()
        if error is None:
            return message
        left_out = self._errors.admit(error.code())
        if left_out is not None:
            log.warning("consumer %s: %s (%d more like it left out)", self.group_id, error,
                        left_out)
        return None

    def _settle(self) -> set[PartitionKey]:
        """Commit the last batch's offsets if its handler returned, or seek its partitions
        back to its first offsets if it raised; on each partition only if its epoch is still
        the batch's. Returns the partitions sought back."""
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            return set()
        current = {key: span for key, span in outcome.spans.items()
                   if self._epochs.get(key, 0) == span.epoch}
        if not current:
            return set()
        if outcome.handled:
            offsets = [TopicPartition(t, p, span.end) for (t, p), span in current.items()]
            try:
                # Sent by librdkafka's own thread; closing the client waits for it.
                self.client.commit(offsets=offsets, asynchronous=True)
            except KafkaException as error:
                # Not committed: read again later, which the inbox makes harmless.
                log.warning("consumer %s: commit failed: %s", self.group_id, error)
            return set()
        owned = {(tp.topic, tp.partition) for tp in self.client.assignment()}
        targets = [TopicPartition(t, p, span.first) for (t, p), span in current.items()
                   if (t, p) in owned]
        try:
            self._reposition(targets)
        except KafkaException as error:
            # Its committed offset is at or before the batch: resume from there instead.
            log.warning("consumer %s: cannot seek back a failed batch (%s); resuming from the "
                        "committed offsets", self.group_id, error)
            self._brokers_lost = True
        return {(tp.topic, tp.partition) for tp in targets}

    def _on_error(self, error: KafkaError) -> None:
        # Called by librdkafka on the executor thread, inside poll() or consume().
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_lost = True

    def _resume_after_broker_loss(self) -> None:
        """Every broker was lost (a restart, a crash, a network cut): read every owned
        partition again from what the broker now says was committed, never from where this
        consumer was. A broker that lost its logs, or their last seconds, has new records at
        offsets this consumer already passed; reading from its own position would skip them
        for ever (issue 9: 367 acknowledged requests never became sagas). A broker that kept
        everything costs a second reading of the uncommitted tail, which the inbox and the
        participants' stored replies make harmless. While the broker is still away, it is
        tried again at the next poll."""
        self._brokers_lost = False
        assignment = self.client.assignment()
        if not assignment:
            return
        if self._positions_at_loss is None:  # where it was, for the log and the count
            self._positions_at_loss = {(tp.topic, tp.partition): tp.offset
                                       for tp in self.client.position(assignment)}
        try:
            committed = self.client.committed(assignment, timeout=2)
            targets = [self._resume_target(tp) for tp in committed]
            self._reposition(targets)
        except KafkaException as error:
            self._brokers_lost = True  # still away: again at the next poll
            log.warning("cannot resume %s yet: %s", self.group_id, error)
            return
        self._bump(assignment)
        positions, self._positions_at_loss = self._positions_at_loss, None
        moved = [t for t in targets
                 if positions.get((t.topic, t.partition), -1) != t.offset]
        self._count_rewinds(moved, "every broker was lost")

    def _reposition(self, targets: Sequence[TopicPartition]) -> None:
        for target in targets:
            try:
                self.client.seek(target)
            except KafkaException:
                # A partition that has not started fetching cannot be sought; assigned again
                # with an offset, it starts there.
                bare = TopicPartition(target.topic, target.partition)
                self.client.incremental_unassign([bare])
                self.client.incremental_assign([target])

    def _resume_target(self, committed: TopicPartition) -> TopicPartition:
        """Where to read a partition again: its committed offset if the log still reaches it,
        else its start (a committed offset past the end belongs to a log that is gone)."""
        if committed.error is not None:
            raise KafkaException(committed.error)
        offset = committed.offset
        if offset >= 0 and self.trust_watermarks:
            low, high = self.client.get_watermark_offsets(
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

    def _rewind_shortened_logs(self) -> set[PartitionKey]:
        """Compare each owned partition's position with the end of its log: a position past
        the end means the log was shortened or re-created under a running consumer (a topic
        deleted and created again, retention, an unclean leader election); the partition is
        read again from its committed offset, or its start. Only where the broker's high
        watermark can be trusted (tansu's cannot: it reports ends below records it serves).
        Returns the partitions read again."""
        if not self.trust_watermarks:
            return set()
        try:
            shortened = []
            for tp in self.client.position(self.client.assignment()):
                if tp.offset < 0:
                    continue  # nothing fetched yet: it starts from the committed offset
                # As the last fetch response told it: no request on the hot path.
                _low, high = self.client.get_watermark_offsets(tp, cached=True)
                if 0 <= high < tp.offset:
                    shortened.append(tp)
            if not shortened:
                return set()
            committed = self.client.committed(shortened, timeout=2)
            targets = [self._resume_target(tp) for tp in committed]
            self._reposition(targets)
        except KafkaException as error:
            log.debug("cannot compare positions with the logs' ends: %s", error)
            return set()
        self._bump(targets)
        self._count_rewinds(targets, "its log is shorter than its position")
        return {(tp.topic, tp.partition) for tp in targets}

    def _count_rewinds(self, targets: Sequence[TopicPartition], why: str) -> None:
        if not targets:
            return
        self.rewinds += len(targets)
        CONSUMER_REWINDS.add(len(targets), {"group": self.group_id})
        where = ", ".join(
            f"{t.topic}[{t.partition}]@" + ("start" if t.offset < 0 else str(t.offset))
            for t in targets)
        log.warning("consumer %s reads %d partitions again because %s: %s", self.group_id,
                    len(targets), why, where)

    def _check_starvation(self) -> None:
        """Runs between polls that returned nothing.

        The embedded broker tansu (memory storage) scans a partition's log to answer a fetch,
        and answers *empty* if the scan outlasts fetch.wait.max.ms; the scan grows with the log
        (measured: a 1 ms wait fails from ~3,000 single-record batches, 5 ms from ~12,000), so
        a consumer with a short wait eventually starves for good while records wait (ADR 0003).
        When no record came for `stall_after_s` although the broker holds some past our
        position, the librdkafka client is rebuilt with twice the wait; its partitions resume
        from the committed offsets (everything after them is read again and deduplicated).
        """
        now = time.monotonic()
        if self._last_record_at is None:
            self._last_record_at = now
            return
        if now - self._last_record_at < self.stall_after_s:
            return
        self._last_record_at = now  # check again only after another quiet period
        wait_ms = int(self.config["fetch.wait.max.ms"])
        if wait_ms >= self.max_fetch_wait_ms or not self._records_waiting():
            return
        new_wait = min(wait_ms * 2, self.max_fetch_wait_ms)
        log.warning(
            "consumer %s got nothing for %.0f s while the broker holds records past its "
            "position: the broker cannot answer within fetch.wait.max.ms=%d ms; rebuilding the "
            "consumer with %d ms (set SAGA_KAFKA_FETCH_WAIT_MS to start there)",
            self.group_id, self.stall_after_s, wait_ms, new_wait)
        self.config = {**self.config, "fetch.wait.max.ms": new_wait}
        old, self._consumer = self._consumer, self._new_client()
        if old is not None:
            with contextlib.suppress(Exception):
                self._bump(old.assignment())  # the new client starts from the committed offsets
                old.close()
        if self.leases is not None:
            owned = [TopicPartition(p.topic, p.partition) for p in sorted(self.leases.owned)]
            self._bump(owned)
            self.client.assign(owned)
        else:
            self._subscribe()

    def _records_waiting(self) -> bool:
        """Whether the broker holds records past where this consumer reads. A partition with
        no position yet (nothing fetched since it was assigned) reads from its committed
        offset, or from the start of the log when its group committed none (comparing every
        such partition with the start of the log took each idle, freshly assigned consumer
        for a starved one: issue 9)."""
        try:
            assignment = self.client.assignment()
            committed = {(tp.topic, tp.partition): tp.offset
                         for tp in self.client.committed(assignment, timeout=2)}
            for tp in self.client.position(assignment):
                low, high = self.client.get_watermark_offsets(tp, timeout=2)
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
