"""The participant runtime: consume step commands, apply each effect at most once, reply.

For each command, in one transaction per batch:
- an effect `(saga_id, step, direction)` that already has a stored reply gets that reply again
  (marked `replayed`), never a second effect;
- a compensation whose forward effect never happened is a no-op success, and it leaves a
  tombstone so that a forward command arriving late is refused instead of applied;
- otherwise the participant applies the effect and the reply is stored with it, unless the
  failure is retryable (nothing happened, so a later attempt must be free to try again).

The replies are produced only after that transaction committed, and the offsets are committed
only after the replies were acknowledged: a crash in between redelivers the commands, which find
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

from pydantic import JsonValue, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator import store
from orchestrator.bus import Consumed, encode_headers
from orchestrator.crash import crash_point, step_tags
from orchestrator.metrics import DEAD_LETTERS
from orchestrator.producer import KafkaProducer, Record
from orchestrator.settings import Settings
from orchestrator.store import DeadLetterRow, insert_dead_letters, translate
from orchestrator.worker import (
    dead_letter_for,
    dead_letter_record,
    handle_isolating_poison,
    message_id_of,
    poison_dead_letter,
    retrying,
)
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


class Participant(Protocol):
    name: str

    async def apply(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                    now: datetime) -> list[StepResult]:
        """Apply each command's effect inside `conn`'s transaction; one result per command."""
        ...


def _key(saga_id: UUID, step: str, direction: str) -> tuple[UUID, str, str]:
    return (saga_id, step, direction)


class ParticipantWorker:
    def __init__(self, settings: Settings, engine: AsyncEngine, participant: Participant,
                 producer: KafkaProducer) -> None:
        self.settings = settings
        self.engine = engine
        self.participant = participant
        self.producer = producer
        self.topic = settings.topic(step_topic(participant.name))
        self.group_id = f"saga-participant-{participant.name}"

    async def handle_batch(self, batch: Sequence[Consumed]) -> None:
        """The subscriber's entry point: process the batch, setting aside poison records."""
        await handle_isolating_poison(batch, self.process_batch, self._set_aside)

    async def _set_aside(self, message: Consumed, error: BaseException, attempts: int,
                         first_failed_at: datetime) -> None:
        row, outbox, _ = poison_dead_letter(self.settings, f"participant:{self.participant.name}",
                                            message, error, attempts, first_failed_at)
        async with self.engine.begin() as conn:
            await store.write_batch(conn, self.group_id, [], [], [], [outbox], [row],
                                    datetime.now(UTC))

    async def process_batch(self, batch: Sequence[Consumed]) -> None:
        commands: list[StepCommand] = []
        bad: list[tuple[Consumed, str]] = []
        for message in batch:
            try:
                commands.append(StepCommand.model_validate_json(message.value))
            except ValidationError as error:
                bad.append((message, error.errors()[0]["msg"]))
        tags = step_tags((c.step, c.direction.value) for c in commands)
        crash_point("participant.after_consume", tags)
        replies: list[StepReply] = []
        async for attempt in retrying():
            with attempt:
                replies = await self._apply(commands, bad, tags)
        if bad:
            DEAD_LETTERS.add(len(bad), {"stage": f"participant:{self.participant.name}",
                                        "reason": RejectionCode.SCHEMA_VIOLATION.value})
        crash_point("participant.after_effect", tags)
        await self.producer.send([self._record(reply) for reply in replies])
        crash_point("participant.after_produce", tags)

    async def _apply(self, commands: Sequence[StepCommand],
                     bad: Sequence[tuple[Consumed, str]], tags: Sequence[str] = ()
                     ) -> list[StepReply]:
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
        results = await self.participant.apply(conn, to_apply, now) if to_apply else []
        for command, result in zip(to_apply, results, strict=True):
            reply = self._reply(command, result)
            answers[command.command_id] = reply
            if not result.retryable:  # nothing happened: a later attempt must be free to try
                to_store.append(reply)
        await self._store(conn, to_store)
        for reply in to_store:
            stored[_key(reply.saga_id, reply.step, reply.direction.value)] = reply.model_dump(
                mode="json")
        return answers

    async def _stored_replies(self, conn: AsyncConnection, commands: Sequence[StepCommand]
                              ) -> dict[tuple[UUID, str, str], dict[str, Any]]:
        if not commands:
            return {}
        rows = await conn.execute(
            text(
                "SELECT r.saga_id, r.step, r.direction, r.reply FROM participant_replies r"
                " JOIN unnest(CAST(:saga_ids AS uuid[]), CAST(:steps AS text[]))"
                " AS k(saga_id, step) ON r.saga_id = k.saga_id AND r.step = k.step"
            ),
            {"saga_ids": [c.saga_id for c in commands], "steps": [c.step for c in commands]},
        )
        return {_key(row.saga_id, row.step, row.direction): _json(row.reply) for row in rows}

    async def _store(self, conn: AsyncConnection, replies: Sequence[StepReply]) -> None:
        if not replies:
            return
        await conn.execute(
            text(
                "INSERT INTO participant_replies (saga_id, step, direction, participant, outcome,"
                " reply) VALUES (:saga_id, :step, :direction, :participant, :outcome,"
                " CAST(:reply AS jsonb))"
            ),
            [
                {"saga_id": r.saga_id, "step": r.step, "direction": r.direction.value,
                 "participant": r.participant, "outcome": r.outcome.value,
                 "reply": r.model_dump_json()}
                for r in replies
            ],
        )

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
        )

    def _replay(self, command: StepCommand, stored: dict[str, Any]) -> StepReply:
        """The stored outcome, addressed to this attempt's command."""
        result = StepResult(Outcome(stored["outcome"]), code=stored.get("code"),
                            reason=stored.get("reason"), result=stored.get("result") or {})
        return self._reply(command, result).model_copy(update={"replayed": True})

    def _record(self, reply: StepReply) -> Record:
        return Record(
            topic=self.settings.topic(TOPIC_REPLIES),
            key=str(reply.saga_id).encode(),
            value=reply.model_dump_json().encode(),
            headers=(("message-id", str(reply.reply_id).encode()), ("type", b"StepReply")),
        )

    async def _dead_letter(self, conn: AsyncConnection, bad: Sequence[tuple[Consumed, str]],
                           now: datetime) -> None:
        rows = []
        for message, reason in bad:
            letter = dead_letter_for(message, RejectionCode.SCHEMA_VIOLATION,
                                     f"not a StepCommand: {reason}",
                                     f"participant.{self.participant.name}.SCHEMA_VIOLATION", now,
                                     message_id=message_id_of(message))
            record = dead_letter_record(self.settings, message, letter)
            rows.append(DeadLetterRow(
                dead_letter_id=letter.dead_letter_id, stage=f"participant:{self.participant.name}",
                reason_code=letter.reason_code.value, reason=letter.reason,
                error_class=letter.error_class, original_topic=message.topic,
                original_partition=message.partition, original_offset=message.offset,
                original_key=letter.original_key, payload=message.value,
                headers=encode_headers(message.headers), failed_at=now, saga_id=None,
                transfer_id=None,
            ))
            await conn.execute(
                text("INSERT INTO outbox (topic, key, value, headers) VALUES"
                     " (:t, :k, :v, CAST(:h AS jsonb))"),
                {"t": record.topic, "k": record.key, "v": record.value,
                 "h": json.dumps(encode_headers(record.headers))},
            )
        await insert_dead_letters(conn, rows)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
