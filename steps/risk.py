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
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection

from orchestrator.participant import ParticipantService, ServiceParticipant, StepResult
from orchestrator.redact import mask_account
from orchestrator.settings import Settings
from schemas import StepCommand
from steps.registry import risk
from steps.saga import DEFINITIONS


class ScreeningProvider:
    """The provider's batch call, with its latency and injected outages."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.latency_s = settings.risk_latency_ms / 1000
        self.failure_rate = settings.risk_failure_rate
        self.denied = frozenset(settings.risk_denied_accounts)
        self.rng = rng or random.Random()

    async def answered(self, conn: AsyncConnection, commands: Sequence[StepCommand],
                       now: datetime, *, lock: bool) -> frozenset[UUID]:
        """The commands the provider answered (an outage is injected per command)."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)  # the provider answers a batch in one call
        return frozenset(c.command_id for c in commands
                         if not (self.failure_rate and self.rng.random() < self.failure_rate))


def screening(command: StepCommand, answered: bool, denied: frozenset[str]) -> StepResult:
    """The screening rule for one command, given whether the provider answered."""
    if not answered:
        return StepResult.refused("PROVIDER_UNAVAILABLE",
                                  "screening provider did not answer (injected)", retryable=True)
    parties = {str(command.payload.get("source_account")),
               str(command.payload.get("destination_account"))}
    hits = sorted(parties & denied)
    if hits:
        # Masked: the reason reaches logs and dead letters; the accounts are in the saga's input.
        return StepResult.refused("SANCTIONS_HIT", "party on the deny list: "
                                  + ", ".join(mask_account(hit) for hit in hits))
    return StepResult.ok(screened=True)


def risk_participant(settings: Settings, rng: random.Random | None = None
                     ) -> ServiceParticipant[frozenset[UUID]]:
    """The screening participant, with the provider the settings describe. A screen changes
    nothing (no effect tables): only its reply is stored."""
    provider = ScreeningProvider(settings, rng)
    service = ParticipantService("risk", read=provider.answered)

    @service.handles(risk.SCREEN)
    def screen(command: StepCommand, answered: frozenset[UUID], now: datetime) -> StepResult:
        return screening(command, command.command_id in answered, provider.denied)

    return service.participant(*DEFINITIONS)
