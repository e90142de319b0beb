"""Saga outcome events, version 1: what upstream services learn about the sagas they started.

Each saga type publishes them on its public events topic (`transfers.events.v1` for transfers;
`SagaType.events_topic`), keyed by the business key (for a transfer, its transfer id), so the
outcomes of one key arrive in order on one partition. Discriminated by `outcome`:

    completed    every step succeeded
    compensated  a step failed for good and every applied effect was undone: `failed_step`
                 and `reason` say what turned it back
    rejected     refused at intake (`reason_code`): an invalid request whose business key could
                 still be read, or a request reusing a key with another payload
                 (`CONFLICTING_DUPLICATE`; the saga already on that key is unchanged and
                 publishes its own outcome)
    failed       the saga cannot finish by itself and an operator acts (`step`, `reason`)
    resolved     an operator closed a failed saga (`resolved_by`, `note`)

Exactly once per saga and outcome, by `event_id`: the event is written to the orchestrator's
outbox in the same transaction as the saga's terminal event, and any copy published again (a
relay retrying after a crash, the answer to a duplicate request) carries the same `event_id`
and the same content. Readers deduplicate on `event_id`. A saga that ended has exactly one
event whose `event_id` is `uuid5(saga_id, "outcome")` (its `completed`, `compensated`,
`rejected` or `failed`); a failed one closed by an operator later has a second, `resolved`.

`request_hash` is the SHA-256 of the request the event answers, as the orchestrator read it
(`orchestrator.core.request_hash`); None when the request could not be read as its type's start
message. A client that published a request tells its own answer apart by it: a conflicting
request's `rejected` and the original saga's outcome share a business key.

Event type names and fields are persisted on the topic: never renamed; a change is a version 2.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field, TypeAdapter

from schemas.messages import RejectionCode, WireModel


class _Outcome(WireModel):
    schema_version: Literal[1] = 1
    event_id: UUID = Field(description="The same on every copy of this event: deduplicate on it")
    saga_id: UUID
    saga_type: str
    business_key: str = Field(min_length=1,
                              description="The idempotency key; also the Kafka record's key")
    request_hash: str | None = Field(
        default=None,
        description="SHA-256 (hex) of the request this answers; None if it was unreadable")


class SagaCompletedOutcome(_Outcome):
    """Every step succeeded."""

    outcome: Literal["completed"] = "completed"


class SagaCompensatedOutcome(_Outcome):
    """A step failed for good; every applied effect was undone."""

    outcome: Literal["compensated"] = "compensated"
    failed_step: str
    reason: str


class SagaRejectedOutcome(_Outcome):
    """Refused at intake: nothing ran and nothing was changed."""

    outcome: Literal["rejected"] = "rejected"
    reason_code: RejectionCode
    reason: str


class SagaFailedOutcome(_Outcome):
    """The saga cannot finish by itself (a compensation failed for good, or a step after the
    pivot did): money may be half-moved until an operator acts; a `resolved` event follows."""

    outcome: Literal["failed"] = "failed"
    step: str
    reason: str


class SagaResolvedOutcome(_Outcome):
    """An operator closed a failed saga after setting right what it left."""

    outcome: Literal["resolved"] = "resolved"
    resolved_by: str
    note: str


SagaOutcome = Annotated[
    SagaCompletedOutcome
    | SagaCompensatedOutcome
    | SagaRejectedOutcome
    | SagaFailedOutcome
    | SagaResolvedOutcome,
    Field(discriminator="outcome"),
]
SAGA_OUTCOME_ADAPTER: TypeAdapter[SagaOutcome] = TypeAdapter(SagaOutcome)
# The Kafka header `type` of every outcome record.
OUTCOME_RECORD_TYPE = "SagaOutcome"


def default_events_topic(saga_type: str, start_topic: str) -> str:
    """A saga type's events topic unless it names one: its start topic with `commands` made
    `events` (`transfers.commands.v1` -> `transfers.events.v1`), else `<type>.events.v1`."""
    parts = start_topic.split(".")
    if "commands" in parts:
        return ".".join("events" if part == "commands" else part for part in parts)
    return f"{saga_type}.events.v1"
