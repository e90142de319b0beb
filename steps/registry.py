"""Names of the actions each participant carries out.

A saga definition refers to these objects, not to strings, so that a typo is an import error and
the test `test_every_action_has_a_handler` can prove every referenced action has a handler.
"""

from __future__ import annotations

from orchestrator.core import Action


class risk:
    SCREEN = Action("risk", "screen")


class ledger:
    RESERVE = Action("ledger", "reserve")
    RELEASE = Action("ledger", "release")
    CREDIT = Action("ledger", "credit")
    REVERSE_CREDIT = Action("ledger", "reverse_credit")
    SETTLE = Action("ledger", "settle")


class notify:
    SEND = Action("notify", "send")
