"""The card top-up saga. Step names are persisted: never rename one."""

from __future__ import annotations

from card_topup.actions import cards, wallet
from orchestrator.core import Backoff, SagaDefinition, Step

CARD_TOPUP = SagaDefinition(
    name="card_topup",
    steps=(
        # Hold the amount on the wallet: still the customer's, but no longer spendable twice.
        Step("hold", action=wallet.HOLD, compensation=wallet.RELEASE, timeout_s=5),
        # Load the card at the processor: the pivot, a load cannot be called back. An issuer
        # outage is retryable: up to 5 attempts, 1 s, 2 s, 4 s ... apart.
        Step("load", action=cards.LOAD, compensation=None, pivot=True, max_attempts=5,
             backoff=Backoff(initial_s=1.0, max_s=30.0)),
        # Take the held amount off the wallet. After the pivot: it must not fail for business
        # reasons, and it cannot, the hold guarantees the funds.
        Step("capture", action=wallet.CAPTURE, compensation=None),
    ),
)
