"""The card top-up's start message, its business key and its topics.

An upstream service (the mobile app's backend) asks to move money from a customer's wallet onto
their prepaid card. The request is the saga's input: every step command carries it as its
`payload`, and the participants read it back with `CardTopUpRequested.of(command)`.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from schemas import MoneyError, StepCommand, format_amount, parse_amount

# Persisted names: never rename. Upstream publishes requests to START_TOPIC, keyed by the
# business key; the outcome of each top-up is to go to EVENTS_TOPIC (outcome events are not
# published yet).
START_TOPIC = "cards.topups.v1"
EVENTS_TOPIC = "cards.topup-events.v1"

Identifier = Annotated[str, Field(min_length=1, max_length=64,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
_AMOUNT = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)


class CardTopUpRequested(BaseModel):
    """Move `amount` from wallet `wallet_id` onto card `card_id`.

    `topup_id` is the business key, the idempotency key forever: the same id with the same
    payload is one top-up; the same id with a different payload is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    topup_id: UUID
    wallet_id: Identifier
    card_id: Identifier
    amount: Decimal
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
    requested_by: Annotated[str, Field(min_length=1, max_length=128)]

    # Intake rules. The error types are the ones the engine's intake maps to reason codes
    # (`invalid_amount` -> INVALID_AMOUNT, `unknown_currency` -> UNKNOWN_CURRENCY); any other
    # validation error is a SCHEMA_VIOLATION.
    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_a_decimal_string(cls, value: Any) -> Any:
        if isinstance(value, Decimal):
            return value
        if not isinstance(value, str) or not _AMOUNT.fullmatch(value):
            raise PydanticCustomError("invalid_amount",
                                      'amount must be a decimal string such as "10.50"')
        return value

    @model_validator(mode="after")
    def _money_rules(self) -> CardTopUpRequested:
        try:
            amount = parse_amount(str(self.amount), self.currency)
        except MoneyError as error:
            raise PydanticCustomError(error.code, str(error)) from None
        object.__setattr__(self, "amount", amount)
        return self

    @field_serializer("amount")
    def _amount_as_string(self, amount: Decimal) -> str:
        return format_amount(amount, self.currency)

    @classmethod
    def of(cls, command: StepCommand) -> CardTopUpRequested:
        """The request a step command carries. A payload that is not one raises: the batch is
        retried and the command set aside (PROCESSING_FAILED), never answered with a guess."""
        return cls.model_validate(command.payload)


def business_key(request: CardTopUpRequested) -> str:
    """What identifies a top-up to the outside: the saga's id derives from it, and its outcome
    event is keyed by it."""
    return str(request.topup_id)


def key_of_refused(document: object) -> str | None:
    """The top-up id of a request refused at intake, if it names a usable one."""
    if not isinstance(document, dict):
        return None
    try:
        return str(UUID(str(document.get("topup_id"))))
    except ValueError:
        return None
