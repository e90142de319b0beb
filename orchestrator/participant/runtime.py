"""The participant runtime: consume step commands, apply each effect at most once, reply.

For each command:
- a record that is no `StepCommand`, or a command for an action (and direction) the participant
  has no handler for, is dead-lettered (`SCHEMA_VIOLATION`, `UNKNOWN_ACTION`) in the batch's
  transaction and gets no reply;
- an effect `(saga_id, step, direction)` that already has a stored reply gets that reply again
  (marked `replayed`), never a second effect;
- a compensation whose forward effect never happened is a no-op success, and it leaves a
  tombstone so that a forward command arriving late is refused instead of applied;
- otherwise the participant decides the effect, and the runtime writes its rows and the stored
  reply in one statement, unless the failure is retryable (nothing happened, so a later attempt
  must be free to try again).

A batch of forward commands takes the fast path first (ADR 0006): the participant reads what its
rules need, decides, and one statement writes every effect row and stored reply, failing whole
if any of these effects already has a stored reply (a redelivery, a re-sent command, a
tombstone). Such a batch, and any batch with a compensation or a bad record, is answered on the
careful path: one transaction that reads the stored replies first and applies the rules above.

The replies are produced only after the write committed, and the offsets are committed only
after the replies were acknowledged: a crash in between redelivers the commands, which find
their stored replies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID, uuid5

from opentelemetry.trace import Span, SpanKind
from pydantic import JsonValue, ValidationError
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator import tracing
from orchestrator.consuming.handling import (
    dead_letter_for,
    dead_letter_record,
    handle_isolating_poison,
    is_retryable,
    message_id_of,
    poison_dead_letter,
    retrying,
)
from orchestrator.core.intake import unreadable
from orchestrator.crash import crash_point, step_tags
from orchestrator.errors import ConcurrencyConflict, SagaError
from orchestrator.kafka.consumer import Consumed, encode_headers, participant_group
from orchestrator.kafka.producer import KafkaProducer, Record
from orchestrator.metrics import DEAD_LETTERS
from orchestrator.postgres import store
from orchestrator.postgres.store import DeadLetterRow, insert_dead_letters, translate
from orchestrator.settings import Settings
from orchestrator.tracing import TraceContext
from schemas import (
    TOPIC_REPLIES,
    Direction,
    Outcome,
    RejectionCode,
    StepCommand,
    StepReply,
    step_topic,
)

log = logging.getLogger(__name__)

CANCELLED = "CANCELLED_BY_COMPENSATION"


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    code: str | None = None
    reason: str | None = None
    retryable: bool = False
    result: dict[str, JsonValue] = field(default_factory=dict)

    @classmethod
    def ok(cls, **result: JsonValue) -> StepResult:
        return cls(Outcome.SUCCEEDED, result=dict(result))

    @classmethod
    def refused(cls, code: str, reason: str, retryable: bool = False) -> StepResult:
        return cls(Outcome.FAILED, code=code, reason=reason, retryable=retryable)


@dataclass(frozen=True)
class EffectTable:
    """A table a participant's effects go to. The runtime inserts the rows from arrays, in the
    same statement as the stored replies, so an effect and its reply are written together or
    not at all."""

    table: str
    columns: tuple[tuple[str, str], ...]  # (column, its PostgreSQL type)
    on_conflict: str = ""  # for example "ON CONFLICT (saga_id) DO NOTHING"

    def row(self, **values: Any) -> tuple[str, dict[str, Any]]:
        """One row for `Decided.rows`, with every column of the table and no other: a
        misspelt or forgotten column fails here, in the rules' unit tests, not in the write."""
        names = {column for column, _ in self.columns}
        if values.keys() != names:
            missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
            raise ValueError(f"a row of {self.table} needs exactly its columns:"
                             f" missing {missing}, unknown {unknown}")
        return (self.table, values)


@dataclass(frozen=True)
class Decided:
    """A participant's answer to one command: the result, and the rows its effect writes (by
    table name; none for a refusal or when the effect writes nothing)."""

    result: StepResult
    rows: tuple[tuple[str, dict[str, Any]], ...] = ()


class Participant(Protocol):
    name: str
    # Where `decide`'s rows go (see EffectTable).
    effects: tuple[EffectTable, ...]
    # Whether the fast path, too, must hold `read`'s locks until its write (and so needs a
    # transaction). False when the write is safe without them: the rules read nothing another
    # writer could change, or the rows written are fenced by a unique key that a write decided
    # from an outdated read collides on (the ledger).
    locks: bool

    async def read(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                   now: datetime, *, lock: bool) -> Any:
        """What the rules need for these commands (rows, a remote verdict); may be None. With
        `lock` (the careful path, or the fast path of a participant that `locks`), lock the rows
        the rules depend on: the transaction holds them until the write committed."""
        ...

    def decide(self, commands: Sequence[StepCommand], view: Any,
               now: datetime) -> list[Decided]:
        """The rules, without I/O: one Decided per command, in order; a batch's commands see
        the effects of the ones before them."""
        ...

    def unhandled(self, command: StepCommand) -> str | None:
        """Why this participant has no rule for `command` (its action, in its direction), or
        None. Such a command is dead-lettered (`UNKNOWN_ACTION`) and never reaches `read` or
        `decide`: redriven once a version that handles it runs, it is applied then."""
        ...


def _key(saga_id: UUID, step: str, direction: str) -> tuple[UUID, str, str]:
    return (saga_id, step, direction)


@dataclass(frozen=True)
class _Refused:
    """A record of the batch that is dead-lettered instead of answered."""

    message: Consumed
    code: RejectionCode
    reason: str
    saga_id: UUID | None = None


class ParticipantWorker:
    def __init__(self, settings: Settings, engine: AsyncEngine, participant: Participant,
                 producer: KafkaProducer) -> None:
        self.settings = settings
        self.engine = engine
        # The connection for the fast path's autocommitted statements.
        self.held = store.HeldConnection(engine)
        self.participant = participant
        self.producer = producer
        self.topic = settings.topic(step_topic(participant.name))
        self.group_id = participant_group(participant.name)
        # Named in every reply (`applied_by`), so a timeline says which instance applied a step.
        self.instance = settings.worker_name or participant.name
        self._write_statement = write_statement(participant.effects)

    async def handle_batch(self, batch: Sequence[Consumed]) -> None:
        """The subscriber's entry point: process the batch, setting aside poison records."""
        await handle_isolating_poison(batch, self.process_batch, self._set_aside)

    async def close(self) -> None:
        await self.held.close()

    async def _set_aside(self, message: Consumed, error: BaseException, attempts: int,
                         first_failed_at: datetime) -> None:
        row, outbox, _ = poison_dead_letter(self.settings, f"participant:{self.participant.name}",
                                            message, error, attempts, first_failed_at)
        async with self.engine.begin() as conn:
            await store.write_batch(conn, self.group_id, [], [], [], [outbox], [row],
                                    datetime.now(UTC))

    async def process_batch(self, batch: Sequence[Consumed]) -> None:
        commands: list[StepCommand] = []
        bad: list[_Refused] = []
        # The trace context each command came with (by command id): its reply is sent in it.
        traces: dict[UUID, TraceContext] = {}
        origins: dict[UUID, Consumed] = {}  # with tracing on: each command's record
        for message in batch:
            try:
                command = StepCommand.model_validate_json(message.value)
            except ValidationError as error:
                problem = unreadable(message.value)
                bad.append(_Refused(
                    message,
                    RejectionCode.MALFORMED_JSON if problem else RejectionCode.SCHEMA_VIOLATION,
                    problem or f"not a StepCommand: {error.errors()[0]['msg']}"))
                continue
            unhandled = self.participant.unhandled(command)
            if unhandled is not None:
                bad.append(_Refused(message, RejectionCode.UNKNOWN_ACTION, unhandled,
                                    command.saga_id))
                continue
            commands.append(command)
            trace = tracing.from_headers(message.headers)
            if trace is not None:
                traces[command.command_id] = trace
                if tracing.ENABLED:
                    origins[command.command_id] = message
        spans = (self._open_spans(len(batch), commands, traces, origins)
                 if tracing.ENABLED and traces else None)
        tags = step_tags((c.step, c.direction.value) for c in commands)
        crash_point("participant.after_consume", tags)
        replies: list[StepReply] | None = None
        try:
            with tracing.database_span(next(iter(spans.values()), None) if spans else None,
                                       "INSERT", "participant_replies"):
                if not bad:
                    replies = await self._answer_fast(commands, tags)
                if replies is None:
                    async for attempt in retrying():
                        with attempt:
                            replies = await self._apply(commands, bad, tags)
            assert replies is not None
            for refused in bad:
                DEAD_LETTERS.add(1, {"stage": f"participant:{self.participant.name}",
                                     "reason": refused.code.value})
            crash_point("participant.after_effect", tags)
            await self.producer.send([self._record(reply, traces.get(reply.command_id))
                                      for reply in replies])
            crash_point("participant.after_produce", tags)
        finally:
            if spans:
                self._close_spans(spans, replies)

    def _open_spans(self, batch_size: int, commands: Sequence[StepCommand],
                    traces: dict[UUID, TraceContext], origins: dict[UUID, Consumed]
                    ) -> dict[UUID, Span]:
        """With tracing on: a span per command that came with trace context, under the span
        that sent it (the orchestrator's step attempt); its reply is sent from it."""
        spans: dict[UUID, Span] = {}
        for command in commands:
            trace = traces.get(command.command_id)
            if trace is None or command.command_id in spans:
                continue  # a copy of a command in the batch (a re-send) shares its span
            message = origins[command.command_id]
            span = tracing.start_span(
                f"process {self.topic}", trace, SpanKind.CONSUMER,
                {**tracing.messaging_attributes(
                    "process", self.topic, message.partition, message.offset,
                    message_id=str(command.command_id), batch_size=batch_size),
                 **tracing.saga_attributes(command.saga_type, command.saga_id, None,
                                           command.step, command.attempt,
                                           command.direction.value),
                 "saga.participant": self.participant.name})
            spans[command.command_id] = span
            traces[command.command_id] = tracing.context_of(span, trace)
        return spans

    @staticmethod
    def _close_spans(spans: dict[UUID, Span], replies: Sequence[StepReply] | None) -> None:
        for reply in replies or ():
            span = spans.get(reply.command_id)
            if span is not None:
                span.set_attribute("saga.outcome", reply.outcome.value)
                if reply.replayed:
                    span.set_attribute("saga.replayed", True)
                if reply.code:
                    span.set_attribute("saga.reason_code", reply.code)
        tracing.end_all(list(spans.values()))

    async def _answer_fast(self, commands: Sequence[StepCommand], tags: Sequence[str]
                           ) -> list[StepReply] | None:
        """The fast path: forward commands, each effect once in the batch, answered with one
        write that stores every reply under its effect's key. That key is what makes it safe:
        an effect that has a stored reply (a redelivery, a re-sent command, a tombstone) makes
        the write fail whole, and the batch goes to the careful path, which replays that reply.
        None when the batch is not eligible or the write collided."""
        if not commands or any(c.direction is not Direction.FORWARD for c in commands):
            return None
        if len({(c.saga_id, c.step) for c in commands}) != len(commands):
            return None
        now = datetime.now(UTC)
        try:
            async with self.engine.begin() if self.participant.locks else self.held.use() as conn:
                view = await self.participant.read(conn, commands, now,
                                                   lock=self.participant.locks)
                replies, to_store, rows = self._answers(
                    commands, self.participant.decide(commands, view, now))
                # As in a transaction: in autocommit mode nothing is written before the write.
                crash_point("participant.before_commit", tags)
                await self._write(conn, to_store, rows)
        except ConcurrencyConflict:
            log.info("%s: an effect of a batch of %d already has a stored reply; answering it "
                     "on the careful path", self.participant.name, len(commands))
            return None
        except DBAPIError as error:
            translated = translate(error)
            if not is_retryable(translated):
                raise translated from error
            return None  # the database is away: the careful path retries with backoff
        except SagaError as error:
            if not error.retryable:
                raise
            return None
        return replies

    async def _apply(self, commands: Sequence[StepCommand],
                     bad: Sequence[_Refused], tags: Sequence[str] = ()
                     ) -> list[StepReply]:
        """The careful path: the whole batch in one transaction, stored replies read first."""
        now = datetime.now(UTC)
        try:
            async with self.engine.begin() as conn:
                if bad:
                    await self._dead_letter(conn, bad, now)
                replies = await self._apply_in(conn, commands, now)
                crash_point("participant.before_commit", tags)
                return replies
        except DBAPIError as error:
            # A unique-key collision: another instance applied one of these effects first;
            # the retry finds its stored reply.
            raise translate(error) from error

    async def _apply_in(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                        now: datetime) -> list[StepReply]:
        """Answer every command, in rounds that hold at most one command per (saga, step):
        a forward effect and its compensation in one batch must see each other's outcome, so
        the second waits for a later round of the same transaction."""
        stored = await self._stored_replies(conn, commands)
        replies: dict[UUID, StepReply] = {}
        pending = list(commands)
        while pending:
            this_round: list[StepCommand] = []
            later: list[StepCommand] = []
            taken: set[tuple[UUID, str]] = set()
            for command in pending:
                pair = (command.saga_id, command.step)
                (later if pair in taken else this_round).append(command)
                taken.add(pair)
            replies.update(await self._round(conn, this_round, stored, now))
            pending = later
        return [replies[command.command_id] for command in commands]

    async def _round(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                     stored: dict[tuple[UUID, str, str], dict[str, Any]], now: datetime
                     ) -> dict[UUID, StepReply]:
        answers: dict[UUID, StepReply] = {}
        to_apply: list[StepCommand] = []
        to_store: list[StepReply] = []
        for command in commands:
            key = _key(command.saga_id, command.step, command.direction.value)
            if key in stored:
                answers[command.command_id] = self._replay(command, stored[key])
                continue
            if command.direction is Direction.COMPENSATE:
                forward = stored.get(_key(command.saga_id, command.step, "forward"))
                if forward is None or forward["outcome"] != Outcome.SUCCEEDED.value:
                    # Nothing to undo: the forward effect failed (its reply is final) or never
                    # ran, in which case a tombstone refuses it if it ever arrives.
                    reply = self._reply(command, StepResult.ok(
                        noop="forward effect was never applied"))
                    answers[command.command_id] = reply
                    to_store.append(reply)
                    if forward is None:
                        to_store.append(self._reply(
                            command.model_copy(update={"direction": Direction.FORWARD}),
                            StepResult.refused(CANCELLED, "compensated before it was applied"),
                        ))
                    continue
            to_apply.append(command)
        rows: list[tuple[str, dict[str, Any]]] = []
        if to_apply:
            view = await self.participant.read(conn, to_apply, now, lock=True)
            replies, decided_to_store, rows = self._answers(
                to_apply, self.participant.decide(to_apply, view, now))
            answers.update((reply.command_id, reply) for reply in replies)
            to_store.extend(decided_to_store)
        await self._write(conn, to_store, rows)
        for reply in to_store:
            stored[_key(reply.saga_id, reply.step, reply.direction.value)] = reply.model_dump(
                mode="json")
        return answers

    def _answers(self, commands: Sequence[StepCommand], decided: Sequence[Decided]
                 ) -> tuple[list[StepReply], list[StepReply], list[tuple[str, dict[str, Any]]]]:
        """Each command's reply, and what to write: the replies to store and their effects'
        rows. A retryable answer is neither stored nor written: nothing happened, so a later
        attempt must be free to try again."""
        replies: list[StepReply] = []
        to_store: list[StepReply] = []
        rows: list[tuple[str, dict[str, Any]]] = []
        for command, answer in zip(commands, decided, strict=True):
            reply = self._reply(command, answer.result)
            replies.append(reply)
            if not answer.result.retryable:
                to_store.append(reply)
                rows.extend(answer.rows)
        return replies, to_store, rows

    async def _stored_replies(self, conn: AsyncConnection, commands: Sequence[StepCommand]
                              ) -> dict[tuple[UUID, str, str], dict[str, Any]]:
        if not commands:
            return {}
        rows = await conn.execute(
            _STORED_REPLIES,
            {"saga_ids": [c.saga_id for c in commands], "steps": [c.step for c in commands]},
        )
        return {_key(row.saga_id, row.step, row.direction): _json(row.reply) for row in rows}

    async def _write(self, conn: AsyncConnection, replies: Sequence[StepReply],
                     rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Store the replies and write the effect rows, in one statement."""
        if not replies and not rows:
            return
        params: dict[str, Any] = {
            "r_saga": [r.saga_id for r in replies], "r_step": [r.step for r in replies],
            "r_direction": [r.direction.value for r in replies],
            "r_participant": [r.participant for r in replies],
            "r_outcome": [r.outcome.value for r in replies],
            "r_reply": [r.model_dump_json() for r in replies],
        }
        for index, effect in enumerate(self.participant.effects):
            mine = [row for table, row in rows if table == effect.table]
            for column, _type in effect.columns:
                params[f"x{index}_{column}"] = [row[column] for row in mine]
        try:
            await conn.execute(self._write_statement, params)
        except DBAPIError as error:
            raise translate(error) from error

    def _reply(self, command: StepCommand, result: StepResult) -> StepReply:
        return StepReply(
            reply_id=uuid5(command.command_id, "reply"),
            command_id=command.command_id,
            saga_id=command.saga_id,
            step=command.step,
            direction=command.direction,
            attempt=command.attempt,
            participant=self.participant.name,
            outcome=result.outcome,
            retryable=result.retryable,
            code=result.code,
            reason=result.reason,
            result=result.result,
            applied_by=self.instance,
        )

    def _replay(self, command: StepCommand, stored: dict[str, Any]) -> StepReply:
        """The stored outcome, addressed to this attempt's command, naming the instance that
        decided it (none for a reply stored before replies named one)."""
        result = StepResult(Outcome(stored["outcome"]), code=stored.get("code"),
                            reason=stored.get("reason"), result=stored.get("result") or {})
        return self._reply(command, result).model_copy(
            update={"replayed": True, "applied_by": stored.get("applied_by")})

    def _record(self, reply: StepReply, trace: TraceContext | None = None) -> Record:
        """The reply's record, in the trace its command came with (from this participant's
        span of it, with tracing on)."""
        headers: tuple[tuple[str, bytes], ...] = (
            ("message-id", str(reply.reply_id).encode()), ("type", b"StepReply"))
        if trace is not None:
            headers += trace.headers()
        return Record(
            topic=self.settings.topic(TOPIC_REPLIES),
            key=str(reply.saga_id).encode(),
            value=reply.model_dump_json().encode(),
            headers=headers,
        )

    async def _dead_letter(self, conn: AsyncConnection, bad: Sequence[_Refused],
                           now: datetime) -> None:
        rows = []
        for refused in bad:
            message = refused.message
            letter = dead_letter_for(message, refused.code, refused.reason,
                                     f"participant.{self.participant.name}.{refused.code.value}",
                                     now, saga_id=refused.saga_id,
                                     message_id=message_id_of(message))
            record = dead_letter_record(self.settings, message, letter)
            rows.append(DeadLetterRow(
                dead_letter_id=letter.dead_letter_id, stage=f"participant:{self.participant.name}",
                reason_code=letter.reason_code.value, reason=letter.reason,
                error_class=letter.error_class, original_topic=message.topic,
                original_partition=message.partition, original_offset=message.offset,
                original_key=letter.original_key, payload=message.value,
                headers=encode_headers(message.headers), failed_at=now,
                saga_id=refused.saga_id,
            ))
            await conn.execute(
                text("INSERT INTO outbox (topic, key, value, headers) VALUES"
                     " (:t, :k, :v, CAST(:h AS jsonb))"),
                {"t": record.topic, "k": record.key, "v": record.value,
                 "h": json.dumps(encode_headers(record.headers))},
            )
        await insert_dead_letters(conn, rows)


_STORED_REPLIES = text(
    "SELECT r.saga_id, r.step, r.direction, r.reply FROM participant_replies r"
    " JOIN unnest(CAST(:saga_ids AS uuid[]), CAST(:steps AS text[]))"
    " AS k(saga_id, step) ON r.saga_id = k.saga_id AND r.step = k.step"
)


def write_statement(effects: Sequence[EffectTable]) -> TextClause:
    """One statement that stores replies and inserts effect rows, all from arrays: a reply whose
    effect already has one collides on the primary key and the statement writes nothing."""
    parts = [
        "WITH replies AS (INSERT INTO participant_replies (saga_id, step, direction, participant,"
        " outcome, reply) SELECT * FROM unnest(CAST(:r_saga AS uuid[]),"
        " CAST(:r_step AS text[]), CAST(:r_direction AS text[]), CAST(:r_participant AS text[]),"
        " CAST(:r_outcome AS text[]), CAST(:r_reply AS jsonb[])))"
    ]
    for index, effect in enumerate(effects):
        columns = ", ".join(column for column, _ in effect.columns)
        arrays = ", ".join(f"CAST(:x{index}_{column} AS {kind}[])"
                           for column, kind in effect.columns)
        parts.append(f"x{index} AS (INSERT INTO {effect.table} ({columns}) SELECT * FROM"
                     f" unnest({arrays}) {effect.on_conflict})")
    return text(", ".join(parts) + " SELECT 1")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
