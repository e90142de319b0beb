"""The orchestrator worker: consumes transfer requests and step replies, decides with the pure
core, and records everything a batch caused in one PostgreSQL transaction. Its offsets are
committed by the bus only after that transaction committed (see `orchestrator.bus`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID, uuid5

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from orchestrator import store
from orchestrator.bus import Consumed, encode_headers
from orchestrator.core import (
    Decision,
    RejectTransfer,
    SagaState,
    SagaStatus,
    StartTransfer,
    Verdict,
    decide_reject,
    decide_reply,
    decide_start,
    evolve,
    participant_of,
    saga_id_for_transfer,
)
from orchestrator.crash import crash_point, step_tags
from orchestrator.definition import SagaDefinition
from orchestrator.errors import ConcurrencyConflict, SagaError
from orchestrator.intake import Unparseable, classify
from orchestrator.metrics import DEAD_LETTERS, SAGAS_FAILED
from orchestrator.producer import MESSAGE_MAX_BYTES, KafkaProducer, Record, record_size
from orchestrator.relay import PublishedMarker, publish_committed
from orchestrator.sagas import TRANSFER
from orchestrator.settings import Settings
from orchestrator.throttle import LogThrottle
from schemas import (
    TOPIC_DEAD_LETTERS,
    TOPIC_REPLIES,
    TOPIC_TRANSFER_COMMANDS,
    DeadLetter,
    Direction,
    RejectionCode,
    StepCommand,
    StepReply,
    step_topic,
)

log = logging.getLogger(__name__)

CONSUMER = "orchestrator"
_DEAD_LETTER_NAMESPACE = UUID("0b5e9b1e-2a7c-4c55-9e4f-6d0f3a8c1b22")
REDRIVE_HEADER = "saga-redrive-id"
# How many sagas' states the orchestrator keeps for its known-state path (the least recently
# written go first).
KNOWN_SAGAS_MAX = 20_000


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, SagaError) and error.retryable


def is_transient(error: BaseException) -> bool:
    """Infrastructure trouble (database or broker away, a lost race) that says nothing about
    the messages: the batch is redelivered until it passes, never set aside."""
    return is_retryable(error) or store.is_transient_db_error(error)


# Sets one record aside: (record, the error, tries, time of the first failure).
SetAside = Callable[[Consumed, BaseException, int, datetime], Awaitable[None]]


async def handle_isolating_poison(
    batch: Sequence[Consumed],
    handle: Callable[[Sequence[Consumed]], Awaitable[None]],
    set_aside: SetAside,
    attempts: int = 3,
) -> None:
    """Handle `batch`; if it fails for a reason that is not transient, find the record(s) that
    make it fail and set them aside (dead-letter them) so that the rest of the partition goes
    on. A poison record would otherwise be redelivered forever and block its partition.

    The batch's transaction was rolled back, so each record is handled again on its own; one
    that fails `attempts` times in a row is set aside. Transient errors propagate: the batch is
    redelivered and nothing is dead-lettered for an outage."""
    try:
        await handle(batch)
        return
    except Exception as error:
        if is_transient(error):
            raise
        log.warning("a batch of %d failed (%s: %s); handling its records one by one to find "
                    "the poison", len(batch), type(error).__name__, error)
    for message in batch:
        first_failed_at: datetime | None = None
        for attempt in range(1, attempts + 1):
            try:
                await handle([message])
                break
            except Exception as error:
                if is_transient(error):
                    raise
                first_failed_at = first_failed_at or datetime.now(UTC)
                if attempt < attempts:
                    await asyncio.sleep(0.05 * attempt)
                    continue
                log.error("setting aside the record at %s/%s/%s after %d failures: %s: %s",
                          message.topic, message.partition, message.offset, attempts,
                          type(error).__name__, error)
                await set_aside(message, error, attempts, first_failed_at)
                DEAD_LETTERS.add(1, {"stage": "poison",
                                     "reason": RejectionCode.PROCESSING_FAILED.value})


def poison_dead_letter(settings: Settings, stage: str, message: Consumed, error: BaseException,
                       attempts: int, first_failed_at: datetime
                       ) -> tuple[store.DeadLetterRow, store.OutboxRow, str]:
    """The dead letter of a record that kept failing: its row, its DLQ record, its message id."""
    now = datetime.now(UTC)
    message_id = message_id_of(message)
    letter = dead_letter_for(message, RejectionCode.PROCESSING_FAILED,
                             f"{type(error).__name__}: {error}"[:2000],
                             f"{stage}.{type(error).__qualname__}", now,
                             message_id=message_id).model_copy(
        update={"attempts": attempts, "first_failed_at": first_failed_at})
    record = dead_letter_record(settings, message, letter)
    row = store.DeadLetterRow(
        dead_letter_id=letter.dead_letter_id, stage=stage,
        reason_code=letter.reason_code.value, reason=letter.reason,
        error_class=letter.error_class, original_topic=message.topic,
        original_partition=message.partition, original_offset=message.offset,
        original_key=letter.original_key, payload=message.value,
        headers=encode_headers(message.headers), failed_at=now, saga_id=None,
        transfer_id=None, attempts=attempts, first_failed_at=first_failed_at)
    outbox = store.OutboxRow(record.topic, record.key, record.value,
                             encode_headers(record.headers), None)
    return row, outbox, message_id


def command_row(settings: Settings, definition: SagaDefinition, command: StepCommand
                ) -> store.OutboxRow:
    """The outbox row of a step command: on its participant's topic, keyed by the saga (one
    partition keeps a saga's commands in order), its command id as the message id."""
    return store.OutboxRow(
        topic=settings.topic(step_topic(participant_of(definition, command))),
        key=str(command.saga_id).encode(),
        value=command.model_dump_json().encode(),
        headers=encode_headers([("message-id", str(command.command_id).encode()),
                                ("type", b"StepCommand")]),
        saga_id=command.saga_id,
    )


def retrying(attempts: int = 5) -> AsyncRetrying:
    """Bounded retries for races and transient faults at the edges; never forever."""
    return AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        reraise=True,
    )


def message_id_of(message: Consumed) -> str:
    """Identity of an intake record: its content (plus a redrive id, so a redriven copy of a
    dead letter is a new message). Broker coordinates are not stable: a memory broker that
    restarts hands out the same offsets again."""
    digest = hashlib.sha256(message.value)
    redrive = message.header(REDRIVE_HEADER)
    if redrive:
        digest.update(b"\0redrive:" + redrive.encode())
    return "sha256:" + digest.hexdigest()


def dead_letter_record(settings: Settings, message: Consumed, letter: DeadLetter) -> Record:
    """The DLQ record: the original bytes and headers, plus `dlq-*` headers saying why;
    shortened if it would not fit (`fit_dead_letter`)."""
    return fit_dead_letter(settings.topic(TOPIC_DEAD_LETTERS), message.value, message.key,
                           message.headers, letter)


# What a dead letter's copy may weigh (value, key and headers): a tenth under the producer's
# `message.max.bytes`, which also counts the record's and its batch's framing.
DEAD_LETTER_MAX_BYTES = MESSAGE_MAX_BYTES * 9 // 10
# A `dlq-*` header value is cut to this in a copy that fits no other way (a reason or an
# original key of hundreds of kilobytes): the full text is in the `dead_letters` row.
_HEADER_VALUE_MAX_BYTES = 1024


def fit_dead_letter(topic: str, value: bytes, key: bytes | None,
                    headers: Sequence[tuple[str, bytes]], letter: DeadLetter,
                    limit: int = DEAD_LETTER_MAX_BYTES) -> Record:
    """The dead letter's record on `topic`: the original value, key and headers plus the
    letter's `dlq-*` headers, or, if that is over `limit` bytes, a shortened copy that still
    tells what failed, where and why: the letter's headers with the original's size and SHA-256
    added, the original key and headers if they fit, and as much of the value's start as fits.
    A copy larger than the producer's limit would be refused on every relay pass; the whole
    original stays in the `dead_letters` table, which the redrive reads."""
    whole = Record(topic, value, key, (*headers, *letter.to_headers()))
    if record_size(whole) <= limit:
        return whole
    described = letter.model_copy(update={
        "original_size_bytes": len(value),
        "original_sha256": hashlib.sha256(value).hexdigest()}).to_headers()
    # The smallest copy first; then what is left of the budget goes to the value.
    copy = Record(topic, b"", key, (*headers, *described))
    if record_size(copy) > limit:  # the original headers alone are too large: leave them out
        copy = Record(topic, b"", key, tuple(described))
    if record_size(copy) > limit:  # so is the key, or a header of the letter: cut them
        copy = Record(topic, b"", None, tuple(
            (name, content[:_HEADER_VALUE_MAX_BYTES]) for name, content in described))
    room = limit - record_size(copy)
    return Record(topic, value[:room], copy.key, copy.headers)


def dead_letter_for(
    message: Consumed,
    code: RejectionCode,
    reason: str,
    error_class: str,
    now: datetime,
    saga_id: UUID | None = None,
    transfer_id: UUID | None = None,
    message_id: str = "",
) -> DeadLetter:
    return DeadLetter(
        # Derived from the record's coordinates and content, so reprocessing the same record
        # after a crash does not dead-letter it twice, while two records never share an id.
        dead_letter_id=uuid5(_DEAD_LETTER_NAMESPACE,
                             f"{message.topic}:{message.partition}:{message.offset}:"
                             f"{message_id}:{code.value}"),
        reason_code=code,
        reason=reason,
        error_class=error_class,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        original_key=message.key.decode(errors="replace") if message.key is not None else None,
        first_failed_at=now,
        last_failed_at=now,
        saga_id=saga_id,
        transfer_id=transfer_id,
    )


@dataclass
class _BatchWrites:
    inbox: list[store.InboxRow] = field(default_factory=list)
    events: list[store.NewEvent] = field(default_factory=list)
    outbox: list[store.OutboxRow] = field(default_factory=list)
    dead_letters: list[store.DeadLetterRow] = field(default_factory=list)
    touched: dict[UUID, SagaState] = field(default_factory=dict)


@dataclass
class _Parsed:
    message: Consumed
    message_id: str
    saga_id: UUID | None
    input: StartTransfer | RejectTransfer | Unparseable | StepReply


class OrchestratorWorker:
    def __init__(self, settings: Settings, engine: AsyncEngine, producer: KafkaProducer,
                 definition: SagaDefinition = TRANSFER) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.marker = PublishedMarker(engine)
        self._throttle = LogThrottle()  # for a publish failure that repeats every batch
        # The state of each saga as this worker last committed it (see `_record`), and the
        # connection for the one-statement writes of the known-state path.
        self.known: OrderedDict[UUID, SagaState] = OrderedDict()
        self.held = store.HeldConnection(engine)
        self.definition = definition
        self.actor = settings.worker_name or "orchestrator"
        self.commands_topic = settings.topic(TOPIC_TRANSFER_COMMANDS)
        self.replies_topic = settings.topic(TOPIC_REPLIES)

    @property
    def topics(self) -> list[str]:
        return [self.commands_topic, self.replies_topic]

    async def handle_batch(self, batch: Sequence[Consumed]) -> None:
        """The subscriber's entry point: process the batch, setting aside poison records."""
        await handle_isolating_poison(batch, self.process_batch, self._set_aside)

    async def _set_aside(self, message: Consumed, error: BaseException, attempts: int,
                         first_failed_at: datetime) -> None:
        row, outbox, message_id = poison_dead_letter(self.settings, "orchestrator", message,
                                                     error, attempts, first_failed_at)
        inbox = store.InboxRow(message_id=message_id, topic=message.topic,
                               partition=message.partition, offset=message.offset,
                               verdict="dead_lettered", saga_id=None)
        async with self.engine.begin() as conn:
            await store.write_batch(conn, CONSUMER, [inbox], [], [], [outbox], [row],
                                    datetime.now(UTC))

    async def process_batch(self, batch: Sequence[Consumed]) -> None:
        parsed = [self._parse(message) for message in batch]
        tags = step_tags((p.input.step, p.input.direction.value) if isinstance(p.input, StepReply)
                         else ("intake", "forward") for p in parsed)
        crash_point("orchestrator.after_consume", tags)
        outbox_ids: list[int] = []
        outbox: list[store.OutboxRow] = []
        async for attempt in retrying():
            with attempt:
                outbox_ids, outbox = await self._record(parsed, tags)
        crash_point("orchestrator.after_commit", tags)
        if not outbox:
            crash_point("orchestrator.after_produce", tags)
            return
        # The fast path: publish what this batch committed now, rather than waiting for the
        # relay.
        await publish_committed(self.producer, self.marker, self._throttle, outbox, outbox_ids,
                                "fast-path")
        crash_point("orchestrator.after_produce", tags)

    async def close(self) -> None:
        await self.marker.close()
        await self.held.close()

    def _parse(self, message: Consumed) -> _Parsed:
        if message.topic == self.replies_topic:
            try:
                reply = StepReply.model_validate_json(message.value)
            except ValidationError as error:
                return _Parsed(message, message_id_of(message), None,
                               Unparseable(RejectionCode.SCHEMA_VIOLATION,
                                           f"not a StepReply: {error.errors()[0]['msg']}"))
            message_id = f"reply:{reply.reply_id}"
            redrive = message.header(REDRIVE_HEADER)
            if redrive:  # an operator redrove it: a new message, decided once more
                message_id += f":redrive:{redrive}"
            return _Parsed(message, message_id, reply.saga_id, reply)
        intake = classify(message.value, message.timestamp_ms)
        saga_id = None
        if isinstance(intake, StartTransfer):
            saga_id = saga_id_for_transfer(intake.request.transfer_id)
        elif isinstance(intake, RejectTransfer):
            saga_id = saga_id_for_transfer(intake.transfer_id)
        return _Parsed(message, message_id_of(message), saga_id, intake)

    async def _record(self, parsed: Sequence[_Parsed], tags: Sequence[str] = ()
                      ) -> tuple[list[int], list[store.OutboxRow]]:
        """Decide the batch and record everything it caused at once; returns the new outbox
        rows and their ids.

        The known-state path skips the read: the states come from what this worker last committed
        (`known`; a new saga has none) and the writes go in one autocommitted statement, one
        round trip instead of four (BEGIN, read, write, COMMIT) on every hop of a saga. It is
        safe because the database fences every write anyway: an event takes the next `seq`
        under the key (saga_id, seq) and a message its inbox key, so if anyone else moved a
        saga on (the recovery worker, another instance, a redrive) or the batch was recorded
        before (a redelivery), the statement fails whole on a unique key and the batch is
        decided again on the careful path, from what the database holds."""
        now = datetime.now(UTC)
        writes = self._decide_from_known(parsed, now)
        if writes is not None:
            crash_point("orchestrator.before_commit", tags)  # as in a transaction: nothing written
            try:
                async with self.held.use() as conn:
                    ids = await store.write_batch(
                        conn, CONSUMER, writes.inbox, writes.events,
                        list(writes.touched.values()), writes.outbox, [], now)
            except ConcurrencyConflict:
                for item in parsed:
                    if item.saga_id is not None:
                        self.known.pop(item.saga_id, None)
                log.info("the known-state path lost a race on a batch of %d; deciding it "
                         "again from the database", len(parsed))
            else:
                self._committed(writes)
                return ids, writes.outbox
        writes = _BatchWrites()
        async with self.engine.begin() as conn:
            seen, states = await store.seen_and_states(
                conn, CONSUMER, [p.message_id for p in parsed],
                sorted({p.saga_id for p in parsed if p.saga_id is not None}),
            )
            for item in parsed:
                if item.message_id in seen:
                    continue  # redelivered after a crash, or a byte-identical duplicate
                seen.add(item.message_id)
                state = states.get(item.saga_id) if item.saga_id else None
                decision = self._decide(item, state, now)
                self._apply(item, state, decision, now, writes, states)
            ids = await store.write_batch(
                conn, CONSUMER, writes.inbox, writes.events, list(writes.touched.values()),
                writes.outbox, writes.dead_letters, now,
            )
            crash_point("orchestrator.before_commit", tags)
        self._committed(writes)
        return ids, writes.outbox

    def _decide_from_known(self, parsed: Sequence[_Parsed], now: datetime) -> _BatchWrites | None:
        """The batch's writes decided from `known` states, or None when the careful path must
        decide it: a reply for a saga this worker has not written, a message that changes no
        saga (its decision would have no event, whose key fences it), or anything that is
        dead-lettered (a second statement). Every message on this path appends an event
        whose `seq` is one past the known version, so the write fails on that key if the saga
        moved on since; a new saga's first event is `seq` 1, so a start for a saga that exists
        fails the same way."""
        states: dict[UUID, SagaState] = {}
        for item in parsed:
            if isinstance(item.input, StepReply):
                if item.saga_id is None or item.saga_id not in self.known:
                    return None
            elif not isinstance(item.input, StartTransfer):
                return None
            if item.saga_id is not None and item.saga_id in self.known:
                states[item.saga_id] = self.known[item.saga_id]
        writes = _BatchWrites()
        seen: set[str] = set()
        for item in parsed:
            if item.message_id in seen:
                continue
            seen.add(item.message_id)
            state = states.get(item.saga_id) if item.saga_id else None
            decision = self._decide(item, state, now)
            if not decision.events:
                # A stale or duplicate reply: without an event to write there is no key to
                # fence a stale decision with, so the database decides it.
                return None
            self._apply(item, state, decision, now, writes, states)
        return None if writes.dead_letters else writes

    def _committed(self, writes: _BatchWrites) -> None:
        for row in writes.dead_letters:
            DEAD_LETTERS.add(1, {"stage": row.stage, "reason": row.reason_code})
        for state in writes.touched.values():
            if state.status is SagaStatus.FAILED:
                SAGAS_FAILED.add(1, {"stage": "orchestrator"})
            if state.terminal:
                self.known.pop(state.saga_id, None)  # a late reply takes the careful path
                continue
            self.known[state.saga_id] = state
            self.known.move_to_end(state.saga_id)
        while len(self.known) > KNOWN_SAGAS_MAX:
            self.known.popitem(last=False)

    def _decide(self, item: _Parsed, state: SagaState | None, now: datetime) -> Decision:
        value = item.input
        if isinstance(value, StartTransfer):
            return decide_start(self.definition, state, value, now)
        if isinstance(value, RejectTransfer):
            return decide_reject(state, value)
        if isinstance(value, StepReply):
            return decide_reply(self.definition, state, value, now)
        return Decision(Verdict.REJECTED, rejection=(value.code, value.reason))

    def _apply(self, item: _Parsed, state: SagaState | None, decision: Decision, now: datetime,
               writes: _BatchWrites, states: dict[UUID, SagaState]) -> None:
        for event in decision.events:
            state = evolve(state, event)
            writes.events.append(store.NewEvent(state.saga_id, state.version, event, self.actor,
                                                item.message_id))
        if state is not None and decision.events:
            states[state.saga_id] = state
            writes.touched[state.saga_id] = state
        writes.outbox += [command_row(self.settings, self.definition, command)
                          for command in decision.commands]
        rejection = decision.rejection
        if decision.saga_failed and state is not None:
            code = (RejectionCode.COMPENSATION_FAILED if state.direction is Direction.COMPENSATE
                    else RejectionCode.FAILED_AFTER_PIVOT)
            rejection = (code, state.failure or "saga failed")
        if rejection is not None:
            self._dead_letter(item, state, rejection, now, writes)
        writes.inbox.append(store.InboxRow(
            message_id=item.message_id, topic=item.message.topic,
            partition=item.message.partition, offset=item.message.offset,
            verdict=decision.verdict.value, saga_id=state.saga_id if state else item.saga_id,
        ))

    def _dead_letter(self, item: _Parsed, state: SagaState | None,
                     rejection: tuple[RejectionCode, str], now: datetime,
                     writes: _BatchWrites) -> None:
        code, reason = rejection
        transfer_id = None
        if isinstance(item.input, StartTransfer):
            transfer_id = item.input.request.transfer_id
        elif isinstance(item.input, RejectTransfer):
            transfer_id = item.input.transfer_id
        elif state is not None:
            transfer_id = state.transfer_id
        stage = "reply" if item.message.topic == self.replies_topic else "intake"
        letter = dead_letter_for(item.message, code, reason, f"{stage}.{code.value}", now,
                                 saga_id=item.saga_id, transfer_id=transfer_id,
                                 message_id=item.message_id)
        record = dead_letter_record(self.settings, item.message, letter)
        writes.dead_letters.append(store.DeadLetterRow(
            dead_letter_id=letter.dead_letter_id, stage=stage, reason_code=code.value,
            reason=reason, error_class=letter.error_class, original_topic=item.message.topic,
            original_partition=item.message.partition, original_offset=item.message.offset,
            original_key=letter.original_key, payload=item.message.value,
            headers=encode_headers(item.message.headers), failed_at=now,
            saga_id=item.saga_id, transfer_id=transfer_id,
        ))
        writes.outbox.append(store.OutboxRow(record.topic, record.key, record.value,
                                             encode_headers(record.headers), item.saga_id))
        log.warning("dead-lettered %s record at %s/%s: %s: %s", stage, item.message.partition,
                    item.message.offset, code.value, reason)
