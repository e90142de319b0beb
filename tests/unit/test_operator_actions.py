"""Given/expect tests of operator actions in the pure core: retry now, cancel, retry
compensation and resolve, in every state that allows them and every state that refuses them.

Given a saga's events, when an operator acts (`decide_action`), expect the events that record
the action (with its actor, reason and action id) and what it causes; or a refusal that says why
and decides nothing. The sequential saga is `test_core`'s; the parallel one `test_parallel`'s.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

import pytest
from hypothesis import event as label
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.saga import (
    ActOnSaga,
    Decision,
    OperatorAction,
    SagaState,
    SagaStatus,
    Verdict,
    decide_action,
    decide_reply,
    evolve,
    outcome_event_id,
    outcome_of,
    outstanding_commands,
)
from orchestrator.errors import OperatorActionRefused
from schemas import (
    SAGA_EVENT_ADAPTER,
    Direction,
    OperatorActed,
    SagaCompensated,
    SagaCompensatedOutcome,
    SagaResolved,
    StepResent,
)
from tests.unit import test_parallel as par
from tests.unit.test_core import (
    NOW,
    TRANSFER,
    Saga,
    at,
    ended,
    expected_command,
    expected_start,
    ok,
    refused,
    state_of,
)

FORWARD, COMPENSATE = Direction.FORWARD, Direction.COMPENSATE
LATER = NOW + timedelta(seconds=1)
ACTION_ID = UUID("7d4f0e0a-0000-4000-8000-000000000001")


def act(action: OperatorAction, reason: str = "INC-7: customer asked",
        actor: str = "alice") -> ActOnSaga:
    return ActOnSaga(action, ACTION_ID, actor, reason)


def acted(action: OperatorAction, reason: str = "INC-7: customer asked") -> OperatorActed:
    return OperatorActed(action=action.value, action_id=ACTION_ID, actor="alice", reason=reason)


def decide(saga: Saga, request: ActOnSaga) -> Decision:
    """When: the operator acts at LATER; the decision joins the saga's history."""
    decision = decide_action(TRANSFER, saga.state, request, LATER)
    saga.now = LATER
    saga._record(decision)
    return decision


def refused_with(saga: Saga, request: ActOnSaga, match: str) -> None:
    """Expect: refused, saying why, and nothing decided."""
    before = saga.state
    with pytest.raises(OperatorActionRefused, match=match):
        decide_action(TRANSFER, before, request, LATER)
    assert saga.state == before


def waiting_retry() -> Saga:
    """A saga whose `credit` failed retryably: attempt 2 waits out its backoff."""
    saga = at("credit")
    saga.receive(refused(saga.state, "BUSY", "try later", retryable=True))
    assert saga.state.next_attempt_at is not None and saga.state.command_id is None
    return saga


def failed_compensating() -> Saga:
    """A saga that FAILED while compensating: `release` (reserve's compensation) refused."""
    saga = at("credit")
    saga.receive(refused(saga.state, "NO_FUNDS", "refused"))
    saga.succeed_until("reserve", COMPENSATE)
    saga.receive(refused(saga.state, "LEDGER_DOWN", "ledger refused the release"))
    assert saga.state.status is SagaStatus.FAILED
    return saga


# ---------------------------------------------------------------- every action's common rules


@pytest.mark.parametrize("action", list(OperatorAction))
@pytest.mark.parametrize(("actor", "reason", "match"), [
    ("alice", "", "give a reason"), ("alice", "   ", "give a reason"),
    ("", "why", "say who acts"), (" ", "why", "say who acts")])
def test_every_action_needs_an_actor_and_a_reason(action: OperatorAction, actor: str,
                                                  reason: str, match: str) -> None:
    refused_with(waiting_retry(), act(action, reason, actor), match)


@pytest.mark.parametrize("action", list(OperatorAction))
def test_every_action_on_an_ended_saga_is_refused_but_resolve_of_a_failed_one(
        action: OperatorAction) -> None:
    saga = at("screen")
    while not saga.state.terminal:
        saga.receive(ok(saga.state))
    refused_with(saga, act(action), "COMPLETED")


def test_decisions_are_deterministic_and_events_round_trip() -> None:
    saga = waiting_retry()
    first = decide_action(TRANSFER, saga.state, act(OperatorAction.RETRY_NOW), LATER)
    assert first == decide_action(TRANSFER, saga.state, act(OperatorAction.RETRY_NOW), LATER)
    for event in first.events:
        assert SAGA_EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


# ---------------------------------------------------------------- retry now


def test_retry_now_starts_the_waiting_retry_at_once() -> None:
    saga = waiting_retry()
    payload = saga.state.input

    decision = decide(saga, act(OperatorAction.RETRY_NOW))

    started, command = expected_start(saga.state.saga_id, "credit", FORWARD, 2, payload, LATER)
    assert decision == Decision(Verdict.APPLIED,
                                events=(acted(OperatorAction.RETRY_NOW), started),
                                commands=(command,))
    assert saga.state.next_attempt_at is None and saga.state.command_id == command.command_id
    assert saga.state.due_at == command.deadline_at


def test_retry_now_sends_the_outstanding_command_again_without_spending_an_attempt() -> None:
    saga = at("credit")
    before = saga.state
    assert before.command_id is not None

    decision = decide(saga, act(OperatorAction.RETRY_NOW))

    deadline_at = LATER + timedelta(seconds=TRANSFER.step("credit").timeout_s)
    command = expected_command(before.saga_id, "credit", FORWARD, 1, before.input, deadline_at)
    assert command.command_id == before.command_id  # the same command: the participant dedupes
    assert decision == Decision(Verdict.APPLIED, events=(
        acted(OperatorAction.RETRY_NOW),
        StepResent(step="credit", direction=FORWARD, attempt=1, command_id=command.command_id,
                   deadline_at=deadline_at)), commands=(command,))
    assert (saga.state.attempt, saga.state.resends) == (1, 0)
    assert saga.state.deadline_at == deadline_at
    # and the reply to it is still the reply the saga waits for
    assert decide_reply(TRANSFER, saga.state, ok(saga.state), LATER).verdict is Verdict.APPLIED


def test_retry_now_of_a_compensation_waiting_for_its_retry_starts_it() -> None:
    saga = at("credit")
    saga.receive(refused(saga.state))
    saga.receive(refused(saga.state, "BUSY", "later", retryable=True))  # release: retry waits
    assert saga.state.status is SagaStatus.COMPENSATING and saga.state.next_attempt_at

    decision = decide(saga, act(OperatorAction.RETRY_NOW))

    started, command = expected_start(saga.state.saga_id, "reserve", COMPENSATE, 2,
                                      saga.state.input, LATER)
    assert decision.events == (acted(OperatorAction.RETRY_NOW), started)
    assert decision.commands == (command,)


def test_retry_now_in_a_group_acts_on_every_member_waiting_or_out() -> None:
    saga = par.in_group()
    saga.refuse("hold_b", retryable=True)  # hold_b waits; hold_a and screen are out
    hold_a, screen = saga.out("hold_a"), saga.out("screen")

    decision = decide_action(par.GROUPED, saga.state, act(OperatorAction.RETRY_NOW), LATER)
    saga._record(decision)

    assert decision.events[0] == acted(OperatorAction.RETRY_NOW)
    kinds = {(type(e).__name__, getattr(e, "step", None)) for e in decision.events[1:]}
    assert kinds == {("StepResent", "hold_a"), ("StepResent", "screen"),
                     ("StepStarted", "hold_b")}
    sent = {c.step: c for c in decision.commands}
    assert sent["hold_a"].command_id == hold_a.command_id
    assert sent["screen"].command_id == screen.command_id
    assert sent["hold_b"].attempt == 2
    assert {c.step for c in outstanding_commands(par.GROUPED, saga.state)} == {
        "hold_a", "hold_b", "screen"}


@pytest.mark.parametrize("given", ["failed", "resolved"])
def test_retry_now_of_a_saga_that_ended_is_refused(given: str) -> None:
    saga = failed_compensating()
    if given == "resolved":
        decide(saga, act(OperatorAction.RESOLVE))
        refused_with(saga, act(OperatorAction.RETRY_NOW), "RESOLVED")
    else:
        refused_with(saga, act(OperatorAction.RETRY_NOW), "FAILED.*retry-compensation")


def test_retry_now_of_a_group_that_turned_back_and_ended_is_refused() -> None:
    saga = par.in_group()
    saga.refuse("hold_a")  # failed for good; siblings still out
    saga.ok("hold_b")
    saga.ok("screen")  # the stage turned back: release of hold_b is out
    assert saga.state.status is SagaStatus.COMPENSATING
    saga.ok("hold_b", COMPENSATE)
    assert saga.state.terminal
    with pytest.raises(OperatorActionRefused, match="COMPENSATED"):
        decide_action(par.GROUPED, saga.state, act(OperatorAction.RETRY_NOW), LATER)


# ---------------------------------------------------------------- cancel


def test_cancel_compensates_what_was_applied_and_the_step_out_as_possibly_applied() -> None:
    saga = at("credit")  # screen and reserve applied, credit's command out

    decision = decide(saga, act(OperatorAction.CANCEL))

    started, command = expected_start(saga.state.saga_id, "credit", COMPENSATE, 1,
                                      saga.state.input, LATER)
    assert decision == Decision(Verdict.APPLIED,
                                events=(acted(OperatorAction.CANCEL), started),
                                commands=(command,))
    state = saga.state
    assert state.status is SagaStatus.COMPENSATING
    assert state.failed_step == "credit"
    assert state.failure == "CANCELLED: INC-7: customer asked (by alice)"


def test_a_late_success_of_the_cancelled_step_is_stale_and_undone_anyway() -> None:
    saga = at("credit")
    credit = saga.state
    decide(saga, act(OperatorAction.CANCEL))

    late = decide_reply(TRANSFER, saga.state, ok(credit), LATER)

    assert late.verdict is Verdict.STALE and late.events == ()
    # the compensation of credit, then of reserve, then compensated
    saga.receive(ok(saga.state))
    started, _ = expected_start(saga.state.saga_id, "reserve", COMPENSATE, 1,
                                saga.state.input, LATER)
    assert saga.events[-1] == started
    saga.receive(ok(saga.state))
    assert saga.state.status is SagaStatus.COMPENSATED
    assert saga.events[-1] == SagaCompensated(
        failed_step="credit", reason="CANCELLED: INC-7: customer asked (by alice)")
    assert saga.outcomes[-1] == ended(saga.state, SagaCompensatedOutcome, failed_step="credit",
                                      reason="CANCELLED: INC-7: customer asked (by alice)")


def test_cancel_of_a_waiting_retry_does_not_undo_the_step_that_applied_nothing() -> None:
    saga = waiting_retry()  # credit failed retryably: nothing applied
    decision = decide(saga, act(OperatorAction.CANCEL))
    started, _ = expected_start(saga.state.saga_id, "reserve", COMPENSATE, 1, saga.state.input,
                                LATER)
    assert decision.events == (acted(OperatorAction.CANCEL), started)
    assert saga.state.due_at == started.deadline_at  # the retry will never start


def test_cancel_with_nothing_applied_ends_compensated_at_once_with_its_outcome() -> None:
    saga = at("screen")
    saga.receive(refused(saga.state, "BUSY", "later", retryable=True))

    decision = decide(saga, act(OperatorAction.CANCEL))

    reason = "CANCELLED: INC-7: customer asked (by alice)"
    assert decision.events == (acted(OperatorAction.CANCEL),
                               SagaCompensated(failed_step="screen", reason=reason))
    assert decision.commands == ()
    assert decision.outcomes == (ended(saga.state, SagaCompensatedOutcome,
                                       failed_step="screen", reason=reason),)


def test_cancel_in_a_group_counts_every_member_out_as_possibly_applied() -> None:
    saga = par.in_group()
    saga.ok("hold_a")
    saga.refuse("hold_b", retryable=True)  # waits: applied nothing; screen is out

    decision = decide_action(par.GROUPED, saga.state, act(OperatorAction.CANCEL), LATER)
    saga._record(decision)

    # screen has no compensation; hold_a is undone; hold_b applied nothing
    assert [type(e).__name__ for e in decision.events] == ["OperatorActed", "StepStarted"]
    assert [(c.step, c.direction) for c in decision.commands] == [("hold_a", COMPENSATE)]
    assert saga.state.applied == ("check", "hold_a", "screen")


def test_cancel_after_the_pivot_is_refused() -> None:
    saga = at("notify")  # settle (the pivot) succeeded
    refused_with(saga, act(OperatorAction.CANCEL),
                 "past its pivot: step settle succeeded.*cannot be undone")


def test_cancel_while_the_pivot_is_out_is_refused() -> None:
    saga = at("settle")
    refused_with(saga, act(OperatorAction.CANCEL), "pivot step settle, which may have succeeded")


def test_cancel_of_a_compensating_saga_is_refused() -> None:
    saga = at("credit")
    saga.receive(refused(saga.state))
    refused_with(saga, act(OperatorAction.CANCEL), "COMPENSATING already")


def test_cancel_of_a_failed_saga_is_refused() -> None:
    refused_with(failed_compensating(), act(OperatorAction.CANCEL), "only a running saga")


# ---------------------------------------------------------------- retry compensation


def test_retry_compensation_starts_the_failed_compensation_again_then_goes_on() -> None:
    saga = failed_compensating()
    failed_attempt = saga.state.attempt

    decision = decide(saga, act(OperatorAction.RETRY_COMPENSATION))

    started, command = expected_start(saga.state.saga_id, "reserve", COMPENSATE,
                                      failed_attempt + 1, saga.state.input, LATER)
    assert decision == Decision(Verdict.APPLIED,
                                events=(acted(OperatorAction.RETRY_COMPENSATION), started),
                                commands=(command,))
    assert saga.state.status is SagaStatus.COMPENSATING and saga.state.conclusion is None
    saga.receive(ok(saga.state))
    assert saga.state.status is SagaStatus.COMPENSATED
    assert [type(o).__name__ for o in saga.outcomes] == [
        "SagaFailedOutcome", "SagaCompensatedOutcome"]
    # A new outcome, not a second event under the failed one's id (readers dedupe on ids);
    # the same state gives the same id on every copy.
    failed, compensated = saga.outcomes
    assert failed.event_id == outcome_event_id(saga.state.saga_id)
    assert compensated.event_id == outcome_event_id(saga.state.saga_id, 1) != failed.event_id
    assert outcome_of(SagaState.from_json(saga.state.to_json())) == compensated


def test_retry_compensation_that_fails_again_fails_the_saga_again() -> None:
    saga = failed_compensating()
    decide(saga, act(OperatorAction.RETRY_COMPENSATION))
    saga.receive(refused(saga.state, "LEDGER_DOWN", "again"))
    assert saga.state.status is SagaStatus.FAILED
    decide(saga, act(OperatorAction.RETRY_COMPENSATION))  # and may be retried once more
    assert saga.state.status is SagaStatus.COMPENSATING


def test_retry_compensation_of_a_saga_that_failed_after_the_pivot_is_refused() -> None:
    saga = at("notify")
    saga.receive(refused(saga.state, "SMTP_DOWN", "mail relay refused"))
    assert saga.state.status is SagaStatus.FAILED
    refused_with(saga, act(OperatorAction.RETRY_COMPENSATION),
                 "failed going forward \\(step notify\\).*resolve it")


def test_retry_now_of_a_saga_that_failed_past_its_pivot_sends_the_step_again_and_goes_on(
        ) -> None:
    saga = at("notify")  # settle (the pivot) succeeded
    saga.receive(refused(saga.state, "SMTP_DOWN", "mail relay refused"))
    assert saga.state.status is SagaStatus.FAILED
    failed_attempt = saga.state.attempt

    decision = decide(saga, act(OperatorAction.RETRY_NOW))

    started, command = expected_start(saga.state.saga_id, "notify", FORWARD,
                                      failed_attempt + 1, saga.state.input, LATER)
    assert decision == Decision(Verdict.APPLIED, events=(acted(OperatorAction.RETRY_NOW), started),
                                commands=(command,))
    assert saga.state.status is SagaStatus.RUNNING and saga.state.conclusion is None
    saga.receive(ok(saga.state))
    assert saga.state.status is SagaStatus.COMPLETED
    failed, completed = saga.outcomes
    assert (type(failed).__name__, type(completed).__name__) == (
        "SagaFailedOutcome", "SagaCompletedOutcome")
    assert completed.event_id == outcome_event_id(saga.state.saga_id, 1) != failed.event_id


def test_retry_now_of_a_saga_that_failed_compensating_points_to_retry_compensation() -> None:
    refused_with(failed_compensating(), act(OperatorAction.RETRY_NOW),
                 "FAILED while compensating: retry its compensation")


@pytest.mark.parametrize("given", ["running", "compensating"])
def test_retry_compensation_of_a_saga_in_flight_is_refused(given: str) -> None:
    saga = at("credit")
    if given == "compensating":
        saga.receive(refused(saga.state))
    refused_with(saga, act(OperatorAction.RETRY_COMPENSATION), "only a FAILED saga")


# ---------------------------------------------------------------- resolve


def test_resolve_records_the_actor_the_reason_and_the_action_id() -> None:
    saga = failed_compensating()

    decision = decide(saga, act(OperatorAction.RESOLVE, "INC-9: released by hand"))

    assert decision.events == (SagaResolved(resolved_by="alice",
                                            note="INC-9: released by hand",
                                            action_id=ACTION_ID),)
    assert saga.state.status is SagaStatus.RESOLVED
    refused_with(saga, act(OperatorAction.RESOLVE), "only a FAILED saga can be resolved")


@pytest.mark.parametrize("given", ["running", "compensating"])
def test_resolve_of_a_saga_in_flight_is_refused(given: str) -> None:
    saga = at("credit")
    if given == "compensating":
        saga.receive(refused(saga.state))
    refused_with(saga, act(OperatorAction.RESOLVE), "only a FAILED saga")


# ---------------------------------------------------------------- replay


def test_replaying_the_history_of_every_action_rebuilds_the_state() -> None:
    saga = failed_compensating()
    decide(saga, act(OperatorAction.RETRY_COMPENSATION))
    saga.receive(refused(saga.state, "LEDGER_DOWN", "again"))
    decide(saga, ActOnSaga(OperatorAction.RESOLVE, uuid4(), "bob", "set right"))
    other = waiting_retry()
    decide(other, act(OperatorAction.RETRY_NOW))
    decide(other, ActOnSaga(OperatorAction.RETRY_NOW, uuid4(), "bob", "again"))
    decide(other, ActOnSaga(OperatorAction.CANCEL, uuid4(), "bob", "stop"))
    for history in (saga.events, other.events):
        state = None
        for event in history:
            state = evolve(state, SAGA_EVENT_ADAPTER.validate_json(event.model_dump_json()))
        assert state == state_of(history)
        assert state is not None
        assert type(state).from_json(state.to_json()) == state


# ---------------------------------------------------------------- the console's chart


def test_the_chart_marks_an_action_with_its_actor_and_a_resend_on_its_bar() -> None:
    from orchestrator.console.timeline import layout

    saga = at("credit")
    decide(saga, act(OperatorAction.RETRY_NOW))
    events = [{"recorded_at": (NOW + timedelta(seconds=seq)).isoformat(), "type": e.type,
               "step": getattr(e, "step", None), "attempt": getattr(e, "attempt", None),
               "payload": e.model_dump(mode="json"), "detail": "",
               "actor": "alice" if isinstance(e, (OperatorActed, StepResent)) else "worker"}
              for seq, e in enumerate(saga.events)]

    chart = layout(events, "RUNNING", NOW + timedelta(seconds=60), TRANSFER)

    assert [(m.label, m.actor, m.by_person) for m in chart.markers][-1] == (
        "retry now", "alice", True)
    [credit] = [row for row in chart.rows if row.step == "credit"]
    assert len(credit.bars) == 1 and len(credit.bars[0].resends) == 1


# ---------------------------------------------------------------- a property


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_action_at_any_point_is_refused_unchanged_or_leads_the_saga_to_an_end(
        data: st.DataObject) -> None:
    """Whatever happened before (successes, refusals, retries, timeouts), an action is either
    refused or decided into events that fold, whose commands are what the saga then waits on;
    and a saga answered with successes afterwards ends, with every effect it applied (or may
    have) undone unless it completed or failed."""
    saga = Saga()
    saga.start()
    for _ in range(data.draw(st.integers(0, 12))):
        if saga.state.terminal:
            break
        move = data.draw(st.sampled_from(["ok", "refuse", "retryable", "due"]))
        if move == "due" or saga.state.command_id is None:
            saga.due()
        elif move == "ok":
            saga.receive(ok(saga.state))
        else:
            saga.receive(refused(saga.state, retryable=move == "retryable"))
    action = data.draw(st.sampled_from(list(OperatorAction)))
    before = saga.state
    try:
        decision = decide_action(TRANSFER, before, act(action), LATER)
    except OperatorActionRefused:
        assert saga.state == before
        label(f"{action.value} refused")
        return
    saga.now = max(saga.now, LATER)
    saga._record(decision)
    state = saga.state
    assert decision.events[0].type in ("OperatorActed", "SagaResolved")
    waiting_on = outstanding_commands(TRANSFER, state)
    assert all(command in waiting_on for command in decision.commands)
    for _ in range(40):
        if saga.state.terminal:
            break
        if saga.state.command_id is None:
            saga.due()
        else:
            saga.receive(ok(saga.state))
    end = saga.state
    assert end.terminal
    label(f"{action.value} from {before.status.value}, ended {end.status.value}")
    if end.status is SagaStatus.COMPENSATED:
        assert not [s for s in end.applied if TRANSFER.step(s).compensation is not None]
