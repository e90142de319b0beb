"""`saga resolve`: an operator closes a FAILED saga, once.

A FAILED saga stopped where the engine could not go on (a compensation refused for good, a step
after the pivot that failed); the operator sets right what it left, outside the engine (the
runbook's FAILED section), then records that here. The record is an event (`SagaResolved`, with
the operator as its actor) and the saga's `resolved` outcome event for upstream services, both
written in one transaction like every other decision: the outbox row is published by the relay
(or the recovery worker's sweep) after the commit.

The pure core decides (`decide_resolve`: only a FAILED saga, and only once); the saga's row is
locked for the transaction, and the event's `(saga_id, seq)` key fences any other writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator import tracing
from orchestrator.core.saga import SagaState, decide_resolve, evolve
from orchestrator.core.saga_type import SagaTypes
from orchestrator.errors import NotFound
from orchestrator.postgres import store
from orchestrator.settings import Settings
from orchestrator.workers.saga_worker import outcome_row
from schemas import SagaOutcome

OPERATOR_CONSUMER = "operator"


@dataclass(frozen=True)
class Resolved:
    saga_id: UUID
    saga_type: str
    business_key: str
    resolved_by: str
    outcome: SagaOutcome

    def to_json(self) -> dict[str, Any]:
        return {"saga_id": str(self.saga_id), "saga_type": self.saga_type,
                "business_key": self.business_key, "resolved_by": self.resolved_by,
                "status": "RESOLVED", "outcome": self.outcome.model_dump(mode="json")}


async def resolve_saga(conn: AsyncConnection, settings: Settings, sagas: SagaTypes,
                       saga_id: UUID, resolved_by: str, note: str,
                       now: datetime | None = None) -> Resolved:
    """Close the FAILED saga `saga_id` in the caller's transaction. Raises NotFound, or
    OperatorActionRefused when the saga is not FAILED (a second resolve included)."""
    now = now or datetime.now(UTC)
    row = (await conn.execute(text(
        "SELECT state, traceparent, tracestate FROM sagas WHERE saga_id = :id FOR UPDATE"),
        {"id": saga_id})).one_or_none()
    if row is None:
        raise NotFound(f"no saga {saga_id}")
    state = SagaState.from_json(store.json_value(row.state))
    # The operator's event and the 'resolved' outcome stay in the saga's trace (ADR 0015).
    trace = tracing.stored_context(state.saga_id, row.traceparent, row.tracestate)
    decision = decide_resolve(state, resolved_by.strip(), note)
    events = []
    for event in decision.events:
        state = evolve(state, event)
        events.append(store.NewEvent(state.saga_id, state.version, event, resolved_by.strip(),
                                     f"operator:resolve:{now.isoformat()}", trace.trace_id))
    outbox = [outcome_row(settings, sagas, outcome, trace) for outcome in decision.outcomes]
    await store.write_batch(conn, OPERATOR_CONSUMER, [], events, [state], outbox, [], now)
    return Resolved(state.saga_id, state.saga_type, state.business_key, resolved_by.strip(),
                    decision.outcomes[0])
