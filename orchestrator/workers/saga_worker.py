"""The orchestrator worker: consumes the start messages of every saga type (each type's own
topic) and the step replies, decides with the pure core, and records everything a batch caused
in one PostgreSQL transaction. Its offsets are committed by the bus only after that transaction
committed (see `orchestrator.kafka.consumer`).

A start record is classified by the saga type whose start topic it arrived on; a reply is
decided on the definition its saga started on (its type and `definition_version`), so sagas of
an older version finish on it while new ones start on the current one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from opentelemetry.metrics import Histogram
from opentelemetry.trace import Span, SpanKind
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator import metrics, tracing
from orchestrator.consuming.handling import (
    REDRIVE_HEADER,
    dead_letter_for,
    dead_letter_record,
    handle_isolating_poison,
    message_id_of,
    poison_dead_letter,
    retrying,
)
from orchestrator.core.definition import SagaDefinition
from orchestrator.core.intake import Unparseable, classify, unreadable
from orchestrator.core.saga import (
    Decision,
    RejectSaga,
    SagaState,
    SagaStatus,
    StartSaga,
    Verdict,
    decide_reject,
    decide_reply,
    decide_start,
    evolve,
    participant_of,
)
from orchestrator.core.saga_type import SagaType, SagaTypes
from orchestrator.crash import crash_point, step_tags
from orchestrator.errors import ConcurrencyConflict
from orchestrator.kafka.consumer import Consumed, encode_headers
from orchestrator.kafka.producer import KafkaProducer
from orchestrator.logs import saga_fields
from orchestrator.metrics import DEAD_LETTERS, SAGA_DURATION, SAGAS_FAILED, STEP_LATENCY
from orchestrator.postgres import store
from orchestrator.settings import Settings
from orchestrator.throttle import LogThrottle
from orchestrator.tracing import TraceContext
from orchestrator.workers.relay import PublishedMarker, publish_committed
from schemas import (
    OUTCOME_RECORD_TYPE,
    TOPIC_REPLIES,
    Direction,
    RejectionCode,
    SagaOutcome,
    SagaRejected,
    SagaStarted,
    StepCommand,
    StepReply,
    step_topic,
)

log = logging.getLogger(__name__)

CONSUMER = "orchestrator"
# How many sagas' states the orchestrator keeps for its known-state path (the least recently
# written go first).
KNOWN_SAGAS_MAX = 20_000


def command_row(settings: Settings, definition: SagaDefinition, command: StepCommand,
                trace: TraceContext | None = None) -> store.OutboxRow:
    """The outbox row of a step command: on its participant's topic, keyed by the saga (one
    partition keeps a saga's commands in order), its command id as the message id, and the
    saga's trace context (kept in the row, so the relay publishes it too)."""
    headers = [("message-id", str(command.command_id).encode()), ("type", b"StepCommand")]
    if trace is not None:
        headers += trace.headers()
    return store.OutboxRow(
        topic=settings.topic(step_topic(participant_of(definition, command))),
        key=str(command.saga_id).encode(),
        value=command.model_dump_json().encode(),
        headers=encode_headers(headers),
        saga_id=command.saga_id,
    )


def traced_command_rows(settings: Settings, definition: SagaDefinition,
                        commands: Sequence[StepCommand], trace: TraceContext | None,
                        spans: list[Span]) -> list[store.OutboxRow]:
    """The outbox rows of a saga's commands, sent under its trace. With tracing on, each
    command is sent from a span of its own (a step attempt or compensation, under the saga's
    span), which `spans` collects for the caller to end once the rows are committed."""
    if not tracing.ENABLED or trace is None:
        return [command_row(settings, definition, command, trace) for command in commands]
    rows = []
    for command in commands:
        row = command_row(settings, definition, command)
        span = tracing.start_span(
            f"send {row.topic}", trace, SpanKind.PRODUCER,
            {**tracing.messaging_attributes("send", row.topic,
                                            message_id=str(command.command_id)),
             **tracing.saga_attributes(command.saga_type, command.saga_id, None, command.step,
                                       command.attempt, command.direction.value)})
        spans.append(span)
        rows.append(command_row(settings, definition, command,
                                tracing.context_of(span, trace)))
    return rows


def observe_ended(states: Iterable[SagaState], now: datetime) -> None:
    """Record the duration of each saga of `states` that is terminal: states written by one
    committed batch or pass, so each became terminal there (a terminal saga never changes)."""
    for state in states:
        if state.terminal and state.requested_at is not None:
            SAGA_DURATION.record((now - state.requested_at).total_seconds(), {
                "saga_type": state.saga_type, "outcome": state.status.value.lower()})


def outcome_row(settings: Settings, sagas: SagaTypes, outcome: SagaOutcome,
                trace: TraceContext | None = None) -> store.OutboxRow:
    """The outbox row of an outcome event: on its saga type's events topic, keyed by the
    business key (one partition keeps a key's outcomes in order), its event id as the message
    id, in the saga's trace (ADR 0015: upstream reads its outcome in the trace it started).
    Written in the transaction of the decision that made it, never on its own."""
    headers = [("message-id", str(outcome.event_id).encode()),
               ("type", OUTCOME_RECORD_TYPE.encode())]
    if trace is not None:
        headers += trace.headers()
    return store.OutboxRow(
        topic=settings.topic(sagas[outcome.saga_type].events_topic),
        key=outcome.business_key.encode(),
        value=outcome.model_dump_json().encode(),
        headers=encode_headers(headers),
        saga_id=outcome.saga_id,
    )


@dataclass
class _BatchWrites:
    inbox: list[store.InboxRow] = field(default_factory=list)
    events: list[store.NewEvent] = field(default_factory=list)
    outbox: list[store.OutboxRow] = field(default_factory=list)
    dead_letters: list[store.DeadLetterRow] = field(default_factory=list)
    touched: dict[UUID, SagaState] = field(default_factory=dict)
    # Each touched saga's trace context (pointing at its saga span), as stored and as sent.
    traces: dict[UUID, store.StoredTrace] = field(default_factory=dict)
    contexts: dict[UUID, TraceContext] = field(default_factory=dict)
    # The stored contexts the careful path read, for replies that came without one.
    stored: dict[UUID, store.StoredTrace] = field(default_factory=dict)
    # Only with tracing on: what each message decided, and the spans of the commands sent.
    handled: list[tuple[_Parsed, Decision, TraceContext | None]] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    # Histogram values to record once the batch committed (only while metrics record).
    observed: list[tuple[Histogram, float, dict[str, str]]] | None = None


@dataclass
class _Parsed:
    message: Consumed
    message_id: str
    saga_id: UUID | None
    input: StartSaga | RejectSaga | Unparseable | StepReply
    # The saga type whose start topic the record came from (None for a reply).
    saga_type: str | None = None
    # The trace context the record carried (W3C headers), if any.
    trace: TraceContext | None = None


class OrchestratorWorker:
    def __init__(self, settings: Settings, engine: AsyncEngine, producer: KafkaProducer,
                 sagas: Sequence[SagaType[Any]] | SagaTypes) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.marker = PublishedMarker(engine)
        self._throttle = LogThrottle()  # for a publish failure that repeats every batch
        # The state of each saga as this worker last committed it (see `_record`), and the
        # connection for the one-statement writes of the known-state path.
        self.known: OrderedDict[UUID, SagaState] = OrderedDict()
        self.held = store.HeldConnection(engine)
        self.sagas = sagas if isinstance(sagas, SagaTypes) else SagaTypes(sagas)
        self.actor = settings.worker_name or "orchestrator"
        # Each saga type's start topic (prefixed, as consumed) -> the type.
        self.start_topics = {settings.topic(t.start_topic): t for t in self.sagas.values()}
        self.replies_topic = settings.topic(TOPIC_REPLIES)

    @property
    def topics(self) -> list[str]:
        return [*self.start_topics, self.replies_topic]

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
                problem = unreadable(message.value)
                return _Parsed(message, message_id_of(message), None, Unparseable(
                    RejectionCode.MALFORMED_JSON if problem else RejectionCode.SCHEMA_VIOLATION,
                    problem or f"not a StepReply: {error.errors()[0]['msg']}"))
            message_id = f"reply:{reply.reply_id}"
            redrive = message.header(REDRIVE_HEADER)
            if redrive:  # an operator redrove it: a new message, decided once more
                message_id += f":redrive:{redrive}"
            return _Parsed(message, message_id, reply.saga_id, reply,
                           trace=tracing.from_headers(message.headers))
        saga_type = self.start_topics[message.topic]
        intake = classify(saga_type, message.value, message.timestamp_ms)
        saga_id = None if isinstance(intake, Unparseable) else intake.saga_id
        return _Parsed(message, message_id_of(message), saga_id, intake, saga_type.name,
                       tracing.from_headers(message.headers))

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
            spans = self._open_spans(writes, now, len(parsed)) if tracing.ENABLED else []
            write = tracing.deferred_database_span(spans[0] if spans else None, "INSERT",
                                                   "saga_events")
            try:
                async with self.held.use() as conn:
                    with write:
                        ids = await store.write_batch(
                            conn, CONSUMER, writes.inbox, writes.events,
                            list(writes.touched.values()), writes.outbox, [], now,
                            writes.traces)
            except ConcurrencyConflict:
                for item in parsed:
                    if item.saga_id is not None:
                        self.known.pop(item.saga_id, None)
                log.info("the known-state path lost a race on a batch of %d; deciding it "
                         "again from the database", len(parsed))
            else:
                self._committed(writes, now)
                if spans:
                    tracing.emit(write)
                    self._close_spans(spans, writes, now)
                return ids, writes.outbox
        writes = _BatchWrites()
        async with self.engine.begin() as conn:
            seen, states, writes.stored = await store.seen_states_and_traces(
                conn, CONSUMER, [p.message_id for p in parsed],
                sorted({p.saga_id for p in parsed if p.saga_id is not None}),
            )
            for item in parsed:
                state = states.get(item.saga_id) if item.saga_id else None
                if item.message_id in seen:
                    # Redelivered after a crash, or a byte-identical duplicate: recorded
                    # already. A request whose saga ended is answered with its outcome event
                    # again (the same event id), so a client that asks again hears it.
                    if state is not None and state.terminal and isinstance(
                            item.input, StartSaga | RejectSaga):
                        writes.outbox += [
                            outcome_row(self.settings, self.sagas, outcome,
                                        self._trace_of(item, state, writes))
                            for outcome in self._decide(item, state, now).outcomes]
                    continue
                seen.add(item.message_id)
                decision = self._decide(item, state, now)
                self._apply(item, state, decision, now, writes, states)
            spans = self._open_spans(writes, now, len(parsed)) if tracing.ENABLED else []
            write = tracing.deferred_database_span(spans[0] if spans else None, "INSERT",
                                                   "saga_events")
            with write:
                ids = await store.write_batch(
                    conn, CONSUMER, writes.inbox, writes.events, list(writes.touched.values()),
                    writes.outbox, writes.dead_letters, now, writes.traces,
                )
            crash_point("orchestrator.before_commit", tags)
        self._committed(writes, now)
        if spans:
            tracing.emit(write)
            self._close_spans(spans, writes, now)
        return ids, writes.outbox

    def _open_spans(self, writes: _BatchWrites, now: datetime, batch_size: int) -> list[Span]:
        """With tracing on: a span per message of the batch that concerns a saga, under the
        context the message carried. The intake that started a saga gets the span id the saga
        span names as its parent (`intake_span_id`); a record without context starts the
        saga's own trace. The first span is the database write's parent. Ended by
        `_close_spans` once the batch committed; a batch that did not commit ends none (it is
        decided again, and its spans made again)."""
        spans: list[Span] = []
        for item, decision, context in writes.handled:
            if context is None or item.saga_id is None:
                continue  # no saga: nothing to join the record to
            message = item.message
            attributes = {
                **tracing.messaging_attributes("process", message.topic, message.partition,
                                               message.offset, message_id=item.message_id,
                                               batch_size=batch_size),
                **self._saga_attributes(item, writes)}
            name = f"process {message.topic}"
            if decision.events and isinstance(decision.events[0], SagaStarted | SagaRejected):
                spans.append(tracing.start_span(
                    name, item.trace, SpanKind.CONSUMER, attributes,
                    span_id=tracing.intake_span_id(item.saga_id),
                    trace_id=None if item.trace else context.trace_id, start=now))
            else:
                spans.append(tracing.start_span(name, item.trace or context, SpanKind.CONSUMER,
                                                attributes, start=now))
        return spans

    @staticmethod
    def _saga_attributes(item: _Parsed, writes: _BatchWrites) -> dict[str, object]:
        state = writes.touched.get(item.saga_id) if item.saga_id else None
        value = item.input
        if isinstance(value, StepReply):
            return tracing.saga_attributes(state.saga_type if state else None, value.saga_id,
                                           state.business_key if state else None, value.step,
                                           value.attempt, value.direction.value)
        if isinstance(value, StartSaga | RejectSaga):
            return tracing.saga_attributes(value.saga_type, value.saga_id, value.business_key)
        return {}

    @staticmethod
    def _close_spans(spans: list[Span], writes: _BatchWrites, started: datetime) -> None:
        tracing.end_all(spans)
        tracing.end_all(writes.spans)
        ended = datetime.now(UTC)
        for state in writes.touched.values():
            context = writes.contexts.get(state.saga_id)
            if state.terminal and context is not None:
                tracing.emit_saga_span(state.saga_id, state.saga_type, state.business_key,
                                       state.status.value, context,
                                       state.requested_at or started, ended, state.failure)

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
                # A reply without trace context needs the saga's stored one: the careful path
                # reads it.
                if item.saga_id is None or item.saga_id not in self.known or item.trace is None:
                    return None
            elif not isinstance(item.input, StartSaga):
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

    def _committed(self, writes: _BatchWrites, now: datetime) -> None:
        if metrics.RECORDING:
            observe_ended(writes.touched.values(), now)
            for histogram, seconds, attributes in writes.observed or ():
                histogram.record(seconds, attributes)
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
        if isinstance(value, StartSaga):
            # New sagas start on the type's current version; a duplicate or a conflict is
            # told from the saga's state, whatever version it runs on.
            return decide_start(self.sagas[value.saga_type].current, state, value, now)
        if isinstance(value, RejectSaga):
            return decide_reject(state, value)
        if isinstance(value, StepReply):
            definition = None if state is None else self.sagas.definition_of(state)
            return decide_reply(definition, state, value, now)
        return Decision(Verdict.REJECTED, rejection=(value.code, value.reason))

    @staticmethod
    def _trace_of(item: _Parsed, before: SagaState | None, writes: _BatchWrites
                  ) -> TraceContext | None:
        """The saga's trace context: a new saga's from its request (a trace of its own when the
        request has none); a reply's from the reply, which participants send in the saga's
        trace; else the one stored with the saga."""
        saga_id = before.saga_id if before is not None else item.saga_id
        if saga_id is None:
            return None
        if before is None or (item.trace is not None and isinstance(item.input, StepReply)):
            return tracing.saga_context(saga_id, item.trace)
        stored = writes.stored.get(saga_id)
        return tracing.stored_context(saga_id, stored.traceparent if stored else None,
                                      stored.tracestate if stored else None)

    def _apply(self, item: _Parsed, state: SagaState | None, decision: Decision, now: datetime,
               writes: _BatchWrites, states: dict[UUID, SagaState]) -> None:
        if metrics.RECORDING and decision.events:
            self._observe(item, state, now, writes)
        trace = self._trace_of(item, state, writes)
        trace_id = trace.trace_id if trace is not None else None
        for event in decision.events:
            state = evolve(state, event)
            writes.events.append(store.NewEvent(state.saga_id, state.version, event, self.actor,
                                                item.message_id, trace_id))
        if state is not None and decision.events:
            states[state.saga_id] = state
            writes.touched[state.saga_id] = state
            if trace is not None:
                writes.contexts[state.saga_id] = trace
                # Stored once (the row keeps the first); a saga this worker wrote has it.
                if state.saga_id not in self.known:
                    writes.traces[state.saga_id] = store.StoredTrace(trace.traceparent,
                                                                     trace.state)
        if tracing.ENABLED:
            writes.handled.append((item, decision, trace))
        if decision.commands:
            assert state is not None  # a command is only ever sent for a saga
            definition = self.sagas.definition_of(state)
            writes.outbox += traced_command_rows(self.settings, definition, decision.commands,
                                                 trace, writes.spans)
        for outcome in decision.outcomes:
            writes.outbox.append(outcome_row(self.settings, self.sagas, outcome, trace))
        rejection = decision.rejection
        if decision.saga_failed and state is not None:
            code = (RejectionCode.COMPENSATION_FAILED if state.direction is Direction.COMPENSATE
                    else RejectionCode.FAILED_AFTER_PIVOT)
            rejection = (code, state.failure or "saga failed")
        if rejection is not None:
            self._dead_letter(item, state, rejection, now, writes, trace)
        writes.inbox.append(store.InboxRow(
            message_id=item.message_id, topic=item.message.topic,
            partition=item.message.partition, offset=item.message.offset,
            verdict=decision.verdict.value, saga_id=state.saga_id if state else item.saga_id,
        ))

    def _observe(self, item: _Parsed, state: SagaState | None, now: datetime,
                 writes: _BatchWrites) -> None:
        """What a decision that records events shows on the histograms: a reply, the round
        trip of the step run it answers (its command was sent, or re-sent, `timeout_s` before
        its deadline); a refusal at intake, the duration of a saga that never ran (a saga
        that ran is timed from its state when it ends: `observe_ended`)."""
        value = item.input
        if writes.observed is None:
            writes.observed = []
        if isinstance(value, StepReply) and state is not None:
            for run in state.runs:
                if run.command_id == value.command_id and run.deadline_at is not None:
                    step = self.sagas.definition_of(state).step(run.step)
                    sent_at = run.deadline_at - timedelta(seconds=step.timeout_s)
                    writes.observed.append((STEP_LATENCY, (now - sent_at).total_seconds(), {
                        "saga_type": state.saga_type, "step": run.step,
                        "direction": run.direction.value, "outcome": value.outcome.value}))
                    return
        elif isinstance(value, RejectSaga) and item.message.timestamp_ms is not None:
            requested_at = datetime.fromtimestamp(item.message.timestamp_ms / 1000, tz=UTC)
            writes.observed.append((SAGA_DURATION, (now - requested_at).total_seconds(), {
                "saga_type": value.saga_type, "outcome": "rejected"}))

    def _dead_letter(self, item: _Parsed, state: SagaState | None,
                     rejection: tuple[RejectionCode, str], now: datetime,
                     writes: _BatchWrites, trace: TraceContext | None = None) -> None:
        code, reason = rejection
        saga_type, business_key = item.saga_type, None
        if isinstance(item.input, StartSaga | RejectSaga):
            business_key = item.input.business_key
        elif state is not None:
            saga_type, business_key = state.saga_type, state.business_key
        stage = "reply" if item.message.topic == self.replies_topic else "intake"
        letter = dead_letter_for(item.message, code, reason, f"{stage}.{code.value}", now,
                                 saga_id=item.saga_id, saga_type=saga_type,
                                 business_key=business_key, message_id=item.message_id)
        record = dead_letter_record(self.settings, item.message, letter)
        if trace is not None and item.trace is None:
            # The original carried no context: the letter goes in its saga's trace.
            record = dataclasses.replace(record, headers=(*record.headers, *trace.headers()))
        writes.dead_letters.append(store.DeadLetterRow(
            dead_letter_id=letter.dead_letter_id, stage=stage, reason_code=code.value,
            reason=reason, error_class=letter.error_class, original_topic=item.message.topic,
            original_partition=item.message.partition, original_offset=item.message.offset,
            original_key=letter.original_key, payload=item.message.value,
            headers=encode_headers(item.message.headers), failed_at=now,
            saga_id=item.saga_id, saga_type=saga_type, business_key=business_key,
        ))
        writes.outbox.append(store.OutboxRow(record.topic, record.key, record.value,
                                             encode_headers(record.headers), item.saga_id))
        log.warning("dead-lettered %s record at %s/%s: %s: %s", stage, item.message.partition,
                    item.message.offset, code.value, reason,
                    extra=saga_fields(saga_type, item.saga_id,
                                      item.input.step if isinstance(item.input, StepReply)
                                      else None, trace.trace_id if trace else None))
