"""A second saga type, written the way a team would: moving money from a customer's wallet
onto their prepaid card. docs/writing-a-saga.md walks through it.

- `messages`: the start message `CardTopUpRequested` (its intake rules), the business key, the
  topics;
- `actions`, `saga`: the participants' actions and the `card_topup` saga definition;
- `wallet`, `cards`: the two participants, written with the participant kit;
- `migrations/`: their tables, applied after the engine's own.

It registers itself as `APPLICATION` (`SAGA_APPLICATION=card_topup:APPLICATION`, with
`docs/examples` on the Python path). Its participants run today (`saga worker participant
wallet`), and `tests/integration/test_example_participant.py` drives them on the real broker
and PostgreSQL, and `tests/integration/test_example_saga_end_to_end.py` runs whole top-ups:
published to `cards.topups.v1`, run by the engine's own workers.
"""

from __future__ import annotations

from pathlib import Path

from card_topup.cards import CARDS
from card_topup.saga import CARD_TOPUP, CARD_TOPUP_TYPE
from card_topup.wallet import WALLET
from orchestrator.application import Application

APPLICATION = Application(
    name="card_topups",
    sagas=(CARD_TOPUP_TYPE,),
    participants={"wallet": lambda _settings: WALLET, "cards": lambda _settings: CARDS},
    migrations=(Path(__file__).parent / "migrations",),
)

__all__ = ["APPLICATION", "CARDS", "CARD_TOPUP", "CARD_TOPUP_TYPE", "WALLET"]
