"""The participants: handlers that carry out each step and its compensation.

`steps.registry` (the action names a saga definition refers to) is imported eagerly; the
participants themselves load on first use, because they build on the orchestrator's edges
(store, bus) while the orchestrator's definitions refer to the registry.
"""

from __future__ import annotations

import importlib
from typing import Any

from steps.registry import Action, ledger, notify, risk

_LAZY = {
    "LedgerParticipant": "steps.ledger",
    "open_account": "steps.ledger",
    "NotifyParticipant": "steps.notify",
    "RiskParticipant": "steps.risk",
    "Participant": "steps.runtime",
    "ParticipantWorker": "steps.runtime",
    "StepResult": "steps.runtime",
}

__all__ = ["Action", "ledger", "notify", "risk", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'steps' has no attribute {name!r}")
