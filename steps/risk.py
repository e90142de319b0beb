"""The risk/sanctions screening participant: a stand-in for a third-party provider.

It has no money effect. A party on the deny list is refused for good (`SANCTIONS_HIT`); injected
provider outages (`risk_failure_rate`) are retryable refusals, and `risk_latency_ms` adds the
provider's response time, so retries and timeouts can be exercised against real traffic.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.participant.runtime import Decided, EffectTable, StepResult
from orchestrator.settings import Settings
from schemas import StepCommand


class RiskParticipant:
    name = "risk"
    effects: tuple[EffectTable, ...] = ()  # a screen changes nothing: only its reply is stored
    locks = False

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.latency_s = settings.risk_latency_ms / 1000
        self.failure_rate = settings.risk_failure_rate
        self.denied = frozenset(settings.risk_denied_accounts)
        self.rng = rng or random.Random()

    async def read(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                   now: datetime, *, lock: bool) -> list[bool]:
        """Ask the provider: whether it answered, per command (an outage is injected)."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)  # the provider answers a batch in one call
        return [not (self.failure_rate and self.rng.random() < self.failure_rate)
                for _ in commands]

    def decide(self, commands: Sequence[StepCommand], view: list[bool],
               now: datetime) -> list[Decided]:
        return [Decided(self._screen(command, answered))
                for command, answered in zip(commands, view, strict=True)]

    def _screen(self, command: StepCommand, answered: bool) -> StepResult:
        if not answered:
            return StepResult.refused("PROVIDER_UNAVAILABLE",
                                      "screening provider did not answer (injected)",
                                      retryable=True)
        parties = {str(command.payload.get("source_account")),
                   str(command.payload.get("destination_account"))}
        hits = sorted(parties & self.denied)
        if hits:
            return StepResult.refused("SANCTIONS_HIT", f"party on the deny list: {', '.join(hits)}")
        return StepResult.ok(screened=True)
