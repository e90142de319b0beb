"""What the API answers, as pydantic models: they validate every response and are what the
committed OpenAPI document (docs/api/openapi.json) describes. Times are ISO 8601 strings in
UTC; money stays as the decimal strings the events hold, never a float."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Statuses are spelled in capitals; a query may spell them in any case.
SagaStatus = Annotated[
    Literal["RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "REJECTED", "FAILED",
            "RESOLVED"],
    BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value)]


class Run(BaseModel):
    """One step a saga waits on (several at once in a parallel group)."""

    step: str
    direction: str
    attempt: int
    deadline_at: str | None = None
    next_attempt_at: str | None = None


class SagaSummary(BaseModel):
    saga_id: str
    saga_type: str
    business_key: str
    definition_version: int | None
    status: str
    current_step: str | None
    runs: list[Run]
    attempt: int | None
    version: int
    input: dict[str, Any] | None = Field(description="the start message")
    failure: str | None
    deadline_at: str | None
    updated_at: str


class SagaList(BaseModel):
    sagas: list[SagaSummary]
    accounts_masked: bool
    offset: int
    next_offset: int | None = Field(description="the offset of the next page; null on the last")


class TimelineEvent(BaseModel):
    seq: int
    recorded_at: str
    type: str
    step: str | None
    attempt: int | None
    duration_ms: float | None = Field(description="a step outcome's: since its command; any"
                                                  " other event's: since the event before")
    actor: str | None
    detail: str = Field(description="what the event says, in one line")
    payload: dict[str, Any]


class Saga(BaseModel):
    """One saga: its state from the projection and its timeline from the event store."""

    saga_id: str
    saga_type: str
    business_key: str
    definition_version: int | None
    status: str
    current_step: str | None
    runs: list[Run]
    version: int
    created_at: str
    updated_at: str
    events: list[TimelineEvent]
    accounts_masked: bool


class StuckSaga(BaseModel):
    saga_id: str
    saga_type: str
    business_key: str
    definition_version: int | None
    status: str
    current_step: str | None
    runs: list[Run]
    direction: str | None
    attempt: int | None
    due_at: str
    overdue_s: float
    updated_at: str
    failure: str | None


class SetAsideOutboxRow(BaseModel):
    outbox_id: int
    topic: str
    saga_id: str | None
    attempts: int
    last_error: str | None
    size_bytes: int
    created_at: str
    set_aside_at: str


class Stuck(BaseModel):
    sagas: list[StuckSaga]
    outbox_set_aside: list[SetAsideOutboxRow]
    accounts_masked: bool


class DeadLetterSummary(BaseModel):
    dead_letter_id: str
    stage: str
    reason_code: str
    error_class: str
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    attempts: int
    first_failed_at: str
    last_failed_at: str
    saga_id: str | None
    saga_type: str | None
    business_key: str | None
    redriven_at: str | None
    redriven_by: str | None = Field(default=None, description=(
        "who redrove it (none if not redriven, or redriven before this was recorded)"))


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterSummary]


class Header(BaseModel):
    name: str
    value: str
    encoding: Literal["utf-8", "base64"]
    size_bytes: int


class PayloadPreview(BaseModel):
    value: str = Field(description="the payload's first bytes, as text or base64")
    encoding: Literal["utf-8", "base64"]
    size_bytes: int = Field(description="the whole payload's size")
    truncated: bool
    download_url: str = Field(description="the whole payload, as it was received")


class DeadLetterDetail(DeadLetterSummary):
    reason: str
    original_key: str | None
    headers: list[Header]
    payload: PayloadPreview
    accounts_masked: bool


class RedriveResult(BaseModel):
    actor: str = Field(description="who asked: the token's subject")
    redriven: list[str]
    already_redriven: list[str]
    not_found: list[str]
    outbox_ids: list[int]


class ActionName(StrEnum):
    """An operator action on one saga (the `saga` command of the same name)."""

    RETRY_NOW = "retry-now"
    CANCEL = "cancel"
    RETRY_COMPENSATION = "retry-compensation"
    RESOLVE = "resolve"


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S",
                        description="why, in the operator's words (an incident ticket, say);"
                        " recorded with the action")
    action_id: UUID | None = Field(default=None, description=(
        "one per request (a new UUID per click): the same id sent again acts once and answers"
        " what the first did; the server makes one if none is given"))


class ActionResult(BaseModel):
    action_id: UUID
    action: str = Field(description="retry_now, cancel, retry_compensation or resolve")
    saga_id: UUID
    saga_type: str
    business_key: str
    actor: str = Field(description="who acted: the token's subject")
    reason: str
    status: str = Field(description="the saga's status right after the action")
    events: list[str] = Field(description="the types of the events the action recorded")
    commands: int = Field(description="step commands it queued")
    outcome: dict[str, Any] | None = Field(description="the saga's outcome event, if it ended")
    repeated: bool = Field(description="an answer to an action id used before: nothing new"
                           " was done")


class BulkRedrive(BaseModel):
    """Either `ids` or `all: true`."""

    ids: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    all: bool = False


class Window(BaseModel):
    finished: int
    per_minute: float
    p50_ms: float | None
    p99_ms: float | None


class LastHour(Window):
    window_s: int
    by_type: dict[str, Window]


class Overview(BaseModel):
    total: int
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    last_hour: LastHour


class Whoami(BaseModel):
    subject: str
    role: Literal["viewer", "operator", "admin"]
    accounts_masked: bool
