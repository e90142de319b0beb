"""The pure decision core: given a saga's state and one incoming message, decide.

No I/O, no clock, no randomness: the caller passes `now`, and every id the core makes is derived
(uuid5) from ids it was given, so deciding twice on the same input yields the same events and
commands. That is what makes a crash-and-redeliver safe: a redelivered message either finds its
effects already recorded (and is ignored) or produces exactly what the lost attempt would have.

State is never stored as truth: `fold(events)` rebuilds it, and the `sagas` table only caches it.

Invariants kept here:
- at most one step command is outstanding per saga (`command_id`); a reply for any other command
  is a duplicate or a late reply and changes nothing;
- compensations run in the reverse order of the forward steps whose effects were applied;
- a terminal saga never changes again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid5

from pydantic import BaseModel

from orchestrator.core.definition import SagaDefinition, Step
from schemas import (
    CompensationFailed,
    Direction,
    Outcome,
    RejectionCode,
    SagaCompensated,
    SagaCompleted,
    SagaEvent,
    SagaFailed,
    SagaRejected,
    SagaStarted,
    StepCommand,
    StepCompensated,
    StepFailed,
    StepReply,
    StepRetryScheduled,
    StepStarted,
    StepSucceeded,
    StepTimedOut,
)

_SAGA_NAMESPACE = UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")


class SagaStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"


TERMINAL_STATUSES = frozenset(
    {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.REJECTED, SagaStatus.FAILED}
)
IN_FLIGHT_STATUSES = frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING})


def saga_id_for(saga_type: str, business_key: str) -> UUID:
    """The saga id is derived from the saga type and the business key, so a second saga for one
    key would collide on the event table's primary key even if every other check were bypassed.

    Sagas started before saga types were generic got `uuid5(namespace, "transfer:<transfer
    id>")`: the transfer type's business key is `str(transfer_id)`, so their ids are the same
    and a redelivered old request still finds its saga. A type's name has no ':' (see
    `SagaType`), so no two (type, key) pairs share a name here."""
    return uuid5(_SAGA_NAMESPACE, f"{saga_type}:{business_key}")


def command_id_for(saga_id: UUID, step: str, direction: Direction, attempt: int) -> UUID:
    return uuid5(saga_id, f"{step}:{direction.value}:{attempt}")


@dataclass(frozen=True)
class SagaState:
    saga_id: UUID
    saga_type: str
    business_key: str
    # The version of its type's definition the saga runs on (None: rejected, it never ran).
    definition_version: int | None
    status: SagaStatus
    version: int
    input: dict[str, Any] = field(default_factory=dict)
    request_hash: str = ""
    step: str | None = None
    direction: Direction | None = None
    attempt: int = 0
    command_id: UUID | None = None
    deadline_at: datetime | None = None
    # Times a command of the current step (in this direction) was re-sent after its deadline
    # passed without a reply; with `attempt` it is what the step spent of its budget.
    resends: int = 0
    # Set while a retry waits out its backoff (no command is outstanding then).
    next_attempt_at: datetime | None = None
    # Forward steps whose effects were applied (or may have been: a step that timed out for
    # good) and were not yet undone, in the order they happened.
    applied: tuple[str, ...] = ()
    failed_step: str | None = None
    failure: str | None = None
    requested_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def due_at(self) -> datetime | None:
        """When the recovery worker must look at this saga: a retry's start or a deadline."""
        if self.terminal:
            return None
        return self.next_attempt_at or self.deadline_at

    def to_json(self) -> dict[str, Any]:
        return {
            "saga_id": str(self.saga_id),
            "saga_type": self.saga_type,
            "business_key": self.business_key,
            "definition_version": self.definition_version,
            "status": self.status.value,
            "version": self.version,
            "input": self.input,
            "request_hash": self.request_hash,
            "step": self.step,
            "direction": self.direction.value if self.direction else None,
            "attempt": self.attempt,
            "command_id": str(self.command_id) if self.command_id else None,
            "deadline_at": self.deadline_at.isoformat() if self.deadline_at else None,
            "resends": self.resends,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "applied": list(self.applied),
            "failed_step": self.failed_step,
            "failure": self.failure,
            "requested_at": self.requested_at.isoformat() if self.requested_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SagaState:
        # A state cached before saga types were generic was rewritten by migration 0009.
        return cls(
            saga_id=UUID(data["saga_id"]),
            saga_type=data["saga_type"],
            business_key=data["business_key"],
            definition_version=data["definition_version"],
            status=SagaStatus(data["status"]),
            version=data["version"],
            input=data["input"],
            request_hash=data["request_hash"],
            step=data["step"],
            direction=Direction(data["direction"]) if data["direction"] else None,
            attempt=data["attempt"],
            command_id=UUID(data["command_id"]) if data["command_id"] else None,
            deadline_at=(
                datetime.fromisoformat(data["deadline_at"]) if data["deadline_at"] else None
            ),
            resends=data.get("resends", 0),
            next_attempt_at=(
                datetime.fromisoformat(data["next_attempt_at"])
                if data.get("next_attempt_at") else None
            ),
            applied=tuple(data["applied"]),
            failed_step=data["failed_step"],
            failure=data["failure"],
            requested_at=(
                datetime.fromisoformat(data["requested_at"]) if data.get("requested_at") else None
            ),
        )


# ---------------------------------------------------------------- fold: events -> state


def evolve(state: SagaState | None, event: SagaEvent) -> SagaState:
    """Apply one event. Pure and total over valid histories; the version counts events."""
    if isinstance(event, SagaStarted):
        return SagaState(
            saga_id=saga_id_for(event.saga_type, event.business_key),
            saga_type=event.saga_type,
            business_key=event.business_key,
            definition_version=event.definition_version,
            status=SagaStatus.RUNNING,
            version=1,
            input=dict(event.input),
            request_hash=event.request_hash,
            requested_at=event.requested_at,
        )
    if isinstance(event, SagaRejected):
        return SagaState(
            saga_id=saga_id_for(event.saga_type, event.business_key),
            saga_type=event.saga_type,
            business_key=event.business_key,
            definition_version=None,
            status=SagaStatus.REJECTED,
            version=1,
            failure=f"{event.reason_code.value}: {event.reason}",
        )
    if state is None:
        raise ValueError(f"{event.type} cannot start a saga's history")
    state = replace(state, version=state.version + 1)
    if isinstance(event, StepStarted):
        status = SagaStatus.RUNNING if event.direction is Direction.FORWARD else (
            SagaStatus.COMPENSATING
        )
        return replace(
            state,
            status=status,
            step=event.step,
            direction=event.direction,
            attempt=event.attempt,
            command_id=event.command_id,
            deadline_at=event.deadline_at,
            # Re-sends spend the step's budget with its attempts: only a new step starts afresh.
            resends=0 if event.attempt == 1 else state.resends,
            next_attempt_at=None,
        )
    if isinstance(event, StepRetryScheduled):
        status = SagaStatus.RUNNING if event.direction is Direction.FORWARD else (
            SagaStatus.COMPENSATING
        )
        return replace(state, status=status, step=event.step, direction=event.direction,
                       command_id=None, deadline_at=None, next_attempt_at=event.not_before)
    if isinstance(event, StepTimedOut):
        if not event.gave_up:
            return replace(state, resends=event.resend, deadline_at=event.deadline_at)
        applied = state.applied
        if event.direction is Direction.FORWARD and event.step not in applied:
            applied = (*applied, event.step)  # outcome unknown: compensate it to be sure
        return replace(state, command_id=None, deadline_at=None, applied=applied,
                       failed_step=event.step,
                       failure=f"TIMED_OUT: no reply to attempt {event.attempt} of "
                               f"{event.step} ({event.direction.value})")
    if isinstance(event, StepSucceeded):
        return replace(state, applied=(*state.applied, event.step), command_id=None,
                       deadline_at=None, failed_step=None, failure=None)
    if isinstance(event, StepFailed):
        return replace(state, command_id=None, deadline_at=None, failed_step=event.step,
                       failure=f"{event.code}: {event.reason}")
    if isinstance(event, StepCompensated):
        applied = tuple(s for s in state.applied if s != event.step)
        return replace(state, applied=applied, command_id=None, deadline_at=None)
    if isinstance(event, CompensationFailed):
        return replace(state, command_id=None, deadline_at=None)
    if isinstance(event, SagaCompleted):
        return replace(state, status=SagaStatus.COMPLETED, step=None, direction=None)
    if isinstance(event, SagaCompensated):
        return replace(state, status=SagaStatus.COMPENSATED, step=None, direction=None)
    if isinstance(event, SagaFailed):
        return replace(state, status=SagaStatus.FAILED, failure=f"{event.step}: {event.reason}")
    raise TypeError(f"unknown event {event!r}")  # pragma: no cover - the union is closed


def fold(events: Iterable[SagaEvent]) -> SagaState | None:
    state: SagaState | None = None
    for event in events:
        state = evolve(state, event)
    return state


# ---------------------------------------------------------------- decide: input -> effects


class Verdict(StrEnum):
    """What the shell should record about the consumed message (the inbox outcome)."""

    STARTED = "started"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    APPLIED = "applied"
    STALE = "stale"
    UNKNOWN_SAGA = "unknown_saga"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    events: tuple[SagaEvent, ...] = ()
    commands: tuple[StepCommand, ...] = ()
    # Set when the consumed message itself must go to the dead-letter topic.
    rejection: tuple[RejectionCode, str] | None = None
    # Set when the saga itself failed for good and must be raised to an operator.
    saga_failed: bool = False


@dataclass(frozen=True)
class StartSaga:
    """A valid start message of a saga type (`SagaType.start` makes one; so does intake)."""

    saga_type: str
    business_key: str
    request: BaseModel
    request_hash: str
    requested_at: datetime | None = None

    @property
    def saga_id(self) -> UUID:
        return saga_id_for(self.saga_type, self.business_key)


@dataclass(frozen=True)
class RejectSaga:
    """An intake message that names a business key but is refused by its type."""

    saga_type: str
    business_key: str
    code: RejectionCode
    reason: str

    @property
    def saga_id(self) -> UUID:
        return saga_id_for(self.saga_type, self.business_key)


def request_hash(request: BaseModel) -> str:
    """Identity of a request's content, to tell a harmless duplicate from a conflicting one."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def decide_start(
    definition: SagaDefinition,
    state: SagaState | None,
    message: StartSaga,
    now: datetime,
) -> Decision:
    """Start a saga of `message.saga_type` on `definition` (its type's current version), or
    tell a duplicate from a conflicting reuse of the business key."""
    if message.saga_type != definition.name:
        raise ValueError(f"a {message.saga_type} start cannot run on the {definition.name} saga")
    if state is not None:
        if state.request_hash == message.request_hash:
            return Decision(Verdict.DUPLICATE)
        return Decision(
            Verdict.CONFLICT,
            rejection=(
                RejectionCode.CONFLICTING_DUPLICATE,
                f"{message.saga_type} {message.business_key} was already requested with a"
                " different payload; the original saga is unchanged",
            ),
        )
    started = SagaStarted(
        saga_type=definition.name,
        business_key=message.business_key,
        definition_version=definition.version,
        input=message.request.model_dump(mode="json"),
        request_hash=message.request_hash,
        requested_at=message.requested_at,
    )
    state = evolve(None, started)
    events, commands = _start_step(definition, state, definition.steps[0], Direction.FORWARD, 1,
                                   now)
    return Decision(Verdict.STARTED, events=(started, *events), commands=commands)


def decide_reject(state: SagaState | None, message: RejectSaga) -> Decision:
    """A refused request: dead-letter it; record a REJECTED saga if its key is still free."""
    rejection = (message.code, message.reason)
    if state is not None:
        return Decision(Verdict.REJECTED, rejection=rejection)
    event = SagaRejected(saga_type=message.saga_type, business_key=message.business_key,
                         reason_code=message.code, reason=message.reason)
    return Decision(Verdict.REJECTED, events=(event,), rejection=rejection)


def decide_reply(
    definition: SagaDefinition | None,
    state: SagaState | None,
    reply: StepReply,
    now: datetime,
) -> Decision:
    """Fold a participant's reply into a saga. `definition` is the one the saga runs on (its
    type and `definition_version`); None only when no saga is known, as the reply is refused."""
    if state is None:
        return Decision(
            Verdict.UNKNOWN_SAGA,
            rejection=(RejectionCode.UNKNOWN_SAGA, f"no saga {reply.saga_id} for this reply"),
        )
    if definition is None:
        raise ValueError(f"saga {state.saga_id} needs its definition to decide on a reply")
    if state.terminal or reply.command_id != state.command_id:
        # A duplicate of a reply already folded in, or a late reply for an attempt that was
        # superseded: the effect it reports is already accounted for by the current attempt.
        return Decision(Verdict.STALE)
    # The command id matched, so the step and direction are the saga's own, not the reply's word.
    assert state.step is not None
    step = definition.step(state.step)
    if state.direction is Direction.FORWARD:
        return _forward_reply(definition, state, step, reply, now)
    return _compensation_reply(definition, state, step, reply, now)


def _forward_reply(
    definition: SagaDefinition, state: SagaState, step: Step, reply: StepReply, now: datetime
) -> Decision:
    if reply.outcome is Outcome.SUCCEEDED:
        succeeded = StepSucceeded(step=step.name, attempt=state.attempt,
                                  command_id=reply.command_id, result=dict(reply.result))
        state = evolve(state, succeeded)
        index = definition.index_of(step.name)
        if index + 1 == len(definition.steps):
            return Decision(Verdict.APPLIED, events=(succeeded, SagaCompleted()))
        events, commands = _start_step(
            definition, state, definition.steps[index + 1], Direction.FORWARD, 1, now
        )
        return Decision(Verdict.APPLIED, events=(succeeded, *events), commands=commands)

    failed = StepFailed(step=step.name, attempt=state.attempt, command_id=reply.command_id,
                        code=reply.code or "FAILED", reason=reply.reason or "",
                        retryable=reply.retryable)
    state = evolve(state, failed)
    # The attempt count is the saga's own: a reply only says which command it answers.
    if reply.retryable and _attempts_left(state, step):
        return Decision(Verdict.APPLIED, events=(failed, _schedule_retry(state, step, now)))
    events, commands = _give_up_forward(definition, state, step, now)
    return Decision(Verdict.APPLIED, events=(failed, *events), commands=commands,
                    saga_failed=_past_pivot(definition, state))


def _compensation_reply(
    definition: SagaDefinition, state: SagaState, step: Step, reply: StepReply, now: datetime
) -> Decision:
    if reply.outcome is Outcome.SUCCEEDED:
        compensated = StepCompensated(step=step.name, attempt=state.attempt,
                                      command_id=reply.command_id)
        state = evolve(state, compensated)
        events, commands = _next_compensation(definition, state, now)
        return Decision(Verdict.APPLIED, events=(compensated, *events), commands=commands)
    failed = CompensationFailed(step=step.name, attempt=state.attempt,
                                command_id=reply.command_id, code=reply.code or "FAILED",
                                reason=reply.reason or "", retryable=reply.retryable)
    state = evolve(state, failed)
    if reply.retryable and _attempts_left(state, step):
        return Decision(Verdict.APPLIED, events=(failed, _schedule_retry(state, step, now)))
    saga_failed = SagaFailed(step=step.name,
                             reason=f"compensation failed: {failed.code}: {failed.reason}")
    return Decision(Verdict.APPLIED, events=(failed, saga_failed), saga_failed=True)


def decide_due(definition: SagaDefinition, state: SagaState, now: datetime) -> Decision | None:
    """What the recovery worker does for a saga whose due time passed; None if it is not due.

    - a retry whose backoff is over starts (a new attempt, a new command id);
    - a command with no reply past its deadline is sent again under the *same* command id, so a
      participant that applied it answers with its stored result instead of applying it twice;
    - when a step's attempts run out on a timeout, a forward step is compensated (its outcome
      is unknown, so it counts as possibly applied) and a compensation fails the saga.
    """
    if state.terminal or state.step is None or state.direction is None:
        return None
    step = definition.step(state.step)
    if state.next_attempt_at is not None:
        if now < state.next_attempt_at:
            return None
        events, commands = _start_step(definition, state, step, state.direction,
                                       state.attempt + 1, now)
        return Decision(Verdict.APPLIED, events=tuple(events), commands=commands)
    if state.command_id is None or state.deadline_at is None or now < state.deadline_at:
        return None
    if _attempts_left(state, step):
        deadline_at = now + timedelta(seconds=step.timeout_s)
        timed_out = StepTimedOut(step=step.name, direction=state.direction,
                                 attempt=state.attempt, command_id=state.command_id,
                                 resend=state.resends + 1, deadline_at=deadline_at)
        command = _command(definition, state, step, state.direction, state.attempt,
                           state.command_id, deadline_at)
        return Decision(Verdict.APPLIED, events=(timed_out,), commands=(command,))
    gave_up = StepTimedOut(step=step.name, direction=state.direction, attempt=state.attempt,
                           command_id=state.command_id, resend=state.resends, gave_up=True)
    state = evolve(state, gave_up)
    if state.direction is Direction.COMPENSATE:
        saga_failed = SagaFailed(step=step.name,
                                 reason=f"compensation timed out: {state.failure}")
        return Decision(Verdict.APPLIED, events=(gave_up, saga_failed), saga_failed=True)
    events, commands = _give_up_forward(definition, state, step, now)
    return Decision(Verdict.APPLIED, events=(gave_up, *events), commands=commands,
                    saga_failed=_past_pivot(definition, state))


def outstanding_command(definition: SagaDefinition, state: SagaState) -> StepCommand | None:
    """The command a saga is waiting on a reply to, exactly as it was last sent (same command
    id, attempt and deadline), or None when it waits for nothing (ended, or a retry whose
    backoff is still running).

    Sent again after a broker lost its logs: the command, or the participant's reply to it,
    may be gone with them. It is the same message, not a new decision, so it appends no event
    and spends none of the step's attempts; a participant that applied it answers with its
    stored reply."""
    if (state.terminal or state.step is None or state.direction is None
            or state.command_id is None or state.deadline_at is None
            or state.next_attempt_at is not None):
        return None
    return _command(definition, state, definition.step(state.step), state.direction,
                    state.attempt, state.command_id, state.deadline_at)


def _attempts_left(state: SagaState, step: Step) -> bool:
    """Attempts and re-sends after a timeout both spend the step's budget."""
    return state.attempt + state.resends < step.max_attempts


def _schedule_retry(state: SagaState, step: Step, now: datetime) -> StepRetryScheduled:
    assert state.direction is not None and state.command_id is None
    seed = command_id_for(state.saga_id, step.name, state.direction, state.attempt)
    delay = step.backoff.delay_s(state.attempt + state.resends, seed)
    return StepRetryScheduled(step=step.name, direction=state.direction,
                              attempt=state.attempt + 1,
                              not_before=now + timedelta(seconds=delay))


def _past_pivot(definition: SagaDefinition, state: SagaState) -> bool:
    return any(definition.step(name).pivot for name in state.applied)


def _give_up_forward(
    definition: SagaDefinition, state: SagaState, step: Step, now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...]]:
    """A forward step failed for good: compensate, unless the pivot was (or may have been)
    passed, after which nothing can be undone and an operator finishes the transfer."""
    if _past_pivot(definition, state):
        return (SagaFailed(step=step.name,
                           reason=f"failed after the pivot: {state.failure or 'failed'}"),), ()
    return _next_compensation(definition, state, now)


def _next_compensation(
    definition: SagaDefinition, state: SagaState, now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...]]:
    """Undo the most recent applied effect that has a compensation, or finish compensating."""
    pending = [name for name in state.applied if definition.step(name).compensation is not None]
    if pending:
        return _start_step(definition, state, definition.step(pending[-1]),
                           Direction.COMPENSATE, 1, now)
    return (
        SagaCompensated(failed_step=state.failed_step or "", reason=state.failure or "failed"),
    ), ()


def _start_step(
    definition: SagaDefinition,
    state: SagaState,
    step: Step,
    direction: Direction,
    attempt: int,
    now: datetime,
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...]]:
    action = step.action if direction is Direction.FORWARD else step.compensation
    assert action is not None, "definition guarantees a compensation for compensable steps"
    command_id = command_id_for(state.saga_id, step.name, direction, attempt)
    deadline_at = now + timedelta(seconds=step.timeout_s)
    started = StepStarted(step=step.name, action=action.name, direction=direction,
                          attempt=attempt, command_id=command_id, deadline_at=deadline_at)
    return (started,), (_command(definition, state, step, direction, attempt, command_id,
                                 deadline_at),)


def _command(definition: SagaDefinition, state: SagaState, step: Step, direction: Direction,
             attempt: int, command_id: UUID, deadline_at: datetime) -> StepCommand:
    action = step.action if direction is Direction.FORWARD else step.compensation
    assert action is not None, "definition guarantees a compensation for compensable steps"
    return StepCommand(
        command_id=command_id,
        saga_id=state.saga_id,
        saga_type=definition.name,
        step=step.name,
        action=action.name,
        direction=direction,
        attempt=attempt,
        deadline_at=deadline_at,
        payload=state.input,
    )


def participant_of(definition: SagaDefinition, command: StepCommand) -> str:
    step = definition.step(command.step)
    action = step.action if command.direction is Direction.FORWARD else step.compensation
    assert action is not None
    return action.participant


__all__ = [
    "IN_FLIGHT_STATUSES",
    "TERMINAL_STATUSES",
    "Decision",
    "RejectSaga",
    "SagaState",
    "SagaStatus",
    "StartSaga",
    "Verdict",
    "command_id_for",
    "decide_due",
    "decide_reject",
    "decide_reply",
    "decide_start",
    "evolve",
    "fold",
    "outstanding_command",
    "participant_of",
    "request_hash",
    "saga_id_for",
]
