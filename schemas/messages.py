"""Messages on the wire, version 1. Persisted names (topics, fields, codes) never change.

Commands are imperative (`StepCommand`), facts past tense (`TransferRequested` is the upstream's
request, phrased as the fact "a transfer was requested").
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas.money import MoneyError, format_amount, parse_amount

# Topic names are part of the public contract.
TOPIC_TRANSFER_COMMANDS = "transfers.commands.v1"
TOPIC_REPLIES = "saga.replies.v1"
TOPIC_DEAD_LETTERS = "transfers.dlq.v1"
# The transfers' outcome events (`schemas.outcomes`).
TOPIC_TRANSFER_EVENTS = "transfers.events.v1"


def step_topic(participant: str) -> str:
    """The topic a participant reads its step commands from."""
    return f"saga.steps.{participant}.v1"


AccountId = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"),
]
DecimalString = Annotated[
    Decimal,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[0-9]+(\.[0-9]+)?$",
            "description": "A positive decimal string with at most the currency's ISO 4217 "
            "exponent of decimals. JSON numbers are refused.",
        }
    ),
]
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_AMOUNT_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?", re.ASCII)


class WireModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TransferRequested(WireModel):
    """Published by upstream services to `transfers.commands.v1`, keyed by transfer id.

    `transfer_id` is the idempotency key forever: the same id with the same payload is one
    transfer; the same id with a different payload is refused.
    """

    schema_version: Literal[1] = 1
    transfer_id: UUID
    source_account: AccountId
    destination_account: AccountId
    amount: DecimalString
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
    reference: Annotated[str, Field(max_length=140)] = ""
    requested_by: Annotated[str, Field(min_length=1, max_length=128)]

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_a_string(cls, value: Any) -> Any:
        # A JSON number would already have gone through a binary float in most producers.
        if isinstance(value, Decimal):
            return value
        if not isinstance(value, str):
            raise PydanticCustomError(
                "invalid_amount", 'amount must be a decimal string such as "10.50", not a number'
            )
        # Decimal() also reads "1_000", "+10", " 10", "1E+2" and non-ASCII digits: refuse every
        # spelling outside the pattern the published JSON Schema promises.
        if not _AMOUNT_RE.fullmatch(value):
            # The template takes `{name}` placeholders only (no `!r` conversion, no format
            # spec: those stay in the message as written), so the value goes in quoted already.
            raise PydanticCustomError(
                "invalid_amount",
                "amount {value} is not written as digits with an optional decimal point",
                {"value": repr(value)},
            )
        return value

    @model_validator(mode="after")
    def _money_rules(self) -> TransferRequested:
        if _CURRENCY_RE.match(self.currency):
            try:
                amount = parse_amount(str(self.amount), self.currency)
            except MoneyError as error:
                raise PydanticCustomError(error.code, str(error)) from None
            object.__setattr__(self, "amount", amount)
        if self.source_account == self.destination_account:
            raise PydanticCustomError(
                "same_account", "source_account and destination_account must differ"
            )
        return self

    @field_serializer("amount")
    def _amount_as_string(self, amount: Decimal) -> str:
        return format_amount(amount, self.currency)


class Direction(StrEnum):
    FORWARD = "forward"
    COMPENSATE = "compensate"


class StepCommand(WireModel):
    """Orchestrator → participant, on `saga.steps.<participant>.v1`, keyed by saga id.

    `(saga_id, step, direction)` identifies the effect; `command_id` identifies one attempt of it.
    A participant that sees the same effect again returns its stored reply.
    """

    schema_version: Literal[1] = 1
    command_id: UUID
    saga_id: UUID
    saga_type: str
    step: str
    action: str
    direction: Direction
    attempt: Annotated[int, Field(ge=1)]
    deadline_at: datetime
    payload: dict[str, JsonValue]


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class StepReply(WireModel):
    """Participant → orchestrator, on `saga.replies.v1`, keyed by saga id."""

    schema_version: Literal[1] = 1
    reply_id: UUID
    command_id: UUID
    saga_id: UUID
    step: str
    direction: Direction
    attempt: Annotated[int, Field(ge=1)]
    participant: str
    outcome: Outcome
    retryable: bool = False
    code: str | None = None
    reason: str | None = None
    result: dict[str, JsonValue] = Field(default_factory=dict)
    replayed: bool = Field(
        default=False, description="True when this is the stored reply of an effect applied earlier"
    )
    # No length limit: a reply must never be refused for its sender's name (a long host name).
    applied_by: str | None = Field(
        default=None,
        description="The participant instance (its worker name) that decided this outcome; in a"
        " replayed reply, the one that decided it first. For operators reading a timeline.",
    )


class RejectionCode(StrEnum):
    """Why a message went to the dead-letter topic. Persisted: never rename a member."""

    MALFORMED_JSON = "MALFORMED_JSON"
    SCHEMA_VIOLATION = "SCHEMA_VIOLATION"
    UNKNOWN_CURRENCY = "UNKNOWN_CURRENCY"
    INVALID_AMOUNT = "INVALID_AMOUNT"
    SAME_ACCOUNT = "SAME_ACCOUNT"
    CONFLICTING_DUPLICATE = "CONFLICTING_DUPLICATE"
    UNKNOWN_SAGA = "UNKNOWN_SAGA"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    # A step after the pivot (or the pivot itself, refused after its outcome was in doubt)
    # failed for good: nothing can be undone, an operator finishes the transfer.
    FAILED_AFTER_PIVOT = "FAILED_AFTER_PIVOT"
    # A step's attempts ran out with no reply; the recovery worker failed the saga.
    STEP_TIMED_OUT = "STEP_TIMED_OUT"
    # A step command for an action (in its direction) the participant has no handler for: the
    # definition names an action that this version of the participant does not implement.
    UNKNOWN_ACTION = "UNKNOWN_ACTION"
    # A record that kept failing in processing (not its content's fault as far as we know),
    # set aside so that it does not block its partition; redrive it once the cause is fixed.
    PROCESSING_FAILED = "PROCESSING_FAILED"


class DeadLetter(WireModel):
    """What `transfers.dlq.v1` says about one message it carries.

    The Kafka record's value is the original payload, byte for byte, and its headers are the
    original headers plus these fields as `dlq-*` headers (see `DLQ_HEADER_PREFIX`), so a redrive
    republishes exactly what was received.

    A copy that would not fit in one Kafka record is shortened: its value is the first bytes of
    the original (or nothing), `original_size_bytes` and `original_sha256` describe the whole
    original, and the original itself is kept in the `dead_letters` table. Both fields are set
    only on a shortened copy.
    """

    schema_version: Literal[1] = 1
    dead_letter_id: UUID
    reason_code: RejectionCode
    reason: str
    error_class: str
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    original_key: str | None
    attempts: int = 1
    first_failed_at: datetime
    last_failed_at: datetime
    saga_id: UUID | None = None
    # The saga type (of the topic the record arrived on, or of the saga it concerns) and the
    # saga's business key, where known; for a transfer the key is its transfer id.
    saga_type: str | None = None
    business_key: str | None = None
    # Only on a shortened copy: the length of the original value, and its SHA-256 (hex).
    original_size_bytes: int | None = None
    original_sha256: str | None = None

    def to_headers(self) -> list[tuple[str, bytes]]:
        fields = self.model_dump(mode="json")
        return [
            (DLQ_HEADER_PREFIX + name.replace("_", "-"), str(value).encode())
            for name, value in fields.items()
            if value is not None
        ]


DLQ_HEADER_PREFIX = "dlq-"
