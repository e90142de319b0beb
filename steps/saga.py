"""The saga definitions this orchestrator runs. Step names are persisted: never rename one."""

from __future__ import annotations

from orchestrator.core.definition import Parallel, SagaDefinition, Step
from steps.registry import ledger, notify, risk

TRANSFER = SagaDefinition(
    name="transfer",
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

SAGAS: dict[str, SagaDefinition] = {TRANSFER.name: TRANSFER}
