"""The actions of the card top-up's participants. The saga definition refers to these objects
and the participants register their handlers with the same ones: a typo is an import error, and
a participant built against the definition proves it handles each of its actions."""

from __future__ import annotations

from orchestrator.core import Action


class wallet:
    HOLD = Action("wallet", "hold")
    RELEASE = Action("wallet", "release")
    CAPTURE = Action("wallet", "capture")


class cards:
    LOAD = Action("cards", "load")
