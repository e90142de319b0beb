"""Operator actions on one saga: retry now, cancel, retry compensation, resolve.

Each is decided by the pure core (`decide_action`) and recorded like any consumed message, in
one transaction (`store.write_batch`): the events (`OperatorActed` or `SagaResolved` first,
with the operator as their actor, then what the action caused), the `sagas` projection, the
outbox rows (the commands it sends, the outcome event if the saga ended) and an inbox row of
the consumer `operator` keyed by the action id. The relay publishes the outbox rows after the
commit, as it does every row that no worker published itself.

Why this cannot race the workers (ADR 0019):
- the saga's row is locked (`SELECT ... FOR UPDATE`) before its state is read, so the recovery
  worker (`FOR UPDATE SKIP LOCKED`) passes it by, and a careful-path orchestrator transaction
  that read it before decided from a version whose next `seq` this transaction takes;
- the orchestrator's known-state path takes no lock: it appends `seq` = its known version + 1,
  which collides with the events written here on the `(saga_id, seq)` key, so whichever commits
  second fails whole (ConcurrencyConflict) and decides again from the stored state. If both
  wait on each other (its event row against this row lock), PostgreSQL breaks the deadlock by
  failing one of them (StoreUnavailable): a worker retries its batch, `act_on_saga` its action.
- The inbox key `(operator, action id)` makes the same action sent twice act once: a repeat
  finds the first one's row and answers with what it recorded; two at once serialize on the row
  lock, and the second finds the first's inbox row.

A refused action (the saga's state does not allow it: OperatorActionRefused) writes nothing;
sent again, it is decided again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orchestrator import tracing
from orchestrator.core.saga import (
    ActOnSaga,
    OperatorAction,
    SagaState,
    decide_action,
    evolve,
    fold,
    outcome_of,
)
from orchestrator.core.saga_type import SagaTypes
from orchestrator.errors import ConcurrencyConflict, Conflict, NotFound, StoreUnavailable
from orchestrator.postgres import store
from orchestrator.settings import Settings
from orchestrator.workers.saga_worker import command_row, outcome_row
from schemas import SagaOutcome

OPERATOR_CONSUMER = "operator"
# A lost race (ConcurrencyConflict) or a broken deadlock costs one more try; more than this
# many in a row means the saga is too busy to act on by hand right now.
_TRIES = 5


@dataclass(frozen=True)
class ActionResult:
    """What an action did: the events it recorded (their types), how many commands it sent,
    the saga's status right after it and, if it ended the saga, its outcome event. `repeated`
    says this is the answer to a repeat of an action already done (same action id)."""

    action_id: UUID
    action: OperatorAction
    saga_id: UUID
    saga_type: str
    business_key: str
    actor: str
    reason: str
    status: str
    events: tuple[str, ...]
    commands: int
    outcome: SagaOutcome | None
    repeated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"action_id": str(self.action_id), "action": self.action.value,
                "saga_id": str(self.saga_id), "saga_type": self.saga_type,
                "business_key": self.business_key, "actor": self.actor, "reason": self.reason,
                "status": self.status, "events": list(self.events), "commands": self.commands,
                "outcome": self.outcome.model_dump(mode="json") if self.outcome else None,
                "repeated": self.repeated}


def _inbox_topic(action: OperatorAction) -> str:
    return f"operator.{action.value}"


def _causation(action_id: UUID) -> str:
    return f"operator:{action_id}"


async def act_on_saga(engine: AsyncEngine, settings: Settings, sagas: SagaTypes,
                      saga_id: UUID, request: ActOnSaga, now: datetime | None = None
                      ) -> ActionResult:
    """Decide and record `request` on the saga `saga_id` in a transaction of its own, tried
    again after a lost race. Raises NotFound, OperatorActionRefused (nothing written), or
    Conflict when the action id was used for another action or saga."""
    for attempt in range(1, _TRIES + 1):
        try:
            async with engine.begin() as conn:
                return await act_in(conn, settings, sagas, saga_id, request,
                                    now or datetime.now(UTC))
        except (ConcurrencyConflict, StoreUnavailable):
            if attempt == _TRIES:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


async def act_in(conn: AsyncConnection, settings: Settings, sagas: SagaTypes, saga_id: UUID,
                 request: ActOnSaga, now: datetime) -> ActionResult:
    """`act_on_saga` in the caller's transaction."""
    row = (await conn.execute(text(
        "SELECT state, traceparent, tracestate FROM sagas WHERE saga_id = :id FOR UPDATE"),
        {"id": saga_id})).one_or_none()
    if row is None:
        raise NotFound(f"no saga {saga_id}")
    seen = (await conn.execute(text(
        "SELECT topic, saga_id FROM inbox WHERE consumer = :c AND message_id = :m"),
        {"c": OPERATOR_CONSUMER, "m": str(request.action_id)})).one_or_none()
    if seen is not None:
        if seen.saga_id != saga_id or seen.topic != _inbox_topic(request.action):
            raise Conflict(f"action id {request.action_id} was used for"
                           f" {seen.topic.removeprefix('operator.')} on saga {seen.saga_id}:"
                           " a new action needs a new id")
        return await _recorded(conn, saga_id, request)
    state = SagaState.from_json(store.json_value(row.state))
    definition = (sagas.definition_of(state) if state.definition_version is not None
                  else None)
    decision = decide_action(definition, state, request, now)
    actor = request.actor.strip()
    # The operator's events, the commands they send and the outcome stay in the saga's trace
    # (ADR 0015).
    trace = tracing.stored_context(state.saga_id, row.traceparent, row.tracestate)
    events = []
    for event in decision.events:
        state = evolve(state, event)
        events.append(store.NewEvent(state.saga_id, state.version, event, actor,
                                     _causation(request.action_id), trace.trace_id))
    assert definition is not None or not decision.commands
    outbox = [command_row(settings, definition, command, trace)
              for command in decision.commands if definition is not None]
    outbox += [outcome_row(settings, sagas, outcome, trace) for outcome in decision.outcomes]
    inbox = store.InboxRow(str(request.action_id), _inbox_topic(request.action), None, None,
                           "applied", saga_id)
    await store.write_batch(conn, OPERATOR_CONSUMER, [inbox], events, [state], outbox, [], now)
    return ActionResult(request.action_id, request.action, state.saga_id, state.saga_type,
                        state.business_key, actor, request.reason.strip(), state.status.value,
                        tuple(event.type for event in decision.events), len(decision.commands),
                        decision.outcomes[-1] if decision.outcomes else None)


async def _recorded(conn: AsyncConnection, saga_id: UUID, request: ActOnSaga) -> ActionResult:
    """The answer to a repeat: what the first one recorded, read back from its events."""
    rows = (await conn.execute(text(
        "SELECT seq, payload, causation_id FROM saga_events WHERE saga_id = :s ORDER BY seq"),
        {"s": saga_id})).all()
    cause = _causation(request.action_id)
    last = max(row.seq for row in rows if row.causation_id == cause)
    events = [store.parse_event(row.payload) for row in rows if row.seq <= last]
    state = fold(events)
    assert state is not None
    mine = [event for event, row in zip(events, rows, strict=False)
            if row.causation_id == cause]
    first = mine[0]
    actor = str(getattr(first, "actor", None) or getattr(first, "resolved_by", ""))
    reason = str(getattr(first, "reason", None) or getattr(first, "note", ""))
    sent = sum(event.type in ("StepStarted", "StepResent") for event in mine)
    ended = state.terminal and any(event.type in ("SagaCompensated", "SagaResolved")
                                   for event in mine)
    return ActionResult(request.action_id, request.action, saga_id, state.saga_type,
                        state.business_key, actor, reason, state.status.value,
                        tuple(event.type for event in mine), sent,
                        outcome_of(state) if ended else None, repeated=True)
