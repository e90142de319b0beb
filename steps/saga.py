"""The transfer saga type: its definition, start message, business key and intake rules.

Step names are persisted: never rename one. A change to the steps is a new version of the
definition, listed beside the old one until no saga runs on the old one any more (a worker
refuses to start without a version that sagas in flight run on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from orchestrator.core.definition import Parallel, SagaDefinition, Step
from orchestrator.core.saga_type import IntakeRules, SagaType
from schemas import TOPIC_TRANSFER_COMMANDS, TOPIC_TRANSFER_EVENTS, RejectionCode, TransferRequested
from steps.registry import ledger, notify, risk

TRANSFER = SagaDefinition(
    name="transfer",
    version=1,
    steps=(
        # Screening and the hold do not depend on each other, so they run at the same time:
        # a transfer waits for the slower of the two, not for both in turn. A denied screen
        # releases a hold that was placed (a hold moves no money; the funds are only unavailable
        # for that moment).
        Parallel(
            # A third-party sanctions/risk screen: no money effect, nothing to undo.
            Step("screen", action=risk.SCREEN, compensation=None, has_effect=False,
                 timeout_s=10),
            # Place a hold on the source: the funds stay on the account but cannot be spent
            # twice.
            Step("reserve", action=ledger.RESERVE, compensation=ledger.RELEASE),
        ),
        # Credit the destination from the clearing account; undone by a reversing entry.
        Step("credit", action=ledger.CREDIT, compensation=ledger.REVERSE_CREDIT),
        # Debit the source and consume the hold: the pivot, after which the saga only goes on.
        # It can still fail (daily outflow limit), which makes both earlier effects unwind.
        Step("settle", action=ledger.SETTLE, compensation=None, pivot=True),
        Step("notify", action=notify.SEND, compensation=None, has_effect=False),
    ),
)


def transfer_key(request: TransferRequested) -> str:
    """The transfer id is the idempotency key forever. As `str(UUID)`, the key sagas started
    before saga types were generic were derived from, so their saga ids stay the same."""
    return str(request.transfer_id)


def transfer_key_of_refused(document: object) -> str | None:
    """The transfer id of a request that failed validation, if it names a usable one: the
    refusal then becomes a REJECTED saga, and that transfer id cannot be used again."""
    if not isinstance(document, dict):
        return None
    try:
        return str(UUID(str(document.get("transfer_id"))))
    except ValueError:
        return None


TRANSFER_INTAKE: IntakeRules[TransferRequested] = IntakeRules(
    # The error types `TransferRequested` raises for the money rules (schemas.messages).
    codes_by_error_type={
        "unknown_currency": RejectionCode.UNKNOWN_CURRENCY,
        "invalid_amount": RejectionCode.INVALID_AMOUNT,
        "same_account": RejectionCode.SAME_ACCOUNT,
    },
    # Any other problem with the amount (missing, not a string) is still an invalid amount.
    codes_by_field={"amount": RejectionCode.INVALID_AMOUNT},
    key_of_refused=transfer_key_of_refused,
)

def describe_transfer(request: Mapping[str, Any]) -> str:
    """A transfer's request in a timeline's line: amount, accounts, reference, requester."""
    return (f"{request['amount']} {request['currency']} {request['source_account']} -> "
            f"{request['destination_account']} ref={request.get('reference', '')!r} "
            f"by {request['requested_by']}")


TRANSFER_TYPE: SagaType[TransferRequested] = SagaType(
    name="transfer",
    definitions=(TRANSFER,),
    start_model=TransferRequested,
    start_topic=TOPIC_TRANSFER_COMMANDS,
    events_topic=TOPIC_TRANSFER_EVENTS,
    business_key=transfer_key,
    intake=TRANSFER_INTAKE,
    describe=describe_transfer,
    account_fields=("source_account", "destination_account"),
)

SAGAS: tuple[SagaType[TransferRequested], ...] = (TRANSFER_TYPE,)
# Every deployed definition of every type: what the participants must have handlers for.
DEFINITIONS: tuple[SagaDefinition, ...] = tuple(
    definition for saga_type in SAGAS for definition in saga_type.definitions)
