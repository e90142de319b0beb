"""The pure decision core: given a saga's state and one incoming message, decide.

No I/O, no clock, no randomness: the caller passes `now`, and every id the core makes is derived
(uuid5) from ids it was given, so deciding twice on the same input yields the same events and
commands. That is what makes a crash-and-redeliver safe: a redelivered message either finds its
effects already recorded (and is ignored) or produces exactly what the lost attempt would have.

State is never stored as truth: `fold(events)` rebuilds it, and the `sagas` table only caches it.

Invariants kept here:
- at most one command is outstanding per step run (`SagaState.runs`): one per saga for a
  sequential step, one per member while a parallel group runs; a reply for any other command is
  a duplicate or a late reply and changes nothing;
- a stage (a step, or a parallel group) is left only once every run of it ended: forward when
  each one succeeded, backwards when one failed for good and no sibling is still out;
- compensations run one at a time, in the reverse order in which the forward steps' effects were
  applied (or may have been), so the groups unwind in reverse order too;
- a terminal saga never changes again, except that an operator may close a FAILED one as
  RESOLVED;
- a saga that ends gets exactly one outcome event (`Decision.outcomes`, decided with its
  terminal event, so the shell writes both in one transaction), with an id derived from the saga
  id: deciding again, or answering a duplicate request of an ended saga, yields the same event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar
from uuid import UUID, uuid5

from pydantic import BaseModel

from orchestrator.core.definition import SagaDefinition, Step
from orchestrator.errors import OperatorActionRefused
from schemas import (
    CompensationFailed,
    Direction,
    OperatorActed,
    Outcome,
    RejectionCode,
    SagaCompensated,
    SagaCompensatedOutcome,
    SagaCompleted,
    SagaCompletedOutcome,
    SagaEvent,
    SagaFailed,
    SagaFailedOutcome,
    SagaOutcome,
    SagaRejected,
    SagaRejectedOutcome,
    SagaResolved,
    SagaResolvedOutcome,
    SagaStarted,
    StepCommand,
    StepCompensated,
    StepFailed,
    StepReply,
    StepResent,
    StepRetryScheduled,
    StepStarted,
    StepSucceeded,
    StepTimedOut,
)

_SAGA_NAMESPACE = UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")


_Frozen = TypeVar("_Frozen", "StepRun", "SagaState")
_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _replace(obj: _Frozen, **changes: Any) -> _Frozen:
    """`dataclasses.replace` for the state's frozen dataclasses, without their generated
    `__init__`: a frozen `__init__` sets every field through `object.__setattr__`, and the
    ~50 replacements a saga's events cause were a third of the core's time (docs/performance.md).
    These classes validate nothing at construction, so copying the fields is the same value;
    unknown names are refused as `replace` would."""
    cls = type(obj)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    if not changes.keys() <= names:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(changes.keys() - names)}")
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


class SagaStatus(StrEnum):
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    # A FAILED saga an operator closed (`SagaResolved`).
    RESOLVED = "RESOLVED"


TERMINAL_STATUSES = frozenset(
    {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.REJECTED, SagaStatus.FAILED,
     SagaStatus.RESOLVED}
)
# The events that end a saga (SagaResolved closes one that had ended as FAILED).
_ENDING_EVENTS = (SagaCompleted, SagaCompensated, SagaRejected, SagaFailed, SagaResolved)
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


def outcome_event_id(saga_id: UUID, revived: int = 0) -> UUID:
    """The id of the one outcome event of a saga that ended (completed, compensated, rejected
    or failed): the same on every copy, so readers deduplicate on it. A FAILED saga that an
    operator brought back (`retry_compensation`, or `retry_now` past its pivot) ends again
    later: that is a new outcome, with an id of its own per revival, never a second event
    under the first one's id."""
    return uuid5(saga_id, "outcome") if revived == 0 else uuid5(saga_id, f"outcome:{revived}")


def resolved_event_id(saga_id: UUID) -> UUID:
    """The id of the `resolved` outcome of a FAILED saga an operator closed."""
    return uuid5(saga_id, "outcome:resolved")


def refused_event_id(saga_id: UUID, request_identity: str) -> UUID:
    """The id of the `rejected` outcome of a request refused on a key that already has its saga
    (a conflicting duplicate): one per distinct request, so submitting it again is the same
    event."""
    return uuid5(saga_id, f"outcome:refused:{request_identity}")


@dataclass(frozen=True)
class StepRun:
    """One step of the current stage in one direction, not ended yet.

    It is in one of three conditions:
    - sent: `command_id` and `deadline_at` are set, and a reply (or the deadline) is awaited;
    - waiting: `next_attempt_at` is set: a retry waits out its backoff, nothing is outstanding;
    - failed: neither: it failed, or timed out, for good. It stays until its stage settles, which
      is how the saga knows a parallel group turns back while siblings are still out.
    """

    step: str
    direction: Direction
    attempt: int
    command_id: UUID | None = None
    deadline_at: datetime | None = None
    # Re-sends of this step's commands (in this direction) after a deadline passed with no
    # reply; with `attempt` it is what the step spent of its budget.
    resends: int = 0
    next_attempt_at: datetime | None = None

    @property
    def sent(self) -> bool:
        return self.command_id is not None and self.deadline_at is not None

    @property
    def waiting(self) -> bool:
        return self.next_attempt_at is not None

    @property
    def failed(self) -> bool:
        return not self.sent and not self.waiting

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "direction": self.direction.value,
            "attempt": self.attempt,
            "command_id": str(self.command_id) if self.command_id else None,
            "deadline_at": self.deadline_at.isoformat() if self.deadline_at else None,
            "resends": self.resends,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRun:
        return cls(
            step=data["step"],
            direction=Direction(data["direction"]),
            attempt=data["attempt"],
            command_id=UUID(data["command_id"]) if data["command_id"] else None,
            deadline_at=(
                datetime.fromisoformat(data["deadline_at"]) if data["deadline_at"] else None
            ),
            resends=data["resends"],
            next_attempt_at=(
                datetime.fromisoformat(data["next_attempt_at"])
                if data["next_attempt_at"] else None
            ),
        )


@dataclass(frozen=True)
class SagaState:
    """A saga's state, folded from its events.

    `runs` is what the core decides with: the runs of the current stage that have not ended
    (one for a sequential step; up to one per member of a parallel group; one for the
    compensation under way). The single-step fields (`step`, `direction`, `attempt`,
    `command_id`, `deadline_at`, `resends`, `next_attempt_at`) are the run due first, which for
    a sequential saga is its only one; they feed the `sagas` projection's columns and what
    operators read. When no run is left they keep the last one's, as they always did."""

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
    runs: tuple[StepRun, ...] = ()
    # How the saga ended, for its outcome event: (failed step, reason) when COMPENSATED,
    # (reason code, reason) when REJECTED, (step, reason) when FAILED, (operator, note) when
    # RESOLVED; None otherwise.
    conclusion: tuple[str, str] | None = None
    # How many times an operator brought the saga back from FAILED: each later end publishes
    # an outcome of its own (`outcome_event_id`).
    revived: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def turning_back(self) -> bool:
        """A forward run failed for good: the stage compensates once no sibling is still out."""
        return any(run.failed and run.direction is Direction.FORWARD for run in self.runs)

    @property
    def due_at(self) -> datetime | None:
        """When the recovery worker must look at this saga: the earliest of its runs' deadlines
        and retry starts. A retry of a stage that turns back will never start: not counted."""
        if self.terminal:
            return None
        due = [due_at for _, due_at, _ in _due_runs(self)]
        return min(due) if due else None

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
            "runs": [run.to_json() for run in self.runs],
            "conclusion": list(self.conclusion) if self.conclusion else None,
            # Only when set: every other cached state reads exactly as before.
            **({"revived": self.revived} if self.revived else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SagaState:
        # A state cached before saga types were generic was rewritten by migration 0009.
        state = cls(
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
            runs=tuple(StepRun.from_json(run) for run in data.get("runs", ())),
            conclusion=_conclusion_from_json(data),
            revived=data.get("revived", 0),
        )
        if "runs" not in data:
            # A row cached before parallel groups: a sequential saga between two decisions has
            # one run (a command out, or a retry waiting) or none (ended), as its fields say.
            state = _replace(state, runs=_legacy_runs(state))
        return state


def _conclusion_from_json(data: dict[str, Any]) -> tuple[str, str] | None:
    """A cached state's conclusion; one cached before outcome events (an ended saga a duplicate
    request asks about) has it in `failure`, as `evolve` wrote it there."""
    if data.get("conclusion"):
        first, second = data["conclusion"]
        return (first, second)
    status = data["status"]
    failure = data.get("failure") or ""
    if status == SagaStatus.COMPENSATED:
        return (data.get("failed_step") or "", failure)
    if status in (SagaStatus.REJECTED, SagaStatus.FAILED):
        first, _, second = failure.partition(": ")
        return (first, second)
    return None


def _legacy_runs(state: SagaState) -> tuple[StepRun, ...]:
    if (state.terminal or state.step is None or state.direction is None
            or (state.command_id is None and state.next_attempt_at is None)):
        return ()
    return (StepRun(state.step, state.direction, state.attempt, state.command_id,
                    state.deadline_at, state.resends, state.next_attempt_at),)


def _due_runs(state: SagaState) -> list[tuple[int, datetime, StepRun]]:
    """The runs that will need the recovery worker, with their due times and positions: every
    command sent, and every retry waiting unless its stage turns back."""
    turning_back = state.turning_back
    due = []
    for position, run in enumerate(state.runs):
        if run.sent:
            assert run.deadline_at is not None
            due.append((position, run.deadline_at, run))
        elif run.waiting and not turning_back:
            assert run.next_attempt_at is not None
            due.append((position, run.next_attempt_at, run))
    return due


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
            request_hash=event.request_hash or "",
            failure=f"{event.reason_code.value}: {event.reason}",
            conclusion=(event.reason_code.value, event.reason),
        )
    if state is None:
        raise ValueError(f"{event.type} cannot start a saga's history")
    return _current_run(_evolve(state, event), version=state.version + 1)


def _evolve(state: SagaState, event: SagaEvent) -> SagaState:
    # The first failure for good of a stage is the saga's reason to turn back; a sibling's
    # failure after it does not replace it.
    keeps_failure = state.turning_back
    if isinstance(event, StepStarted):
        status = SagaStatus.RUNNING if event.direction is Direction.FORWARD else (
            SagaStatus.COMPENSATING
        )
        runs = state.runs
        if event.direction is Direction.COMPENSATE:
            # Compensating starts once every forward run of the stage ended.
            runs = tuple(run for run in runs if run.direction is Direction.COMPENSATE)
        earlier = _run(state, event.step, event.direction)
        # Re-sends spend the step's budget with its attempts: only a new step starts afresh.
        resends = 0 if event.attempt == 1 else (earlier.resends if earlier else state.resends)
        run = StepRun(event.step, event.direction, event.attempt, event.command_id,
                      event.deadline_at, resends)
        return _replace(
            state,
            status=status,
            step=event.step,
            direction=event.direction,
            attempt=event.attempt,
            command_id=event.command_id,
            deadline_at=event.deadline_at,
            resends=resends,
            next_attempt_at=None,
            runs=_put(runs, run),
        )
    if isinstance(event, StepRetryScheduled):
        status = SagaStatus.RUNNING if event.direction is Direction.FORWARD else (
            SagaStatus.COMPENSATING
        )
        earlier = _run(state, event.step, event.direction) or StepRun(
            event.step, event.direction, state.attempt, resends=state.resends)
        run = _replace(earlier, command_id=None, deadline_at=None,
                       next_attempt_at=event.not_before)
        return _replace(state, status=status, step=event.step, direction=event.direction,
                        command_id=None, deadline_at=None, next_attempt_at=event.not_before,
                        runs=_put(state.runs, run))
    if isinstance(event, StepTimedOut):
        if not event.gave_up:
            runs = _changed(state.runs, event.step, event.direction, resends=event.resend,
                            deadline_at=event.deadline_at)
            return _replace(state, resends=event.resend, deadline_at=event.deadline_at, runs=runs)
        applied = state.applied
        if event.direction is Direction.FORWARD and event.step not in applied:
            applied = (*applied, event.step)  # outcome unknown: compensate it to be sure
        runs = _changed(state.runs, event.step, event.direction, command_id=None,
                        deadline_at=None)
        state = _replace(state, command_id=None, deadline_at=None, applied=applied, runs=runs)
        if keeps_failure:
            return state
        return _replace(state, failed_step=event.step,
                        failure=f"TIMED_OUT: no reply to attempt {event.attempt} of "
                                f"{event.step} ({event.direction.value})")
    if isinstance(event, StepSucceeded):
        state = _replace(state, applied=(*state.applied, event.step), command_id=None,
                         deadline_at=None,
                         runs=_without(state.runs, event.step, Direction.FORWARD))
        if state.failed_step in (None, event.step):
            # A retry of this step succeeded; another step's failure still stands.
            state = _replace(state, failed_step=None, failure=None)
        return state
    if isinstance(event, StepFailed):
        runs = _changed(state.runs, event.step, Direction.FORWARD, command_id=None,
                        deadline_at=None)
        state = _replace(state, command_id=None, deadline_at=None, runs=runs)
        if keeps_failure:
            return state
        return _replace(state, failed_step=event.step, failure=f"{event.code}: {event.reason}")
    if isinstance(event, StepCompensated):
        applied = tuple(s for s in state.applied if s != event.step)
        return _replace(state, applied=applied, command_id=None, deadline_at=None,
                        runs=_without(state.runs, event.step, Direction.COMPENSATE))
    if isinstance(event, CompensationFailed):
        runs = _changed(state.runs, event.step, Direction.COMPENSATE, command_id=None,
                        deadline_at=None)
        return _replace(state, command_id=None, deadline_at=None, runs=runs)
    if isinstance(event, SagaCompleted):
        return _replace(state, status=SagaStatus.COMPLETED, step=None, direction=None, runs=())
    if isinstance(event, SagaCompensated):
        return _replace(state, status=SagaStatus.COMPENSATED, step=None, direction=None,
                        runs=(), conclusion=(event.failed_step, event.reason))
    if isinstance(event, SagaFailed):
        return _replace(state, status=SagaStatus.FAILED, failure=f"{event.step}: {event.reason}",
                        runs=(), conclusion=(event.step, event.reason))
    if isinstance(event, SagaResolved):
        return _replace(state, status=SagaStatus.RESOLVED,
                        conclusion=(event.resolved_by, event.note))
    # Operator actions last: the messages of a saga's normal run never reach them.
    if isinstance(event, StepResent):
        runs = _changed(state.runs, event.step, event.direction, deadline_at=event.deadline_at)
        return _replace(state, deadline_at=event.deadline_at, runs=runs)
    if isinstance(event, OperatorActed):
        return _operator_acted(state, event)
    raise TypeError(f"unknown event {event!r}")  # pragma: no cover - the union is closed


def _operator_acted(state: SagaState, event: OperatorActed) -> SagaState:
    if event.action == "cancel":
        # As if the forward runs had failed for good: one whose command is out may have been
        # applied (or be applied when it arrives late), so it counts as applied and is
        # compensated, as after a timeout given up; a retry waiting applied nothing.
        forward = [run for run in state.runs if run.direction is Direction.FORWARD]
        applied = state.applied + tuple(
            run.step for run in forward if run.sent and run.step not in state.applied)
        return _replace(state, applied=applied,
                        runs=tuple(r for r in state.runs if r.direction is Direction.COMPENSATE),
                        command_id=None, deadline_at=None, next_attempt_at=None,
                        failed_step=state.step,
                        failure=f"CANCELLED: {event.reason} (by {event.actor})")
    if event.action == "retry_compensation":
        # The compensation that failed starts again with the next event (`StepStarted`).
        return _replace(state, status=SagaStatus.COMPENSATING, conclusion=None, runs=(),
                        revived=state.revived + 1)
    if event.action == "retry_now" and state.status is SagaStatus.FAILED:
        # A saga that failed going forward runs again from the step that failed, sent with
        # the next event (`StepStarted`); its next end is a new outcome.
        return _replace(state, status=SagaStatus.RUNNING, conclusion=None, runs=(),
                        revived=state.revived + 1)
    return state  # retry_now in flight: the runs change with the events that follow it


def _run(state: SagaState, step: str, direction: Direction) -> StepRun | None:
    for run in state.runs:
        if (run.step, run.direction) == (step, direction):
            return run
    return None


def _put(runs: tuple[StepRun, ...], run: StepRun) -> tuple[StepRun, ...]:
    """`runs` with `run` in place of the step's run in its direction, or added at the end."""
    key = (run.step, run.direction)
    if any((r.step, r.direction) == key for r in runs):
        return tuple(run if (r.step, r.direction) == key else r for r in runs)
    return (*runs, run)


def _changed(runs: tuple[StepRun, ...], step: str, direction: Direction, **changes: Any
             ) -> tuple[StepRun, ...]:
    """`runs` with the step's run in that direction changed as given (if it has one)."""
    return tuple(_replace(run, **changes) if (run.step, run.direction) == (step, direction)
                 else run for run in runs)


def _without(runs: tuple[StepRun, ...], step: str, direction: Direction
             ) -> tuple[StepRun, ...]:
    return tuple(run for run in runs if (run.step, run.direction) != (step, direction))


def _current_run(state: SagaState, version: int) -> SagaState:
    """`state` at `version`, its single-step fields following the run due first (by due time,
    then the order the runs started in). For a sequential saga that is its one run, whose
    fields the event just set the same way, so they read exactly as they did before parallel
    groups. One replacement for both: they are the core's main cost."""
    due = _due_runs(state)
    if not due:
        return _replace(state, version=version)
    _, _, run = min(due, key=lambda item: (item[1], item[0]))
    return _replace(state, version=version, step=run.step, direction=run.direction,
                    attempt=run.attempt, command_id=run.command_id,
                    deadline_at=run.deadline_at, resends=run.resends,
                    next_attempt_at=run.next_attempt_at)


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
    # Outcome events for the saga type's events topic, written with `events` in one
    # transaction: the saga's when it ended, or the answer to a refused or duplicate request.
    outcomes: tuple[SagaOutcome, ...] = ()


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
    # The request's hash when it was a valid start message (refused by an intake check).
    request_hash: str | None = None

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
            # Asked again: an ended saga answers again with the same outcome event (same id),
            # so a client that subscribed after it was first published still hears it.
            return Decision(Verdict.DUPLICATE,
                            outcomes=(outcome_of(state),) if state.terminal else ())
        reason = (f"{message.saga_type} {message.business_key} was already requested with a"
                  " different payload; the original saga is unchanged")
        return Decision(
            Verdict.CONFLICT,
            rejection=(RejectionCode.CONFLICTING_DUPLICATE, reason),
            outcomes=(_refused(state, message.request_hash, RejectionCode.CONFLICTING_DUPLICATE,
                               reason),),
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
    events, commands = _start_steps(definition, state, definition.stages[0], now)
    return Decision(Verdict.STARTED, events=(started, *events), commands=commands)


def decide_reject(state: SagaState | None, message: RejectSaga) -> Decision:
    """A refused request: dead-letter it; record a REJECTED saga if its key is still free."""
    rejection = (message.code, message.reason)
    if state is not None:
        if (state.status is SagaStatus.REJECTED
                and state.conclusion == (message.code.value, message.reason)
                and state.request_hash == (message.request_hash or "")):
            # The refused request again: the same answer as the first time.
            return Decision(Verdict.REJECTED, rejection=rejection, outcomes=(outcome_of(state),))
        identity = message.request_hash or hashlib.sha256(
            f"{message.code.value}:{message.reason}".encode()).hexdigest()
        return Decision(Verdict.REJECTED, rejection=rejection,
                        outcomes=(_refused(state, identity, message.code, message.reason,
                                           message.request_hash),))
    event = SagaRejected(saga_type=message.saga_type, business_key=message.business_key,
                         reason_code=message.code, reason=message.reason,
                         request_hash=message.request_hash)
    return Decision(Verdict.REJECTED, events=(event,), rejection=rejection,
                    outcomes=(outcome_of(evolve(None, event)),))


def decide_resolve(state: SagaState, resolved_by: str, note: str,
                   action_id: UUID | None = None) -> Decision:
    """An operator closes a FAILED saga (after setting right, outside the engine, what it left):
    a `SagaResolved` event and the `resolved` outcome. Only a FAILED saga can be resolved; a
    saga resolved already is refused too, so the outcome is published once. The note (the
    operator's reason) is mandatory."""
    if state.status is not SagaStatus.FAILED:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is {state.status.value}: only a FAILED saga can be resolved")
    if not resolved_by.strip():
        raise OperatorActionRefused("say who resolves the saga")
    if not note.strip():
        raise OperatorActionRefused("say why the saga is resolved (what was set right, where)")
    event = SagaResolved(resolved_by=resolved_by, note=note, action_id=action_id)
    return Decision(Verdict.APPLIED, events=(event,),
                    outcomes=(outcome_of(evolve(state, event)),))


class OperatorAction(StrEnum):
    """What an operator may ask of a saga (persisted in `OperatorActed.action`: never renamed)."""

    RETRY_NOW = "retry_now"
    CANCEL = "cancel"
    RETRY_COMPENSATION = "retry_compensation"
    RESOLVE = "resolve"


@dataclass(frozen=True)
class ActOnSaga:
    """An operator's action on one saga: `action_id` is the caller's (one per request, so the
    same request sent twice acts once), `actor` who asks, `reason` why."""

    action: OperatorAction
    action_id: UUID
    actor: str
    reason: str


def decide_action(definition: SagaDefinition | None, state: SagaState, request: ActOnSaga,
                  now: datetime) -> Decision:
    """Decide an operator's action like any other message: the events that record it (first,
    `OperatorActed` with the actor and the reason, or `SagaResolved`) and what it causes.
    Raises OperatorActionRefused, saying why, when the saga's state does not allow it; nothing
    is decided then. `definition` is the saga's (None only for a saga that never ran)."""
    actor, reason = request.actor.strip(), request.reason.strip()
    if not actor:
        raise OperatorActionRefused("say who acts: an operator action records its actor")
    if not reason:
        raise OperatorActionRefused("give a reason: an operator action records why it was taken")
    if request.action is OperatorAction.RESOLVE:
        return decide_resolve(state, actor, reason, request.action_id)
    if definition is None:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is {state.status.value}: it never ran, nothing to act on")
    acted = OperatorActed(action=request.action.value, action_id=request.action_id,
                          actor=actor, reason=reason)
    if request.action is OperatorAction.RETRY_NOW:
        return _retry_now(definition, state, acted, now)
    if request.action is OperatorAction.CANCEL:
        return _cancel(definition, state, acted, now)
    return _retry_compensation(definition, state, acted, now)


def _retry_now(definition: SagaDefinition, state: SagaState, acted: OperatorActed,
               now: datetime) -> Decision:
    """Every run the recovery worker would act on at its due time, now: a retry waiting starts
    its next attempt, a command out is sent again (same id, a new deadline, no attempt spent)."""
    if state.status is SagaStatus.FAILED:
        return _retry_failed_forward(definition, state, acted, now)
    if state.status not in IN_FLIGHT_STATUSES:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is {state.status.value}: only a running, compensating or"
            " FAILED saga can be retried now")
    due = sorted(_due_runs(state), key=lambda item: (item[1], item[0]))
    if not due:
        raise OperatorActionRefused(
            f"saga {state.saga_id} waits on no retry and no command: nothing to retry now")
    events: list[SagaEvent] = [acted]
    commands: list[StepCommand] = []
    current = evolve(state, acted)
    for _, _, run in due:
        step = definition.step(run.step)
        if run.waiting:
            acts, sent = _start_step(definition, current, step, run.direction, run.attempt + 1,
                                     now)
        else:
            assert run.command_id is not None
            deadline_at = now + timedelta(seconds=step.timeout_s)
            acts = (StepResent(step=step.name, direction=run.direction, attempt=run.attempt,
                               command_id=run.command_id, deadline_at=deadline_at),)
            sent = (_command(definition, current, step, run.direction, run.attempt,
                             run.command_id, deadline_at),)
        for event in acts:
            current = evolve(current, event)
        events += acts
        commands += sent
    return Decision(Verdict.APPLIED, events=tuple(events), commands=tuple(commands))


def _cancel(definition: SagaDefinition, state: SagaState, acted: OperatorActed,
            now: datetime) -> Decision:
    """A running saga turns back as if its current step had failed for good. Not after the
    pivot (nothing is undone after it), nor while the pivot's command is out (its reply says
    whether the saga is past it)."""
    if state.status is SagaStatus.COMPENSATING:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is COMPENSATING already: it is undoing its steps")
    if state.status is not SagaStatus.RUNNING:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is {state.status.value}: only a running saga can be"
            " cancelled")
    pivot = next((name for name in state.applied if definition.step(name).pivot), None)
    if pivot is not None:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is past its pivot: step {pivot} succeeded, and a"
            f" {state.saga_type} cannot be undone after it; it finishes forward")
    in_flight = next((run.step for run in state.runs
                      if run.sent and definition.step(run.step).pivot), None)
    if in_flight is not None:
        raise OperatorActionRefused(
            f"saga {state.saga_id} waits on its pivot step {in_flight}, which may have"
            " succeeded: cancel is refused until its reply says (if it failed, the saga"
            " compensates by itself)")
    current = evolve(state, acted)
    events, commands = _next_compensation(definition, current, now)
    return _concluded(state, Decision(Verdict.APPLIED, events=(acted, *events),
                                      commands=commands))


def _retry_failed_forward(definition: SagaDefinition, state: SagaState, acted: OperatorActed,
                          now: datetime) -> Decision:
    """A saga that FAILED going forward (past its pivot: before it, a failure compensates)
    sends the step that failed again, at its next attempt (a new command id), and goes on from
    there. The participant applies a step at most once per saga and direction: one that had
    applied it answers its stored reply, one that had not applies it now."""
    if state.direction is not Direction.FORWARD or state.step is None:
        raise OperatorActionRefused(
            f"saga {state.saga_id} FAILED while compensating: retry its compensation"
            " (retry-compensation), or resolve it")
    step = definition.step(state.step)
    current = evolve(state, acted)
    events, commands = _start_step(definition, current, step, Direction.FORWARD,
                                   state.attempt + 1, now)
    return Decision(Verdict.APPLIED, events=(acted, *events), commands=commands)


def _retry_compensation(definition: SagaDefinition, state: SagaState, acted: OperatorActed,
                        now: datetime) -> Decision:
    """A saga that FAILED while compensating compensates again, from the compensation that
    failed: its next attempt (a new command id; what is left of its budget, at least this
    one attempt), then the ones before it as usual."""
    if state.status is not SagaStatus.FAILED:
        raise OperatorActionRefused(
            f"saga {state.saga_id} is {state.status.value}: only a FAILED saga can retry its"
            " compensation")
    pending = [name for name in state.applied if definition.step(name).compensation is not None]
    if state.direction is not Direction.COMPENSATE or not pending:
        raise OperatorActionRefused(
            f"saga {state.saga_id} failed going forward (step {state.step}), not while"
            " compensating: there is no compensation to retry; send the step again"
            " (retry-now), or set it right by hand and resolve it")
    step = definition.step(pending[-1])
    attempt = state.attempt + 1 if step.name == state.step else 1
    current = evolve(state, acted)
    events, commands = _start_step(definition, current, step, Direction.COMPENSATE, attempt, now)
    return Decision(Verdict.APPLIED, events=(acted, *events), commands=commands)


def outcome_of(state: SagaState) -> SagaOutcome:
    """The outcome event of a saga that ended, from its state alone, so the same state always
    gives the same event (the first publication, and every answer to a duplicate request)."""
    common: dict[str, Any] = {
        "event_id": outcome_event_id(state.saga_id, state.revived), "saga_id": state.saga_id,
        "saga_type": state.saga_type, "business_key": state.business_key,
        "request_hash": state.request_hash or None,
    }
    first, second = state.conclusion or ("", "")
    if state.status is SagaStatus.COMPLETED:
        return SagaCompletedOutcome(**common)
    if state.status is SagaStatus.COMPENSATED:
        return SagaCompensatedOutcome(**common, failed_step=first, reason=second)
    if state.status is SagaStatus.REJECTED:
        return SagaRejectedOutcome(**common, reason_code=RejectionCode(first), reason=second)
    if state.status is SagaStatus.FAILED:
        return SagaFailedOutcome(**common, step=first, reason=second)
    if state.status is SagaStatus.RESOLVED:
        return SagaResolvedOutcome(**{**common, "event_id": resolved_event_id(state.saga_id)},
                                   resolved_by=first, note=second)
    raise ValueError(f"saga {state.saga_id} is {state.status.value}: it has not ended")


def _refused(state: SagaState, identity: str, code: RejectionCode, reason: str,
             request_hash: str | None = None) -> SagaRejectedOutcome:
    """The answer to a request refused on a key that has its saga already: about that request,
    not the saga (which is unchanged and publishes its own outcome)."""
    return SagaRejectedOutcome(
        event_id=refused_event_id(state.saga_id, identity), saga_id=state.saga_id,
        saga_type=state.saga_type, business_key=state.business_key,
        request_hash=request_hash if code is not RejectionCode.CONFLICTING_DUPLICATE
        else identity,
        reason_code=code, reason=reason)


def _concluded(state: SagaState, decision: Decision) -> Decision:
    """`decision` with its saga's outcome event if one of its events ends the saga. Only then
    is the state folded again: a decision that ends nothing costs one type check per event."""
    if not any(isinstance(event, _ENDING_EVENTS) for event in decision.events):
        return decision
    for event in decision.events:
        state = evolve(state, event)
    return replace(decision, outcomes=(*decision.outcomes, outcome_of(state)))


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
    run = None if state.terminal else next(
        (run for run in state.runs if run.sent and run.command_id == reply.command_id), None)
    if run is None:
        # A duplicate of a reply already folded in, or a late reply for an attempt that was
        # superseded or given up on: the effect it reports is already accounted for (by the
        # current attempt, or by compensating a step that timed out for good).
        return Decision(Verdict.STALE)
    # The command id matched, so the step and direction are the saga's own, not the reply's word.
    step = definition.step(run.step)
    if run.direction is Direction.FORWARD:
        return _concluded(state, _forward_reply(definition, state, run, step, reply, now))
    return _concluded(state, _compensation_reply(definition, state, run, step, reply, now))


def _forward_reply(
    definition: SagaDefinition, state: SagaState, run: StepRun, step: Step, reply: StepReply,
    now: datetime,
) -> Decision:
    if reply.outcome is Outcome.SUCCEEDED:
        succeeded = StepSucceeded(step=step.name, attempt=run.attempt,
                                  command_id=reply.command_id, result=dict(reply.result),
                                  applied_by=reply.applied_by)
        state = evolve(state, succeeded)
        events, commands, saga_failed = _stage_settled(definition, state, step, now)
        return Decision(Verdict.APPLIED, events=(succeeded, *events), commands=commands,
                        saga_failed=saga_failed)

    failed = StepFailed(step=step.name, attempt=run.attempt, command_id=reply.command_id,
                        code=reply.code or "FAILED", reason=reply.reason or "",
                        retryable=reply.retryable, applied_by=reply.applied_by)
    # A sibling already failed for good: the stage turns back, so nothing is retried.
    turning_back = state.turning_back
    state = evolve(state, failed)
    # The attempt count is the saga's own: a reply only says which command it answers.
    if reply.retryable and not turning_back and _attempts_left(run, step):
        return Decision(Verdict.APPLIED, events=(failed, _schedule_retry(state, run, step, now)))
    events, commands, saga_failed = _stage_settled(definition, state, step, now)
    return Decision(Verdict.APPLIED, events=(failed, *events), commands=commands,
                    saga_failed=saga_failed)


def _stage_settled(
    definition: SagaDefinition, state: SagaState, step: Step, now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...], bool]:
    """A forward run of `step`'s stage just ended: go on if every run of the stage succeeded,
    turn back if one failed for good, or wait while a sibling is still out.

    A sibling whose command is out is waited for even when the stage turns back: its reply
    says whether its effect was applied, so only what was (or may have been) is compensated.
    A sibling waiting out a retry's backoff is not: a retryable failure applied nothing, and a
    stage that turns back retries nothing. Returns the events, the commands, and whether the
    saga failed for good."""
    runs = [run for run in state.runs if run.direction is Direction.FORWARD]
    if any(run.sent for run in runs):
        return (), (), False
    if not state.turning_back:
        if any(run.waiting for run in runs):
            return (), (), False
        steps = _next_steps(definition, state)
        if not steps:
            return (SagaCompleted(),), (), False
        events, commands = _start_steps(definition, state, steps, now)
        return events, commands, False
    events, commands = _give_up_forward(definition, state, step, now)
    return events, commands, _past_pivot(definition, state)


def _next_steps(definition: SagaDefinition, state: SagaState) -> tuple[Step, ...]:
    """The steps to start once a stage succeeded: the first stage with a step that has not
    succeeded, less the ones that have.

    That is the whole next stage, except for a saga that began under an earlier version of its
    definition, whose history is what counts: one that ran `screen` alone before `screen` and
    `reserve` became a group starts `reserve` next, and one that ran them as a group under a
    definition that no longer groups them never starts `reserve` twice."""
    for stage in definition.stages:
        steps = tuple(step for step in stage if step.name not in state.applied)
        if steps:
            return steps
    return ()


def _compensation_reply(
    definition: SagaDefinition, state: SagaState, run: StepRun, step: Step, reply: StepReply,
    now: datetime,
) -> Decision:
    if reply.outcome is Outcome.SUCCEEDED:
        compensated = StepCompensated(step=step.name, attempt=run.attempt,
                                      command_id=reply.command_id, applied_by=reply.applied_by)
        state = evolve(state, compensated)
        events, commands = _next_compensation(definition, state, now)
        return Decision(Verdict.APPLIED, events=(compensated, *events), commands=commands)
    failed = CompensationFailed(step=step.name, attempt=run.attempt,
                                command_id=reply.command_id, code=reply.code or "FAILED",
                                reason=reply.reason or "", retryable=reply.retryable,
                                applied_by=reply.applied_by)
    state = evolve(state, failed)
    if reply.retryable and _attempts_left(run, step):
        return Decision(Verdict.APPLIED, events=(failed, _schedule_retry(state, run, step, now)))
    saga_failed = SagaFailed(step=step.name,
                             reason=f"compensation failed: {failed.code}: {failed.reason}")
    return Decision(Verdict.APPLIED, events=(failed, saga_failed), saga_failed=True)


def decide_due(definition: SagaDefinition, state: SagaState, now: datetime) -> Decision | None:
    """What the recovery worker does for a saga whose due time passed; None if it is not due.

    For each of its runs that is due (earliest first; several at once only in a parallel group):
    - a retry whose backoff is over starts (a new attempt, a new command id);
    - a command with no reply past its deadline is sent again under the *same* command id, so a
      participant that applied it answers with its stored result instead of applying it twice;
    - when a step's attempts run out on a timeout, a forward step is compensated (its outcome
      is unknown, so it counts as possibly applied) once its stage settled, and a compensation
      fails the saga.
    """
    events: list[SagaEvent] = []
    commands: list[StepCommand] = []
    saga_failed = False
    found = state
    while not state.terminal:
        due = [(position, due_at, run) for position, due_at, run in _due_runs(state)
               if due_at <= now]
        if not due:
            break
        _, _, run = min(due, key=lambda item: (item[1], item[0]))
        acted, sent, failed = _run_due(definition, state, run, now)
        for event in acted:
            state = evolve(state, event)
        events += acted
        commands += sent
        saga_failed = saga_failed or failed
    if not events:
        return None
    return _concluded(found, Decision(Verdict.APPLIED, events=tuple(events),
                                      commands=tuple(commands), saga_failed=saga_failed))


def _run_due(
    definition: SagaDefinition, state: SagaState, run: StepRun, now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...], bool]:
    """What is done for one run that is due: each action moves its due time past `now` or
    ends the run, so `decide_due` acts on a run at most once per call."""
    step = definition.step(run.step)
    if run.waiting:
        events, commands = _start_step(definition, state, step, run.direction, run.attempt + 1,
                                       now)
        return events, commands, False
    assert run.command_id is not None
    if _attempts_left(run, step):
        deadline_at = now + timedelta(seconds=step.timeout_s)
        timed_out = StepTimedOut(step=step.name, direction=run.direction, attempt=run.attempt,
                                 command_id=run.command_id, resend=run.resends + 1,
                                 deadline_at=deadline_at)
        command = _command(definition, state, step, run.direction, run.attempt, run.command_id,
                           deadline_at)
        return (timed_out,), (command,), False
    gave_up = StepTimedOut(step=step.name, direction=run.direction, attempt=run.attempt,
                           command_id=run.command_id, resend=run.resends, gave_up=True)
    state = evolve(state, gave_up)
    if run.direction is Direction.COMPENSATE:
        saga_failed = SagaFailed(step=step.name,
                                 reason=f"compensation timed out: {state.failure}")
        return (gave_up, saga_failed), (), True
    events, commands, failed = _stage_settled(definition, state, step, now)
    return (gave_up, *events), commands, failed


def outstanding_commands(definition: SagaDefinition, state: SagaState
                         ) -> tuple[StepCommand, ...]:
    """The commands a saga is waiting on replies to, exactly as they were last sent (same
    command id, attempt and deadline), in the order their runs started: one for a sequential
    step, up to one per member of a parallel group, none when it waits for nothing (ended, or
    every run waits out a retry's backoff).

    Sent again after a broker lost its logs: a command, or the participant's reply to it, may
    be gone with them. It is the same message, not a new decision, so it appends no event and
    spends none of the step's attempts; a participant that applied it answers with its stored
    reply."""
    if state.terminal:
        return ()
    commands = []
    for run in state.runs:
        if run.sent:
            assert run.command_id is not None and run.deadline_at is not None
            commands.append(_command(definition, state, definition.step(run.step),
                                     run.direction, run.attempt, run.command_id,
                                     run.deadline_at))
    return tuple(commands)


def outstanding_command(definition: SagaDefinition, state: SagaState) -> StepCommand | None:
    """The one command a saga waits on, for a saga that cannot have several (no parallel
    group running); `outstanding_commands` in general. Raises ValueError rather than leave
    one of several out."""
    commands = outstanding_commands(definition, state)
    if len(commands) > 1:
        raise ValueError(f"saga {state.saga_id} waits on {len(commands)} commands: "
                         "use outstanding_commands")
    return commands[0] if commands else None


def _attempts_left(run: StepRun, step: Step) -> bool:
    """Attempts and re-sends after a timeout both spend the step's budget."""
    return run.attempt + run.resends < step.max_attempts


def _schedule_retry(state: SagaState, run: StepRun, step: Step, now: datetime
                    ) -> StepRetryScheduled:
    seed = command_id_for(state.saga_id, step.name, run.direction, run.attempt)
    delay = step.backoff.delay_s(run.attempt + run.resends, seed)
    return StepRetryScheduled(step=step.name, direction=run.direction, attempt=run.attempt + 1,
                              not_before=now + timedelta(seconds=delay))


def _past_pivot(definition: SagaDefinition, state: SagaState) -> bool:
    return any(definition.step(name).pivot for name in state.applied)


def _give_up_forward(
    definition: SagaDefinition, state: SagaState, step: Step, now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...]]:
    """A forward stage failed for good: compensate, unless the pivot was (or may have been)
    passed, after which nothing can be undone and an operator finishes the transfer."""
    if _past_pivot(definition, state):
        return (SagaFailed(step=state.failed_step or step.name,
                           reason=f"failed after the pivot: {state.failure or 'failed'}"),), ()
    return _next_compensation(definition, state, now)


def _next_compensation(
    definition: SagaDefinition, state: SagaState, now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...]]:
    """Undo the most recent applied effect that has a compensation, or finish compensating.

    `applied` is in the order the effects were applied (the members of a parallel group in the
    order their replies came), and a stage starts only after the one before it succeeded
    whole: so the groups unwind in reverse order, each member of one before any step before
    it."""
    pending = [name for name in state.applied if definition.step(name).compensation is not None]
    if pending:
        return _start_step(definition, state, definition.step(pending[-1]),
                           Direction.COMPENSATE, 1, now)
    return (
        SagaCompensated(failed_step=state.failed_step or "", reason=state.failure or "failed"),
    ), ()


def _start_steps(
    definition: SagaDefinition, state: SagaState, steps: Sequence[Step], now: datetime
) -> tuple[Sequence[SagaEvent], tuple[StepCommand, ...]]:
    """Start `steps` forward at once: one step, or the members of a group."""
    events: list[SagaEvent] = []
    commands: list[StepCommand] = []
    for step in steps:
        started, sent = _start_step(definition, state, step, Direction.FORWARD, 1, now)
        events += started
        commands += sent
    return events, tuple(commands)


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
    "ActOnSaga",
    "Decision",
    "OperatorAction",
    "RejectSaga",
    "SagaState",
    "SagaStatus",
    "StartSaga",
    "StepRun",
    "Verdict",
    "command_id_for",
    "decide_action",
    "decide_due",
    "decide_reject",
    "decide_reply",
    "decide_resolve",
    "decide_start",
    "evolve",
    "fold",
    "outcome_event_id",
    "outcome_of",
    "outstanding_command",
    "outstanding_commands",
    "participant_of",
    "refused_event_id",
    "request_hash",
    "resolved_event_id",
    "saga_id_for",
]
