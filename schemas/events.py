"""Saga events, version 1: the append-only facts a saga's state is folded from.

Every event is frozen, forbids extra fields and carries its schema version. Event type names are
persisted in `saga_events.type` and never change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field, JsonValue, TypeAdapter

from schemas.messages import Direction, RejectionCode, WireModel


class _Event(WireModel):
    schema_version: Literal[1] = 1


class SagaStarted(_Event):
    type: Literal["SagaStarted"] = "SagaStarted"
    saga_type: str
    transfer_id: UUID
    input: dict[str, JsonValue]
    request_hash: str
    requested_at: datetime | None = Field(
        default=None, description="When the upstream published the request (Kafka timestamp)"
    )


class SagaRejected(_Event):
    """Refused at intake; nothing ran and no money moved."""

    type: Literal["SagaRejected"] = "SagaRejected"
    transfer_id: UUID
    reason_code: RejectionCode
    reason: str


class StepStarted(_Event):
    type: Literal["StepStarted"] = "StepStarted"
    step: str
    action: str
    direction: Direction
    attempt: int
    command_id: UUID
    deadline_at: datetime


class StepSucceeded(_Event):
    type: Literal["StepSucceeded"] = "StepSucceeded"
    step: str
    attempt: int
    command_id: UUID
    result: dict[str, JsonValue] = Field(default_factory=dict)


class StepFailed(_Event):
    type: Literal["StepFailed"] = "StepFailed"
    step: str
    attempt: int
    command_id: UUID
    code: str
    reason: str
    retryable: bool


class StepCompensated(_Event):
    type: Literal["StepCompensated"] = "StepCompensated"
    step: str
    attempt: int
    command_id: UUID


class CompensationFailed(_Event):
    type: Literal["CompensationFailed"] = "CompensationFailed"
    step: str
    attempt: int
    command_id: UUID
    code: str
    reason: str
    retryable: bool


class StepRetryScheduled(_Event):
    """A retryable failure: `attempt` of the same step starts at `not_before`.

    The wait lives in PostgreSQL (the saga's due time), not in a consumer, so a retry never
    blocks a partition and survives any crash; the recovery worker starts it when it is due."""

    type: Literal["StepRetryScheduled"] = "StepRetryScheduled"
    step: str
    direction: Direction
    attempt: int
    not_before: datetime


class StepTimedOut(_Event):
    """No reply to `command_id` by its deadline.

    With `gave_up` false the same command (same id, so a participant that already applied it
    replies with its stored result) was sent again with a new `deadline_at`. With `gave_up`
    true the step's attempts ran out: its outcome is unknown, so a forward step counts as
    possibly applied and is compensated (a late command is refused by the participant's
    tombstone)."""

    type: Literal["StepTimedOut"] = "StepTimedOut"
    step: str
    direction: Direction
    attempt: int
    command_id: UUID
    resend: int
    gave_up: bool = False
    deadline_at: datetime | None = None


class SagaCompleted(_Event):
    type: Literal["SagaCompleted"] = "SagaCompleted"


class SagaCompensated(_Event):
    """Every effect was undone; `reason` is the failure that made the saga turn back."""

    type: Literal["SagaCompensated"] = "SagaCompensated"
    failed_step: str
    reason: str


class SagaFailed(_Event):
    """The saga cannot finish by itself: a compensation failed for good (money may be
    half-moved), or a step after the pivot failed. An operator must act."""

    type: Literal["SagaFailed"] = "SagaFailed"
    step: str
    reason: str


SagaEvent = Annotated[
    SagaStarted
    | SagaRejected
    | StepStarted
    | StepSucceeded
    | StepFailed
    | StepCompensated
    | CompensationFailed
    | StepRetryScheduled
    | StepTimedOut
    | SagaCompleted
    | SagaCompensated
    | SagaFailed,
    Field(discriminator="type"),
]
SAGA_EVENT_ADAPTER: TypeAdapter[SagaEvent] = TypeAdapter(SagaEvent)
