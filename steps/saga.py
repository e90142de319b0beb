"""The saga definitions this orchestrator runs. Step names are persisted: never rename one."""

from __future__ import annotations

from orchestrator.core.definition import SagaDefinition, Step
from steps.registry import ledger, notify, risk

TRANSFER = SagaDefinition(
    name="transfer",
    steps=(
        # A third-party sanctions/risk screen: no money effect, nothing to undo.
        Step("screen", action=risk.SCREEN, compensation=None, has_effect=False, timeout_s=10),
        # Place a hold on the source: the funds stay on the account but cannot be spent twice.
        Step("reserve", action=ledger.RESERVE, compensation=ledger.RELEASE),
        # Credit the destination from the clearing account; undone by a reversing entry.
        Step("credit", action=ledger.CREDIT, compensation=ledger.REVERSE_CREDIT),
        # Debit the source and consume the hold: the pivot, after which the saga only goes on.
        # It can still fail (daily outflow limit), which makes both earlier effects unwind.
        Step("settle", action=ledger.SETTLE, compensation=None, pivot=True),
        Step("notify", action=notify.SEND, compensation=None, has_effect=False),
    ),
)

SAGAS: dict[str, SagaDefinition] = {TRANSFER.name: TRANSFER}
