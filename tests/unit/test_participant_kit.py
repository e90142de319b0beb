"""The participant kit's declarative layer, without a database: registration, the check against
saga definitions at construction, routing by (action, direction), and the batch's shared view.
What the runtime does with the answers (stored replies, tombstones, dead letters) is tested on
the real stack: tests/integration/test_relay_and_participants.py and test_example_participant.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

from orchestrator.core import Action, SagaDefinition, Step
from orchestrator.errors import ConfigurationError
from orchestrator.participant import (
    Decided,
    EffectTable,
    ParticipantService,
    StepResult,
)
from schemas import Direction, Outcome, StepCommand

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
GRANT = Action("quota", "grant")
REVOKE = Action("quota", "revoke")
AUDIT = Action("quota", "audit")
OTHER = Action("mail", "send")
GRANTS = EffectTable("grants", (("saga_id", "uuid"), ("units", "integer")))

QUOTA = SagaDefinition("quota", (
    Step("grant", action=GRANT, compensation=REVOKE),
    Step("audit", action=AUDIT, compensation=None, has_effect=False),
    Step("mail", action=OTHER, compensation=None, has_effect=False),
))


def command(action: Action, direction: Direction = Direction.FORWARD, step: str = "grant",
            units: int = 1) -> StepCommand:
    return StepCommand(command_id=uuid4(), saga_id=uuid4(), saga_type="quota", step=step,
                       action=action.name, direction=direction, attempt=1, deadline_at=NOW,
                       payload={"units": units})


async def remaining(conn: Any, commands: Sequence[StepCommand], now: datetime, *,
                    lock: bool) -> dict[str, int]:
    return {"left": 3}


def quota_service() -> ParticipantService[dict[str, int]]:
    service = ParticipantService("quota", read=remaining, effects=(GRANTS,))

    @service.handles(GRANT)
    def grant(command: StepCommand, view: dict[str, int], now: datetime) -> Decided:
        units = int(str(command.payload["units"]))
        if units > view["left"]:
            return Decided(StepResult.refused("QUOTA_EXHAUSTED", f"{view['left']} left"))
        view["left"] -= units  # the next command of the batch sees what this one took
        return Decided(StepResult.ok(granted=units),
                       (GRANTS.row(saga_id=command.saga_id, units=units),))

    @service.compensates(REVOKE)
    def revoke(command: StepCommand, view: dict[str, int], now: datetime) -> StepResult:
        return StepResult.ok(revoked=True)

    return service


def test_every_action_a_definition_names_must_have_its_handler() -> None:
    service = ParticipantService("quota")

    @service.handles(GRANT)
    def grant(command: StepCommand, view: None, now: datetime) -> StepResult:
        return StepResult.ok()

    with pytest.raises(ConfigurationError) as error:
        service.participant(QUOTA)

    # Both missing ones, each with where the definition names it and how to register it; the
    # other participant's action (mail.send) is not this participant's business.
    assert str(error.value) == (
        "participant 'quota' has no handler for: quota.grant: compensation quota.revoke"
        " (@compensates); quota.audit: forward action quota.audit (@handles)")


def test_a_compensation_handler_does_not_stand_in_for_the_forward_action() -> None:
    service = ParticipantService("quota")

    @service.compensates(GRANT, REVOKE, AUDIT)
    def anything(command: StepCommand, view: None, now: datetime) -> StepResult:
        return StepResult.ok()

    with pytest.raises(ConfigurationError, match=r"forward action quota\.grant"):
        service.participant(QUOTA)


def test_a_complete_service_builds_and_says_what_it_handles() -> None:
    service = quota_service()

    @service.handles(AUDIT)
    def audit(command: StepCommand, view: dict[str, int], now: datetime) -> StepResult:
        return StepResult.ok()

    participant = service.participant(QUOTA)

    assert (participant.name, participant.effects, participant.locks) == ("quota", (GRANTS,),
                                                                          False)
    assert participant.handled == {(GRANT, Direction.FORWARD), (REVOKE, Direction.COMPENSATE),
                                   (AUDIT, Direction.FORWARD)}
    participant.serves(QUOTA)  # the same check, on the built participant


def test_registrations_after_the_build_do_not_change_the_participant() -> None:
    service = quota_service()
    built = service.participant()

    @service.handles(AUDIT)
    def audit(command: StepCommand, view: dict[str, int], now: datetime) -> StepResult:
        return StepResult.ok()

    assert built.unhandled(command(AUDIT, step="audit")) is not None
    with pytest.raises(ConfigurationError, match=r"quota\.audit"):
        built.serves(QUOTA)


def test_an_action_of_another_participant_or_a_second_handler_is_refused() -> None:
    service = quota_service()

    with pytest.raises(ConfigurationError, match="belongs to participant 'mail'"):
        service.handles(OTHER)
    with pytest.raises(ConfigurationError, match="already has a handler for the forward action"):
        service.handles(GRANT)(lambda command, view, now: StepResult.ok())
    with pytest.raises(ConfigurationError, match="needs at least one Action"):
        service.compensates()


def test_commands_are_routed_by_action_and_direction() -> None:
    participant = quota_service().participant()

    assert participant.unhandled(command(GRANT)) is None
    assert participant.unhandled(command(REVOKE, Direction.COMPENSATE)) is None
    assert participant.unhandled(command(GRANT, Direction.COMPENSATE)) == (
        "participant 'quota' has no handler for the compensation 'grant' (step 'grant' of a"
        " 'quota' saga)")
    assert participant.unhandled(command(AUDIT, step="audit")) == (
        "participant 'quota' has no handler for the forward action 'audit' (step 'audit' of a"
        " 'quota' saga)")


def test_a_batch_is_read_once_and_decided_in_order_on_one_view() -> None:
    participant = quota_service().participant()
    batch = [command(GRANT, units=2), command(REVOKE, Direction.COMPENSATE),
             command(GRANT, units=2), command(GRANT, units=1)]

    view = asyncio.run(participant.read(None, batch, NOW, lock=False))  # type: ignore[arg-type]
    decided = participant.decide(batch, view, NOW)

    assert [(d.result.outcome, d.result.code) for d in decided] == [
        (Outcome.SUCCEEDED, None), (Outcome.SUCCEEDED, None),
        (Outcome.FAILED, "QUOTA_EXHAUSTED"), (Outcome.SUCCEEDED, None)]
    # A StepResult alone is an answer that writes nothing.
    assert [len(d.rows) for d in decided] == [1, 0, 0, 1]
    assert decided[0].rows == (("grants", {"saga_id": batch[0].saga_id, "units": 2}),)
    assert view == {"left": 0}


def test_without_a_read_the_view_is_none() -> None:
    service = ParticipantService("quota")
    seen: list[object] = []

    @service.handles(GRANT)
    def grant(command: StepCommand, view: None, now: datetime) -> StepResult:
        seen.append(view)
        return StepResult.ok()

    participant = service.participant()
    batch = [command(GRANT)]
    view = asyncio.run(participant.read(None, batch, NOW, lock=True))  # type: ignore[arg-type]

    assert [d.result for d in participant.decide(batch, view, NOW)] == [StepResult.ok()]
    assert seen == [None]


def test_deciding_a_command_without_a_handler_is_a_configuration_error() -> None:
    """The runtime dead-letters such commands before it decides; the kit never guesses."""
    participant = quota_service().participant()

    with pytest.raises(ConfigurationError, match="no handler for the forward action 'audit'"):
        participant.decide([command(AUDIT, step="audit")], {"left": 1}, NOW)


def test_an_effect_row_must_have_exactly_the_tables_columns() -> None:
    assert GRANTS.row(saga_id="s", units=1) == ("grants", {"saga_id": "s", "units": 1})
    with pytest.raises(ValueError, match=r"missing \['units'\], unknown \['unit'\]"):
        GRANTS.row(saga_id="s", unit=1)
