"""The client for upstream services: publish a saga's start request, await its outcome event.

    async with SagaClient(bootstrap, [TRANSFER_TYPE]) as client:
        outcome = await client.submit(TRANSFER_TYPE, request, timeout_s=30)
        if outcome.outcome == "completed": ...

It speaks only Kafka, as an upstream service does: it publishes the request to the saga type's
start topic (keyed by its business key) and reads the type's events topic (`schemas.outcomes`).

How a request and its outcome meet (docs/client.md, ADR 0014):

- The client positions its reader at the end of each events topic *before* its first publish
  (the high watermarks, read explicitly: a lazy "latest" could resolve after the outcome was
  published), and registers each request's waiter before publishing it. So every outcome
  published after a submit is seen.
- An outcome published *before* a submit (the same request sent earlier, by this client or
  another, and ended since) is published again by the orchestrator when the request arrives
  again: it answers a start request of an ended saga with the same outcome event (same
  `event_id`). So submitting the same request twice returns the same outcome, and the events
  topic never has to be read from its start.
- A waiter takes the first outcome on its saga type and business key whose `request_hash` is its
  request's (or None: a request that could not be read): a conflicting request on the same key
  gets its own `rejected` answer, and the saga already there keeps its own outcome.

`submit` raises `OutcomeTimeout` when no outcome came in time; the request was published, and
submitting it again is safe (the orchestrator deduplicates by business key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel, ValidationError

from orchestrator.core.saga import request_hash
from orchestrator.core.saga_type import SagaType
from orchestrator.errors import ConfigurationError, OutcomeTimeout
from orchestrator.kafka.producer import DELIVERY_TIMEOUT_S, delivery_error
from orchestrator.kafka.threads import OwnKafkaThreads
from orchestrator.settings import Settings
from schemas import SAGA_OUTCOME_ADAPTER, SagaOutcome

log = logging.getLogger(__name__)

_POLL_S = 0.05
_BATCH_MAX = 500


@dataclass(frozen=True)
class Submitted:
    """A request the client published: what its outcome will be matched by."""

    saga_type: str
    business_key: str
    request_hash: str


class SagaClient:
    """Publishes start requests of the given saga types and awaits their outcomes.

    One client serves any number of concurrent `submit`s (one producer, one reader of the events
    topics, a waiter per request). Use it as an async context manager, or `start` and `close`.
    """

    def __init__(self, settings: Settings, saga_types: Iterable[SagaType[Any]],
                 client_id: str = "saga-client", ready_timeout_s: float = 30.0) -> None:
        if not settings.kafka_bootstrap:
            raise ConfigurationError("the client needs the Kafka bootstrap servers")
        self._settings = settings
        self._types = {saga_type.name: saga_type for saga_type in saga_types}
        if not self._types:
            raise ConfigurationError("the client needs at least one saga type")
        self._client_id = client_id
        self._ready_timeout_s = ready_timeout_s
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        # Every librdkafka call of the reader on one thread: they never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saga-client")
        self._waiters: dict[tuple[str, str],
                            list[tuple[str | None, asyncio.Future[SagaOutcome]]]] = {}
        self._reader: asyncio.Task[None] | None = None
        # Each events topic (prefixed) -> its saga type: a record's topic and key find its
        # waiters before its value is parsed.
        self._topic_types = {settings.topic(t.events_topic): t.name
                             for t in self._types.values()}
        self._stopping = False
        # This client's librdkafka threads yield the CPU to the application's (ADR 0020); the
        # application's own Kafka clients are left alone.
        self._threads = OwnKafkaThreads(settings.kafka_thread_priority)

    @classmethod
    def connect(cls, bootstrap: str, saga_types: Iterable[SagaType[Any]],
                topic_prefix: str = "", **kwargs: Any) -> SagaClient:
        """A client for the broker at `bootstrap`, with the deployment's topic prefix."""
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=topic_prefix)
        return cls(settings, saga_types, **kwargs)

    async def __aenter__(self) -> SagaClient:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    def events_topic(self, saga_type: SagaType[Any]) -> str:
        return self._settings.topic(saga_type.events_topic)

    async def start(self) -> None:
        """Connect, and position the reader at the current end of every events topic: every
        outcome published from now on is read."""
        if self._reader is not None:
            return
        loop = asyncio.get_running_loop()
        # Idempotent, as the workers' producer; a request's delivery report is served by the
        # reader's loop, so a publish does not wait for it (a failed one fails its outcome).
        producer = Producer({
            "bootstrap.servers": self._settings.kafka_bootstrap,
            "client.id": self._client_id, "enable.idempotence": True, "acks": "all",
            "linger.ms": 0, "message.timeout.ms": DELIVERY_TIMEOUT_S * 1000,
            "allow.auto.create.topics": False})
        self._producer = producer
        # Only the reader's librdkafka threads yield the CPU (ADR 0020): it is the one that
        # spins against a broker answering empty fetches at once; a request goes out as soon as
        # it is produced. The producer's threads (one per broker, started once it has the
        # cluster's metadata) exist before the reader's are told apart by when they appeared.
        try:
            await loop.run_in_executor(self._executor, partial(producer.list_topics,
                                                               timeout=self._ready_timeout_s))
        except KafkaException as error:
            await self.close()
            raise ConfigurationError(f"no Kafka broker answers at "
                                     f"{self._settings.kafka_bootstrap}: {error}") from error
        self._threads.client_starting()
        consumer = Consumer({
            "bootstrap.servers": self._settings.kafka_bootstrap,
            # Offsets are never committed: the client positions itself on each start.
            "group.id": f"{self._client_id}-{uuid.uuid4()}",
            "enable.auto.commit": False,
            # A broker that lost its log (the embedded one, restarted) puts the position past
            # the new end: read the log again rather than skip what is published again there.
            "auto.offset.reset": "earliest",
            "allow.auto.create.topics": False,
            "fetch.wait.max.ms": self._settings.kafka_fetch_wait_ms,
            "topic.metadata.refresh.interval.ms": 1000,
        })
        self._consumer = consumer
        topics = [self.events_topic(t) for t in self._types.values()]
        try:
            positions = await loop.run_in_executor(self._executor, self._ends, consumer, topics)
            await loop.run_in_executor(self._executor, consumer.assign, positions)
        except BaseException:
            await self.close()
            raise
        self._reader = asyncio.create_task(self._read(), name="saga-client-outcomes")

    def _ends(self, consumer: Consumer, topics: list[str]) -> list[TopicPartition]:
        """Each partition of `topics` at its high watermark, waiting for topics the workers
        have not created yet."""
        deadline = time.monotonic() + self._ready_timeout_s
        positions: list[TopicPartition] = []
        for topic in topics:
            while True:
                try:
                    metadata = consumer.list_topics(topic, timeout=5.0).topics.get(topic)
                except KafkaException as error:
                    metadata, problem = None, str(error)
                else:
                    problem = "no such topic"
                if metadata is not None and metadata.error is None and metadata.partitions:
                    break
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"events topic {topic} is not on the broker after "
                        f"{self._ready_timeout_s} s ({problem}): are the workers running?")
                time.sleep(0.2)
            for partition in sorted(metadata.partitions):
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                         timeout=10.0)
                positions.append(TopicPartition(topic, partition, high))
        return positions

    async def close(self) -> None:
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        for waiters in list(self._waiters.values()):
            for _, future in list(waiters):
                if not future.done():
                    future.cancel()
        self._waiters.clear()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, consumer.close)
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.get_running_loop().run_in_executor(None, producer.flush, 5)
        self._executor.shutdown(wait=False)

    def _saga_type(self, saga_type: SagaType[Any] | str) -> SagaType[Any]:
        name = saga_type if isinstance(saga_type, str) else saga_type.name
        if name not in self._types:
            raise ConfigurationError(f"this client was not given saga type {name!r}")
        return self._types[name]

    def expect(self, saga_type: SagaType[Any] | str, business_key: str,
               request_hash: str | None = None) -> asyncio.Future[SagaOutcome]:
        """The future of the next outcome on `business_key` that answers the request with
        `request_hash` (None: any outcome on the key). Register it *before* publishing the
        request: an outcome read before its waiter exists is not kept. For requests this
        client does not publish itself (a producer of raw bytes, a test)."""
        if self._reader is None:
            raise ConfigurationError("start the client first (async with SagaClient(...))")
        kind = self._saga_type(saga_type)
        future: asyncio.Future[SagaOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((kind.name, business_key), []).append(
            (request_hash, future))
        future.add_done_callback(
            lambda done: self._forget(kind.name, business_key, done))
        return future

    async def publish(self, saga_type: SagaType[Any] | str, request: BaseModel
                      ) -> tuple[Submitted, asyncio.Future[SagaOutcome]]:
        """Publish `request` and return what identifies it with the future of its outcome
        (registered before the publish, so the outcome cannot slip past)."""
        if self._producer is None or self._reader is None:
            raise ConfigurationError("start the client first (async with SagaClient(...))")
        kind = self._saga_type(saga_type)
        if not isinstance(request, kind.start_model):
            raise TypeError(f"a {kind.name} saga starts with a {kind.start_model.__name__}, "
                            f"not a {type(request).__name__}")
        submitted = Submitted(kind.name, kind.key_of(request), request_hash(request))
        future = self.expect(kind, submitted.business_key, submitted.request_hash)
        loop = asyncio.get_running_loop()
        topic = self._settings.topic(kind.start_topic)

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            # On the thread that polled the producer: hand the refusal to the event loop.
            if error is not None:
                loop.call_soon_threadsafe(_fail, future, delivery_error(error, topic))

        while True:
            try:
                self._producer.produce(topic, key=submitted.business_key.encode(),
                                       value=request.model_dump_json().encode(),
                                       on_delivery=on_delivery)
                break
            except BufferError:  # the local queue is full: let deliveries drain
                await asyncio.sleep(0.01)
            except KafkaException as error:
                future.cancel()
                raise delivery_error(error.args[0], topic) from error
        return submitted, future

    async def submit(self, saga_type: SagaType[Any] | str, request: BaseModel,
                     timeout_s: float = 30.0) -> SagaOutcome:
        """Publish `request` and return its outcome event; OutcomeTimeout if none came within
        `timeout_s` (submitting the same request again is safe)."""
        submitted, future = await self.publish(saga_type, request)
        return await self.wait(submitted.saga_type, submitted.business_key, future, timeout_s)

    @staticmethod
    async def wait(saga_type: str, business_key: str, future: asyncio.Future[SagaOutcome],
                   timeout_s: float) -> SagaOutcome:
        """`future`'s outcome; OutcomeTimeout (and the waiter dropped) after `timeout_s`."""
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise OutcomeTimeout(
                f"no outcome for {saga_type} {business_key} within {timeout_s} s; the request"
                " was published, and submitting it again is safe") from None

    def _forget(self, saga_type: str, business_key: str,
                future: asyncio.Future[SagaOutcome]) -> None:
        key = (saga_type, business_key)
        waiters = [w for w in self._waiters.get(key, ()) if w[1] is not future]
        if waiters:
            self._waiters[key] = waiters
        else:
            self._waiters.pop(key, None)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stopping:
            self._threads.tick()
            try:
                messages = await loop.run_in_executor(self._executor, _take, consumer)
            except (KafkaException, RuntimeError) as error:
                log.warning("reading the events topics failed (%s); reading on", error)
                await asyncio.sleep(0.5)
                continue
            for message in messages:
                self._deliver(message)
            if self._producer is not None:
                self._producer.poll(0)  # serves the requests' delivery reports

    def _deliver(self, message: Message) -> None:
        if message.error() is not None:
            log.warning("events topic error: %s", message.error())
            return
        key = message.key()
        if not key:
            return
        business_key = key.decode() if isinstance(key, bytes) else str(key)
        waiters = self._waiters.get((self._topic_types.get(message.topic() or "", ""),
                                     business_key))
        if not waiters:
            return  # nobody here waits for it: the cheap path for others' outcomes
        try:
            outcome = SAGA_OUTCOME_ADAPTER.validate_json(message.value() or b"")
        except ValidationError as error:
            log.warning("not an outcome event on %s [%d] @%d: %s", message.topic(),
                        message.partition(), message.offset(), error.errors()[0]["msg"])
            return
        for wanted_hash, future in list(waiters):
            if future.done():
                continue
            if None in (outcome.request_hash, wanted_hash) or outcome.request_hash == wanted_hash:
                future.set_result(outcome)


def _fail(future: asyncio.Future[SagaOutcome], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


__all__ = ["SagaClient", "Submitted"]


def _take(consumer: Consumer) -> list[Message]:
    """The records waiting, as soon as there is one: block up to `_POLL_S` for the first, then
    take what else is queued without waiting. (`consume(n, timeout)` alone waits for n records
    or the whole timeout: every outcome would wait out the poll interval, +50 ms a saga.)"""
    first = consumer.poll(_POLL_S)
    if first is None:
        return []
    return [first, *consumer.consume(_BATCH_MAX - 1, 0)]

