"""The card top-up saga. Step names are persisted: never rename one."""

from __future__ import annotations

from card_topup.actions import cards, wallet
from card_topup.messages import START_TOPIC, CardTopUpRequested, business_key, key_of_refused
from orchestrator.core import Backoff, IntakeRules, SagaDefinition, SagaType, Step
from schemas import RejectionCode

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

# The saga type: what the engine needs to run top-ups beside transfers. The money rules' error
# types become reason codes; a refused request that still names its top-up id becomes a
# REJECTED saga on that key, so the id cannot be used again.
CARD_TOPUP_TYPE: SagaType[CardTopUpRequested] = SagaType(
    name="card_topup",
    definitions=(CARD_TOPUP,),
    start_model=CardTopUpRequested,
    start_topic=START_TOPIC,
    business_key=business_key,
    intake=IntakeRules(
        codes_by_error_type={"invalid_amount": RejectionCode.INVALID_AMOUNT,
                             "unknown_currency": RejectionCode.UNKNOWN_CURRENCY},
        key_of_refused=key_of_refused,
    ),
    # Where `saga list --account` looks: the wallet debited and the card credited.
    account_fields=("wallet_id", "card_id"),
)
