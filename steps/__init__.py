"""The transfer application: its saga type (`transfer`, started by `TransferRequested` on
`transfers.commands.v1`, keyed by transfer id), its participants (ledger, risk, notify) and their
tables.

It registers itself with the engine as `APPLICATION`, which the settings name
(`SAGA_APPLICATION=steps:APPLICATION`, the default); the engine never imports this package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.application import Application, LedgerViews
from orchestrator.core import Action
from orchestrator.settings import Settings
from steps.ledger import ACCOUNT_VIEW_SQL, CUSTOMER_VIEW_SQL, LEDGER, open_account
from steps.notify import NOTIFY
from steps.registry import ledger, notify, risk
from steps.risk import risk_participant
from steps.saga import SAGAS, TRANSFER, TRANSFER_TYPE


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    # The demo starts servers and processes: loaded only when asked for.
    from steps.demo import cli_demo

    return await cli_demo(settings, args)


APPLICATION = Application(
    name="transfers",
    sagas=SAGAS,
    participants={
        "risk": risk_participant,
        "ledger": lambda _settings: LEDGER,
        "notify": lambda _settings: NOTIFY,
    },
    migrations=(Path(__file__).parent / "migrations",),
    ledger=LedgerViews(ACCOUNT_VIEW_SQL, CUSTOMER_VIEW_SQL),
    demo=_demo,
)

__all__ = [
    "APPLICATION",
    "LEDGER",
    "NOTIFY",
    "TRANSFER",
    "TRANSFER_TYPE",
    "Action",
    "ledger",
    "notify",
    "open_account",
    "risk",
    "risk_participant",
]
