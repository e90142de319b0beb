"""Saga events, version 1: the append-only facts a saga's state is folded from.

Every event is frozen, forbids extra fields and carries its schema version. Event type names are
persisted in `saga_events.type` and never change.

Events written before the engine ran several saga types are read as they are (the log is
append-only: an old row is never rewritten). They named a saga by its transfer id alone, and
"transfer" was the only saga type there was; reading one, the start events below upcast it: the
transfer id becomes the business key (`str(transfer_id)`, the key the transfer type derives
today, so the saga id is the same), the definition version is 1 and a rejection's saga type is
"transfer". What is written now carries no transfer id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field, JsonValue, TypeAdapter, model_validator

from schemas.messages import Direction, RejectionCode, WireModel

# The only saga type of the events written before saga types were generic.
_LEGACY_SAGA_TYPE = "transfer"


def _upcast_transfer_id(data: Any, defaults: dict[str, Any]) -> Any:
    """An event as written before generic saga types: its `transfer_id` as the business key,
    and `defaults` for the fields it could not have."""
    if not isinstance(data, dict) or "transfer_id" not in data:
        return data
    data = dict(data)
    transfer_id = data.pop("transfer_id")
    if data.get("business_key") is not None:
        raise ValueError("an event has a business_key or (written before saga types were "
                         "generic) a transfer_id, not both")
    data["business_key"] = str(UUID(str(transfer_id)))
    for name, value in defaults.items():
        if data.get(name) is None:
            data[name] = value
    return data


class _Event(WireModel):
    schema_version: Literal[1] = 1


class SagaStarted(_Event):
    """A saga of `saga_type` started on version `definition_version` of its definition, which
    it finishes on. `input` is its start message; `business_key` its idempotency key.

    Rows written before saga types were generic have `transfer_id` (a UUID) instead of
    `business_key` and no `definition_version`: read them as business key `str(transfer_id)`,
    version 1."""

    type: Literal["SagaStarted"] = "SagaStarted"
    saga_type: str
    business_key: str = Field(min_length=1)
    definition_version: int = Field(ge=1)
    input: dict[str, JsonValue]
    request_hash: str
    requested_at: datetime | None = Field(
        default=None, description="When the upstream published the request (Kafka timestamp)"
    )

    @model_validator(mode="before")
    @classmethod
    def _written_before_saga_types(cls, data: Any) -> Any:
        return _upcast_transfer_id(data, {"definition_version": 1})


class SagaRejected(_Event):
    """Refused at intake; nothing ran and nothing was changed.

    Rows written before saga types were generic have `transfer_id` (a UUID) instead of
    `saga_type` and `business_key`: read them as saga type "transfer", business key
    `str(transfer_id)`."""

    type: Literal["SagaRejected"] = "SagaRejected"
    saga_type: str
    business_key: str = Field(min_length=1)
    reason_code: RejectionCode
    reason: str
    request_hash: str | None = Field(
        default=None, description="SHA-256 of the request when it was a valid start message "
        "refused by an intake check; absent in rows written before outcome events")

    @model_validator(mode="before")
    @classmethod
    def _written_before_saga_types(cls, data: Any) -> Any:
        return _upcast_transfer_id(data, {"saga_type": _LEGACY_SAGA_TYPE})


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
    applied_by: str | None = Field(
        default=None, description="The participant instance (its worker name) that decided"
        " this outcome, as its reply said; none in events recorded before replies said it")


class StepFailed(_Event):
    type: Literal["StepFailed"] = "StepFailed"
    step: str
    attempt: int
    command_id: UUID
    code: str
    reason: str
    retryable: bool
    applied_by: str | None = Field(
        default=None, description="The participant instance (its worker name) that decided"
        " this outcome, as its reply said; none in events recorded before replies said it")


class StepCompensated(_Event):
    type: Literal["StepCompensated"] = "StepCompensated"
    step: str
    attempt: int
    command_id: UUID
    applied_by: str | None = Field(
        default=None, description="The participant instance (its worker name) that decided"
        " this outcome, as its reply said; none in events recorded before replies said it")


class CompensationFailed(_Event):
    type: Literal["CompensationFailed"] = "CompensationFailed"
    step: str
    attempt: int
    command_id: UUID
    code: str
    reason: str
    retryable: bool
    applied_by: str | None = Field(
        default=None, description="The participant instance (its worker name) that decided"
        " this outcome, as its reply said; none in events recorded before replies said it")


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


class SagaResolved(_Event):
    """An operator closed a FAILED saga after setting right what it left (in the ledger, by
    hand). Appended by `saga resolve`; `resolved_by` is the person, `note` their record of what
    was done (an incident ticket, say). The saga changes no more."""

    type: Literal["SagaResolved"] = "SagaResolved"
    resolved_by: str = Field(min_length=1)
    note: str
    action_id: UUID | None = Field(
        default=None, description="The operator action that resolved it (its id makes a repeat"
        " of the action act once); none in events recorded before operator actions had ids")


class OperatorActed(_Event):
    """An operator acted on a running or FAILED saga (the console or the `saga` command).

    `action` says what they asked for, `actor` who (the console token's subject, or the
    operating system user of the CLI), `reason` why, in their words. The consequences follow
    as the usual events, decided with it by the core and recorded in the same transaction:
    - `retry_now`: the retries waiting out their backoff start (`StepStarted`) and the
      commands out are sent again under their ids (`StepResent`), without waiting;
    - `cancel`: the forward steps running are given up as if they had failed for good; one
      whose command is out counts as possibly applied (as after a timeout given up) and is
      compensated too; then compensation starts (`StepStarted` compensate, or
      `SagaCompensated` when nothing was applied);
    - `retry_compensation`: a saga that FAILED while compensating is compensating again,
      from the compensation that failed (`StepStarted`).
    `action_id` (the caller's, one per request) makes the same action sent twice act once."""

    type: Literal["OperatorActed"] = "OperatorActed"
    action: Literal["retry_now", "cancel", "retry_compensation"]
    action_id: UUID
    actor: str = Field(min_length=1)
    reason: str = Field(min_length=1)


class StepResent(_Event):
    """An operator's retry now sent the command out again under the same id (so a participant
    that applied it replies with its stored result), with a new deadline. Unlike a re-send
    after a deadline (`StepTimedOut`), it spends none of the step's attempts."""

    type: Literal["StepResent"] = "StepResent"
    step: str
    direction: Direction
    attempt: int
    command_id: UUID
    deadline_at: datetime


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
    | SagaFailed
    | SagaResolved
    | OperatorActed
    | StepResent,
    Field(discriminator="type"),
]
SAGA_EVENT_ADAPTER: TypeAdapter[SagaEvent] = TypeAdapter(SagaEvent)
