"""Saga types, given/expect through the pure core: several types side by side, versioned
definitions (a saga finishes on the version it started on), generic intake with a type's own
rules, and events written before saga types were generic."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID, uuid4, uuid5

import pytest
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.application import Application
from orchestrator.core.definition import SagaDefinition, Step
from orchestrator.core.intake import Unparseable, classify
from orchestrator.core.saga import (
    Decision,
    RejectSaga,
    SagaState,
    SagaStatus,
    StartSaga,
    Verdict,
    command_id_for,
    decide_reject,
    decide_reply,
    decide_start,
    evolve,
    fold,
    request_hash,
    saga_id_for,
)
from orchestrator.core.saga_type import BUSINESS_KEY_MAX, IntakeRules, Refusal, SagaType, SagaTypes
from orchestrator.errors import ConfigurationError, SagaDefinitionError
from schemas import (
    SAGA_EVENT_ADAPTER,
    Direction,
    Outcome,
    RejectionCode,
    SagaRejected,
    SagaStarted,
    StepReply,
    StepStarted,
    TransferRequested,
)
from steps import APPLICATION
from steps.registry import notify
from steps.saga import TRANSFER, TRANSFER_TYPE

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# The namespace saga ids were derived in before saga types were generic (and still are).
NAMESPACE = UUID("6f1c3a52-8d0e-4f7b-9a51-2c0d9e7b4a10")

# Version 2 of the transfer: screening moved upstream, so it starts at `reserve`.
# Version 2 drops the screening: the hold alone, then the rest as in version 1.
TRANSFER_V2 = SagaDefinition(name="transfer", version=2,
                             steps=(TRANSFER.step("reserve"), *TRANSFER.steps[1:]))
TRANSFER_V1_V2 = SagaType(
    name="transfer", definitions=(TRANSFER, TRANSFER_V2), start_model=TransferRequested,
    start_topic="transfers.commands.v1", business_key=lambda r: str(r.transfer_id),
    intake=TRANSFER_TYPE.intake)


class NoticeRequested(BaseModel):
    """The start message of a second saga type, with a key of its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    notice_id: Annotated[str, Field(min_length=1, max_length=300)]
    destination_account: str
    reference: str = ""


def no_shouting(request: NoticeRequested) -> Refusal | None:
    if request.reference.isupper():
        return Refusal(RejectionCode.SCHEMA_VIOLATION, "reference: no shouting")
    return None


NOTICE = SagaDefinition(name="notice", steps=(
    Step("notify", action=notify.SEND, compensation=None, has_effect=False),))
NOTICE_TYPE = SagaType(
    name="notice", definitions=(NOTICE,), start_model=NoticeRequested,
    start_topic="notices.commands.v1", business_key=lambda r: r.notice_id,
    intake=IntakeRules(
        codes_by_field={"destination_account": RejectionCode.SAME_ACCOUNT},
        checks=(no_shouting,),
        key_of_refused=lambda d: d.get("notice_id") if isinstance(d, dict) else None))


def a_transfer(**changes: Any) -> TransferRequested:
    fields: dict[str, Any] = {
        "transfer_id": uuid4(), "source_account": "alice", "destination_account": "bob",
        "amount": "25.10", "currency": "EUR", "reference": "rent", "requested_by": "test"}
    return TransferRequested.model_validate({**fields, **changes})


def ok(state: SagaState) -> StepReply:
    assert state.command_id is not None and state.step is not None
    assert state.direction is not None
    return StepReply(reply_id=uuid5(state.command_id, "reply"), command_id=state.command_id,
                     saga_id=state.saga_id, step=state.step, direction=state.direction,
                     attempt=state.attempt, participant="test", outcome=Outcome.SUCCEEDED)


def run(types: SagaTypes, state: SagaState, decision: Decision) -> tuple[SagaState, list[str]]:
    """Answer every command with a success until the saga ends; the steps it started."""
    steps = [e.step for e in decision.events if isinstance(e, StepStarted)]
    while not state.terminal:
        decision = decide_reply(types.definition_of(state), state, ok(state), NOW)
        for event in decision.events:
            state = evolve(state, event)
            if isinstance(event, StepStarted):
                steps.append(event.step)
    return state, steps


def started(definition: SagaDefinition, message: StartSaga) -> tuple[SagaState, Decision]:
    decision = decide_start(definition, None, message, NOW)
    state = fold(decision.events)
    assert state is not None
    return state, decision


# ---------------------------------------------------------------- versions


def test_a_new_saga_starts_on_the_current_version_and_records_it() -> None:
    request = a_transfer()
    message = TRANSFER_V1_V2.start(request, NOW)

    decision = decide_start(TRANSFER_V1_V2.current, None, message, NOW)

    saga_id = saga_id_for("transfer", str(request.transfer_id))
    first = command_id_for(saga_id, "reserve", Direction.FORWARD, 1)
    assert decision.verdict is Verdict.STARTED
    assert decision.events[:2] == (
        SagaStarted(saga_type="transfer", business_key=str(request.transfer_id),
                    definition_version=2, input=request.model_dump(mode="json"),
                    request_hash=message.request_hash, requested_at=NOW),
        StepStarted(step="reserve", action="reserve", direction=Direction.FORWARD, attempt=1,
                    command_id=first,
                    deadline_at=NOW + timedelta(seconds=TRANSFER_V2.steps[0].timeout_s)))
    state = fold(decision.events)
    assert state is not None and state.definition_version == 2


def test_a_saga_started_on_v1_finishes_on_v1_once_v2_is_deployed() -> None:
    # Given: a saga started while only version 1 was deployed, waiting on its screen.
    v1_only = SagaTypes([TRANSFER_TYPE])
    old, decision = started(v1_only["transfer"].current, TRANSFER_TYPE.start(a_transfer(), NOW))
    assert (old.definition_version, old.step) == (1, "screen")

    # When: version 2 is deployed beside it, and the screen's reply arrives.
    both = SagaTypes([TRANSFER_V1_V2])
    assert both.definition_of(old) is TRANSFER
    finished, steps = run(both, old, decision)

    # Expect: it went on through version 1's steps; a new saga runs version 2's.
    assert (finished.status, finished.definition_version) == (SagaStatus.COMPLETED, 1)
    assert steps == ["screen", "reserve", "credit", "settle", "notify"]
    new, new_decision = started(both["transfer"].current, TRANSFER_V1_V2.start(a_transfer(), NOW))
    new_finished, new_steps = run(both, new, new_decision)
    assert (new_finished.status, new_finished.definition_version) == (SagaStatus.COMPLETED, 2)
    assert new_steps == ["reserve", "credit", "settle", "notify"]


def test_deciding_a_v1_saga_on_v2_would_not_know_its_step() -> None:
    """Why the version is part of a saga: v2 has no `screen`, where this saga waits."""
    old, _ = started(TRANSFER, TRANSFER_TYPE.start(a_transfer(), NOW))
    with pytest.raises(KeyError):
        decide_reply(TRANSFER_V2, old, ok(old), NOW)


def test_a_duplicate_of_a_v1_request_stays_a_duplicate_after_v2() -> None:
    request = a_transfer()
    old, _ = started(TRANSFER, TRANSFER_TYPE.start(request, NOW))

    again = decide_start(TRANSFER_V1_V2.current, old, TRANSFER_V1_V2.start(request, NOW), NOW)
    changed = decide_start(TRANSFER_V1_V2.current, old,
                           TRANSFER_V1_V2.start(a_transfer(transfer_id=request.transfer_id,
                                                           amount="1.00"), NOW), NOW)

    assert again == Decision(Verdict.DUPLICATE)
    assert changed.verdict is Verdict.CONFLICT and changed.events == ()


def test_removing_a_version_sagas_run_on_is_named() -> None:
    only_v2 = SagaTypes([SagaType(name="transfer", definitions=(TRANSFER_V2,),
                                  start_model=TransferRequested,
                                  start_topic="transfers.commands.v1",
                                  business_key=lambda r: str(r.transfer_id))])

    assert only_v2.missing([("transfer", 1), ("transfer", 2), ("payout", 3)]) == [
        ("payout", 3), ("transfer", 1)]
    assert SagaTypes([TRANSFER_V1_V2]).missing([("transfer", 1), ("transfer", 2)]) == []
    old, _ = started(TRANSFER, TRANSFER_TYPE.start(a_transfer(), NOW))
    with pytest.raises(ConfigurationError, match="no definition version 1"):
        only_v2.definition_of(old)


# ---------------------------------------------------------------- several types


def test_two_types_side_by_side_have_their_own_keys_and_ids() -> None:
    types = SagaTypes([TRANSFER_TYPE, NOTICE_TYPE])
    key = str(uuid4())
    transfer = TRANSFER_TYPE.start(a_transfer(transfer_id=UUID(key)), NOW)
    notice = NOTICE_TYPE.start(NoticeRequested(notice_id=key, destination_account="bob"), NOW)

    assert transfer.business_key == notice.business_key == key
    assert transfer.saga_id != notice.saga_id  # the same key in two types: two sagas
    state, decision = started(types["notice"].current, notice)
    finished, steps = run(types, state, decision)
    assert (finished.saga_type, finished.status, steps) == (
        "notice", SagaStatus.COMPLETED, ["notify"])
    with pytest.raises(ValueError, match="cannot run on the transfer saga"):
        decide_start(TRANSFER, None, notice, NOW)


def test_intake_applies_each_types_own_rules() -> None:
    def of(document: object) -> StartSaga | RejectSaga | Unparseable:
        return classify(NOTICE_TYPE, json.dumps(document).encode(), None)

    good = of({"notice_id": "n-1", "destination_account": "bob", "reference": "hello"})
    shouting = of({"notice_id": "n-2", "destination_account": "bob", "reference": "HELLO"})
    no_account = of({"notice_id": "n-3"})
    no_key = of({"destination_account": "bob"})
    long_key = of({"notice_id": "n" * (BUSINESS_KEY_MAX + 1), "destination_account": "bob"})

    assert isinstance(good, StartSaga) and (good.saga_type, good.business_key) == ("notice", "n-1")
    # refused by a check, so it was a valid start message: its hash goes with its refusal
    shouted = NOTICE_TYPE.start_model.model_validate(
        {"notice_id": "n-2", "destination_account": "bob", "reference": "HELLO"})
    assert shouting == RejectSaga("notice", "n-2", RejectionCode.SCHEMA_VIOLATION,
                                  "reference: no shouting", request_hash(shouted))
    assert isinstance(no_account, RejectSaga) and no_account.code is RejectionCode.SAME_ACCOUNT
    assert isinstance(no_key, Unparseable) and no_key.code is RejectionCode.SCHEMA_VIOLATION
    assert isinstance(long_key, Unparseable) and "business key" in long_key.reason
    rejected = fold(decide_reject(None, shouting).events)
    assert rejected is not None
    assert (rejected.saga_id, rejected.saga_type, rejected.status, rejected.definition_version
            ) == (saga_id_for("notice", "n-2"), "notice", SagaStatus.REJECTED, None)


def test_an_application_checks_its_types_together() -> None:
    both = Application(name="two", sagas=[TRANSFER_TYPE, NOTICE_TYPE], participants={})
    assert list(both.saga_types) == ["transfer", "notice"]
    assert both.sagas == (TRANSFER_TYPE, NOTICE_TYPE)
    assert list(APPLICATION.saga_types) == ["transfer"]
    with pytest.raises(ConfigurationError, match="two saga types are named"):
        Application(name="x", sagas=[TRANSFER_TYPE, TRANSFER_V1_V2], participants={})
    same_topic = SagaType(name="other", definitions=(SagaDefinition("other", NOTICE.steps),),
                          start_model=NoticeRequested, start_topic="notices.commands.v1",
                          business_key=lambda r: r.notice_id)
    with pytest.raises(ConfigurationError, match="each needs a topic of its own"):
        SagaTypes([NOTICE_TYPE, same_topic])
    same_events = SagaType(name="other", definitions=(SagaDefinition("other", NOTICE.steps),),
                           start_model=NoticeRequested, start_topic="others.v1",
                           business_key=lambda r: r.notice_id,
                           events_topic="notices.events.v1")
    with pytest.raises(ConfigurationError, match=r"publishes its outcomes on notices\.events\.v1"):
        SagaTypes([NOTICE_TYPE, same_events])


def test_each_type_has_an_events_topic_derived_from_its_start_topic_unless_named() -> None:
    def of(start_topic: str, **named: str) -> str:
        return SagaType(name="notice", definitions=(NOTICE,), start_model=NoticeRequested,
                        start_topic=start_topic, business_key=lambda r: r.notice_id,
                        **named).events_topic

    assert TRANSFER_TYPE.events_topic == "transfers.events.v1"
    assert NOTICE_TYPE.events_topic == "notices.events.v1"
    assert of("cards.topups.v1") == "notice.events.v1"  # no "commands" in it: by the name
    assert of("cards.topups.v1", events_topic="cards.done.v2") == "cards.done.v2"
    with pytest.raises(SagaDefinitionError, match="on its start topic"):
        of("cards.topups.v1", events_topic="cards.topups.v1")


@pytest.mark.parametrize(("changes", "message"), [
    ({"name": "pay:out"}, "must match"),
    ({"definitions": ()}, "has no definition"),
    ({"definitions": (TRANSFER,)}, "lists a definition of 'transfer'"),
    ({"definitions": (NOTICE, NOTICE)}, "two definitions of version 1"),
    ({"current_version": 2}, "does not define"),
    ({"start_topic": ""}, "needs a start topic"),
])
def test_a_saga_type_that_cannot_work_is_refused_when_built(changes: dict[str, Any],
                                                            message: str) -> None:
    fields: dict[str, Any] = {
        "name": "notice", "definitions": (NOTICE,), "start_model": NoticeRequested,
        "start_topic": "notices.commands.v1", "business_key": lambda r: r.notice_id}
    with pytest.raises(SagaDefinitionError, match=message):
        SagaType(**{**fields, **changes})


def test_a_definition_version_starts_at_1() -> None:
    with pytest.raises(SagaDefinitionError, match="version >= 1"):
        SagaDefinition(name="notice", version=0, steps=NOTICE.steps)


# ---------------------------------------------------------------- written before saga types


def test_events_written_before_saga_types_read_as_transfers_on_v1() -> None:
    transfer_id = uuid4()
    request = a_transfer(transfer_id=transfer_id)
    old_started = {"schema_version": 1, "type": "SagaStarted", "saga_type": "transfer",
                   "transfer_id": str(transfer_id), "input": request.model_dump(mode="json"),
                   "request_hash": "h", "requested_at": None}
    other = uuid4()
    old_rejected = {"schema_version": 1, "type": "SagaRejected", "transfer_id": str(other),
                    "reason_code": "INVALID_AMOUNT", "reason": "amount: 0"}

    started_event = SAGA_EVENT_ADAPTER.validate_python(old_started)
    rejected_event = SAGA_EVENT_ADAPTER.validate_json(json.dumps(old_rejected))

    assert isinstance(started_event, SagaStarted)
    assert (started_event.business_key, started_event.definition_version) == (
        str(transfer_id), 1)
    assert rejected_event == SagaRejected(saga_type="transfer", business_key=str(other),
                                          reason_code=RejectionCode.INVALID_AMOUNT,
                                          reason="amount: 0")
    # the saga ids they always had
    state = fold([started_event])
    assert state is not None
    assert state.saga_id == uuid5(NAMESPACE, f"transfer:{transfer_id}")
    rejected_state = fold([rejected_event])
    assert rejected_state is not None
    assert rejected_state.saga_id == uuid5(NAMESPACE, f"transfer:{other}")
    # what is written now names no transfer
    assert "transfer_id" not in json.loads(started_event.model_dump_json())
    with pytest.raises(ValueError, match="not both"):
        SAGA_EVENT_ADAPTER.validate_python({**old_started, "business_key": "k"})

