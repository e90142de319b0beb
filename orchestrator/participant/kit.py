"""The declarative layer of the participant kit: a handler per action and per compensation.

A team writing a participant service declares what it does with the same `Action` objects its
saga definitions refer to, and never reads the runtime:

    wallet = ParticipantService("wallet", read=read_wallets, effects=(MOVEMENTS,), locks=True)

    @wallet.handles(HOLD)
    def hold(command: StepCommand, wallets: Wallets, now: datetime) -> Decided: ...

    @wallet.compensates(RELEASE)
    def release(command: StepCommand, wallets: Wallets, now: datetime) -> Decided: ...

    WALLET = wallet.participant(CARD_TOPUP)   # every wallet action CARD_TOPUP names is handled

`participant(...)` builds the runnable participant (the low-level `Participant` of
`runtime.py`) and refuses to build it when a definition it is given names an action of this
participant, forward or as a compensation, that has no handler. The runtime underneath is the
same for every participant: one batch read, the pure handlers in batch order, one write of the
effects and their stored replies (ADR 0006); each effect at most once per (saga, step,
direction), stored replies replayed, tombstones for compensations that come first, bad commands
and commands without a handler dead-lettered, offsets committed after the database commit.

Invariants the handlers can rely on:
- a handler sees only commands of the action and direction it was registered for;
- a compensation handler runs only when its forward effect succeeded (the runtime answers
  the other compensations itself, with a no-op and, where needed, a tombstone);
- the view a handler gets was read for its batch (under `read`'s locks on the careful path), and
  the handlers of one batch run in the batch's order on that same view: a handler that changes
  the view (the ledger moves an account's balance) is seen by the commands after it. Nothing
  else sees the view: it is read again for every batch decided.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.core.definition import Action, SagaDefinition
from orchestrator.errors import ConfigurationError
from orchestrator.participant.runtime import Decided, EffectTable, StepResult
from schemas import Direction, StepCommand

V = TypeVar("V")
V_co = TypeVar("V_co", covariant=True)

# The rule for one command: given the command, the batch's view and the time, its answer. A
# StepResult alone is an answer that writes no rows. Pure: no I/O (the read did that).
Handler = Callable[[StepCommand, V, datetime], Decided | StepResult]
# A handler as it is declared: the decorators give it back unchanged, with its own signature,
# so that unit tests call the rule and see its precise types.
H = TypeVar("H", bound=Handler[Any])


class Reader(Protocol[V_co]):
    """What the handlers of a batch need, read once for the whole batch: rows (locked with
    `lock`, until the batch's write committed), a remote verdict. Writes nothing."""

    def __call__(self, conn: AsyncConnection, commands: Sequence[StepCommand], now: datetime,
                 *, lock: bool) -> Awaitable[V_co]: ...


async def _read_nothing(conn: AsyncConnection, commands: Sequence[StepCommand], now: datetime,
                        *, lock: bool) -> None:
    return None


_WORD = {Direction.FORWARD: "forward action", Direction.COMPENSATE: "compensation"}
_DECORATOR = {Direction.FORWARD: "handles", Direction.COMPENSATE: "compensates"}


class ParticipantService(Generic[V]):
    """Collects a participant's handlers; `participant(...)` builds the runnable participant.

    `name` is the `participant` of its actions (its topic is `saga.steps.<name>.v1`).
    `read` is called once per batch (see `Reader`); without it the view is None. `effects` are
    the tables the handlers' rows go to. `locks`: whether the fast path must also hold `read`'s
    locks until its write (see `Participant.locks`): True when the rules depend on rows another
    writer may change between the read and the write, unless the rows written are fenced so
    that a write decided from an outdated read collides on a unique key (the ledger).
    """

    @overload
    def __init__(self: ParticipantService[None], name: str, *,
                 effects: Sequence[EffectTable] = (), locks: bool = False) -> None: ...

    @overload
    def __init__(self, name: str, *, read: Reader[V], effects: Sequence[EffectTable] = (),
                 locks: bool = False) -> None: ...

    def __init__(self, name: str, *, read: Reader[Any] = _read_nothing,
                 effects: Sequence[EffectTable] = (), locks: bool = False) -> None:
        self.name = name
        self.read: Reader[V] = read
        self.effects = tuple(effects)
        self.locks = locks
        self._routes: dict[tuple[str, Direction], Handler[V]] = {}

    def handles(self, *actions: Action) -> Callable[[H], H]:
        """Register the decorated function as the forward rule of `actions`."""
        return self._registering(actions, Direction.FORWARD)

    def compensates(self, *actions: Action) -> Callable[[H], H]:
        """Register the decorated function as the rule of the compensations `actions` (the
        `compensation=` of a step), which undo a forward effect that succeeded."""
        return self._registering(actions, Direction.COMPENSATE)

    def _registering(self, actions: Sequence[Action], direction: Direction
                     ) -> Callable[[H], H]:
        if not actions:
            raise ConfigurationError(f"@{_DECORATOR[direction]}() needs at least one Action")
        for action in actions:
            if action.participant != self.name:
                raise ConfigurationError(
                    f"{action} belongs to participant {action.participant!r}, not to"
                    f" {self.name!r}: register it with that participant's service")

        def register(handler: H) -> H:
            for action in actions:
                key = (action.name, direction)
                if key in self._routes:
                    raise ConfigurationError(
                        f"participant {self.name!r} already has a handler for the"
                        f" {_WORD[direction]} {action}")
                self._routes[key] = handler
            return handler  # unchanged: unit tests call the rule directly

        return register

    def participant(self, *definitions: SagaDefinition) -> ServiceParticipant[V]:
        """The runnable participant, once every action of this participant that `definitions`
        name (forward or as a compensation) has a handler; otherwise a ConfigurationError that
        lists each one missing. Later registrations do not change the participant built."""
        built = ServiceParticipant(self.name, self.read, self.effects, self.locks,
                                   dict(self._routes))
        built.serves(*definitions)
        return built


class ServiceParticipant(Generic[V]):
    """A participant built by `ParticipantService.participant`: the low-level `Participant`
    that the runtime (`ParticipantWorker`) runs, routing each command to its handler."""

    def __init__(self, name: str, read: Reader[V], effects: tuple[EffectTable, ...],
                 locks: bool, routes: dict[tuple[str, Direction], Handler[V]]) -> None:
        self.name = name
        self.effects = effects
        self.locks = locks
        self._read = read
        self._routes = routes

    @property
    def handled(self) -> frozenset[tuple[Action, Direction]]:
        """Every action this participant has a rule for, with its direction."""
        return frozenset((Action(self.name, name), direction)
                         for name, direction in self._routes)

    def serves(self, *definitions: SagaDefinition) -> None:
        """Raise a ConfigurationError, listing each one, unless every action of this participant
        that `definitions` name (forward or as a compensation) has a handler."""
        missing = [
            f"{definition.name}.{step.name}: {_WORD[direction]} {action}"
            f" (@{_DECORATOR[direction]})"
            for definition in definitions
            for step in definition.all_steps
            for action, direction in ((step.action, Direction.FORWARD),
                                      (step.compensation, Direction.COMPENSATE))
            if action is not None and action.participant == self.name
            and (action.name, direction) not in self._routes
        ]
        if missing:
            raise ConfigurationError(
                f"participant {self.name!r} has no handler for: {'; '.join(missing)}")

    def unhandled(self, command: StepCommand) -> str | None:
        if (command.action, command.direction) in self._routes:
            return None
        return (f"participant {self.name!r} has no handler for the"
                f" {_WORD[command.direction]} {command.action!r} (step {command.step!r} of a"
                f" {command.saga_type!r} saga)")

    async def read(self, conn: AsyncConnection, commands: Sequence[StepCommand], now: datetime,
                   *, lock: bool) -> V:
        return await self._read(conn, commands, now, lock=lock)

    def decide(self, commands: Sequence[StepCommand], view: V, now: datetime) -> list[Decided]:
        decided: list[Decided] = []
        for command in commands:
            handler = self._routes.get((command.action, command.direction))
            if handler is None:  # the runtime dead-letters these before it decides
                raise ConfigurationError(self.unhandled(command) or "no handler")
            answer = handler(command, view, now)
            decided.append(answer if isinstance(answer, Decided) else Decided(answer))
        return decided
