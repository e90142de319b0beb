"""`saga resolve`: an operator closes a FAILED saga, once.

A FAILED saga stopped where the engine could not go on (a compensation refused for good, a step
after the pivot that failed); the operator sets right what it left, outside the engine (the
runbook's FAILED section), then records that here. The record is an event (`SagaResolved`, with
the operator as its actor) and the saga's `resolved` outcome event for upstream services, both
written in one transaction like every other decision: the outbox row is published by the relay
(or the recovery worker's sweep) after the commit.

The pure core decides (`decide_resolve`: only a FAILED saga, only once, and with a note); it is
one of the operator actions of `orchestrator.ops.actions`, which says why it cannot race the
workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.core.saga import ActOnSaga, OperatorAction
from orchestrator.core.saga_type import SagaTypes
from orchestrator.ops.actions import OPERATOR_CONSUMER, act_in
from orchestrator.settings import Settings
from schemas import SagaOutcome

__all__ = ["OPERATOR_CONSUMER", "Resolved", "resolve_saga"]



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
                       now: datetime | None = None, action_id: UUID | None = None) -> Resolved:
    """Close the FAILED saga `saga_id` in the caller's transaction: the operator action
    `resolve` (`orchestrator.ops.actions`), with a new action id unless given. Raises NotFound,
    or OperatorActionRefused when the saga is not FAILED (a second resolve included) or the
    note is empty."""
    done = await act_in(conn, settings, sagas, saga_id,
                        ActOnSaga(OperatorAction.RESOLVE, action_id or uuid4(), resolved_by,
                                  note), now or datetime.now(UTC))
    assert done.outcome is not None
    return Resolved(done.saga_id, done.saga_type, done.business_key, done.actor, done.outcome)
