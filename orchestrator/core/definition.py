"""The saga definition API: an ordered list of named steps, each with an action and its
compensation (or an explicit statement that it has none), a timeout and an attempt budget.

Rules enforced at construction, so a bad definition never reaches a worker:
- a definition has a version (>= 1): a saga runs to its end on the version it started with,
  so a changed list of steps is a new version of the same saga type, never an edit of one that
  sagas may be running on (see `orchestrator.core.saga_type`);
- step names are unique (they are persisted in events and ledger keys);
- a step with an effect must name its compensation, unless it is the pivot: the step after which
  the saga can only go forward (here: settling the source debit). Steps after the pivot have no
  compensation and must not fail for business reasons.
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


@dataclass(frozen=True)
class SagaDefinition:
    name: str
    steps: tuple[Step, ...]
    # Persisted in `SagaStarted` and the `sagas` row: the version a saga started on is the one
    # it finishes on.
    version: int = 1
    _by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise SagaDefinitionError(f"saga {self.name!r} needs a version >= 1")
        if not self.steps:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise SagaDefinitionError(f"saga {self.name!r} repeats a step name: {names}")
        pivots = [i for i, step in enumerate(self.steps) if step.pivot]
        if len(pivots) > 1:
            raise SagaDefinitionError(f"saga {self.name!r} has more than one pivot step")
        pivot_index = pivots[0] if pivots else len(self.steps)
        for index, step in enumerate(self.steps):
            if step.max_attempts < 1 or step.timeout_s <= 0:
                raise SagaDefinitionError(f"step {step.name!r} needs attempts >= 1, timeout > 0")
            backoff = step.backoff
            if (backoff.initial_s < 0 or backoff.max_s < 0 or backoff.multiplier < 1
                    or not 0 <= backoff.jitter <= 1):
                raise SagaDefinitionError(
                    f"step {step.name!r} needs a backoff with initial_s >= 0, max_s >= 0,"
                    " multiplier >= 1 and 0 <= jitter <= 1")
            needs_compensation = step.has_effect and index < pivot_index
            if needs_compensation and step.compensation is None:
                raise SagaDefinitionError(
                    f"step {step.name!r} has an effect before the pivot but no compensation"
                )
            if not needs_compensation and step.compensation is not None:
                raise SagaDefinitionError(
                    f"step {step.name!r} is the pivot, after it, or has no effect, "
                    "so it must not have a compensation"
                )
        object.__setattr__(self, "_by_name", {name: i for i, name in enumerate(names)})

    def step(self, name: str) -> Step:
        return self.steps[self._by_name[name]]

    def index_of(self, name: str) -> int:
        return self._by_name[name]
