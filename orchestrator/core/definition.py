"""The saga definition API: an ordered list of named steps, each with an action and its
compensation (or an explicit statement that it has none), a timeout and an attempt budget. Steps
that do not depend on each other may be grouped with `Parallel`: the group's steps are sent at
once, and the group is done when every one of them succeeded.

Rules enforced at construction, so a bad definition never reaches a worker:
- a definition has a version (>= 1): a saga runs to its end on the version it started with,
  so a changed list of steps is a new version of the same saga type, never an edit of one that
  sagas may be running on (see `orchestrator.core.saga_type`);
- step names are unique (they are persisted in events and ledger keys), across groups too;
- a step with an effect must name its compensation, unless it is the pivot: the step after which
  the saga can only go forward (here: settling the source debit). Steps after the pivot have no
  compensation and must not fail for business reasons;
- a parallel group has at least two steps, holds steps only (no group in a group), and never
  holds the pivot: a sibling could fail after the pivot succeeded, and after the pivot nothing
  is undone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from uuid import UUID

from orchestrator.errors import SagaDefinitionError


@dataclass(frozen=True)
class Action:
    """One effect (or its undoing) that one participant knows how to apply. Persisted names.

    A saga definition refers to these objects, not to strings, so a typo is an import error and
    a test can prove that every referenced action has a handler."""

    participant: str
    name: str

    def __str__(self) -> str:
        return f"{self.participant}.{self.name}"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter between the attempts of one step.

    The jitter is derived from the attempt's command id instead of a random draw, so the pure
    core stays deterministic (deciding twice gives the same retry time) while sagas that failed
    together still spread out their retries.
    """

    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 5.0
    # Fraction of the delay that is randomised: 0.5 waits between 50% and 100% of it.
    jitter: float = 0.5

    def delay_s(self, failed_attempt: int, seed: UUID) -> float:
        """How long to wait after attempt `failed_attempt` (1-based) failed."""
        base = min(self.max_s, self.initial_s * self.multiplier ** (failed_attempt - 1))
        unit = int.from_bytes(hashlib.sha256(seed.bytes).digest()[:8], "big") / 2**64
        return base * (1 - self.jitter * unit)


@dataclass(frozen=True)
class Step:
    """One step of a saga.

    `timeout_s` bounds one attempt: a command with no reply by then is re-sent (same command id,
    so a participant that already applied it answers with its stored result). Timeouts and
    retryable failures both spend the step's `max_attempts`; when they run out, a forward step
    is treated as possibly applied and the saga compensates.
    """

    name: str
    action: Action
    compensation: Action | None
    timeout_s: float = 10.0
    max_attempts: int = 3
    backoff: Backoff = Backoff()
    has_effect: bool = True
    pivot: bool = False


@dataclass(frozen=True, init=False)
class Parallel:
    """Steps that run at the same time: `Parallel(Step(...), Step(...))` in a definition's steps.

    Every member's command is sent when the group starts, and the saga goes on to the next
    element once every member succeeded. Each member keeps its own attempts, retries and
    timeouts: a member's retryable failure or timeout retries that member only. When a member
    fails for good (or times out for good), the others are waited for (their replies say
    whether they applied their effects), then the members that succeeded or may have are
    compensated, one at a time, most recent first, and then the earlier steps.

    The members' order is the order their commands are sent in; nothing else depends on it."""

    steps: tuple[Step, ...]

    def __init__(self, *steps: Step) -> None:
        object.__setattr__(self, "steps", steps)


@dataclass(frozen=True)
class SagaDefinition:
    """A saga: its `steps` in order, each a `Step` or a `Parallel` group of steps."""

    name: str
    steps: tuple[Step | Parallel, ...]
    # Persisted in `SagaStarted` and the `sagas` row: the version a saga started on is the one
    # it finishes on.
    version: int = 1
    # What the core runs: each stage is one step, or the members of one parallel group.
    stages: tuple[tuple[Step, ...], ...] = field(init=False, repr=False)
    # Every step in the order declared, the members of a group in their place.
    all_steps: tuple[Step, ...] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, int] = field(init=False, repr=False, compare=False)
    _stage_of: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise SagaDefinitionError(f"saga {self.name!r} needs a version >= 1")
        if not self.steps:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")
        stages = tuple(self._stage(element) for element in self.steps)
        all_steps = tuple(step for stage in stages for step in stage)
        names = [step.name for step in all_steps]
        if len(set(names)) != len(names):
            raise SagaDefinitionError(f"saga {self.name!r} repeats a step name: {names}")
        pivots = [i for i, stage in enumerate(stages) for step in stage if step.pivot]
        if len(pivots) > 1:
            raise SagaDefinitionError(f"saga {self.name!r} has more than one pivot step")
        pivot_stage = pivots[0] if pivots else len(stages)
        for stage_index, step in ((i, step) for i, stage in enumerate(stages) for step in stage):
            if step.max_attempts < 1 or step.timeout_s <= 0:
                raise SagaDefinitionError(f"step {step.name!r} needs attempts >= 1, timeout > 0")
            backoff = step.backoff
            if (backoff.initial_s < 0 or backoff.max_s < 0 or backoff.multiplier < 1
                    or not 0 <= backoff.jitter <= 1):
                raise SagaDefinitionError(
                    f"step {step.name!r} needs a backoff with initial_s >= 0, max_s >= 0,"
                    " multiplier >= 1 and 0 <= jitter <= 1")
            needs_compensation = step.has_effect and stage_index < pivot_stage
            if needs_compensation and step.compensation is None:
                raise SagaDefinitionError(
                    f"step {step.name!r} has an effect before the pivot but no compensation"
                )
            if not needs_compensation and step.compensation is not None:
                raise SagaDefinitionError(
                    f"step {step.name!r} is the pivot, after it, or has no effect, "
                    "so it must not have a compensation"
                )
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "all_steps", all_steps)
        object.__setattr__(self, "_by_name", {name: i for i, name in enumerate(names)})
        object.__setattr__(self, "_stage_of", {
            step.name: i for i, stage in enumerate(stages) for step in stage})

    def _stage(self, element: Step | Parallel) -> tuple[Step, ...]:
        if isinstance(element, Step):
            return (element,)
        if not isinstance(element, Parallel):
            raise SagaDefinitionError(
                f"saga {self.name!r}: {element!r} is neither a Step nor a Parallel group")
        members = element.steps
        names = [getattr(member, "name", repr(member)) for member in members]
        if len(members) < 2:
            raise SagaDefinitionError(
                f"saga {self.name!r}: a parallel group needs at least two steps, got {names}")
        for member in members:
            if not isinstance(member, Step):
                raise SagaDefinitionError(
                    f"saga {self.name!r}: a parallel group holds steps only, not {member!r}")
            if member.pivot:
                raise SagaDefinitionError(
                    f"saga {self.name!r}: the pivot {member.name!r} cannot be inside a parallel "
                    f"group {names}: a sibling could still fail after the pivot succeeded, and "
                    "nothing is undone after the pivot; make it a step of its own")
        return members

    def step(self, name: str) -> Step:
        return self.all_steps[self._by_name[name]]

    def index_of(self, name: str) -> int:
        """The step's position among `all_steps`."""
        return self._by_name[name]

    def stage_of(self, name: str) -> int:
        """The position in `stages` of the step, or of the group it is a member of."""
        return self._stage_of[name]
