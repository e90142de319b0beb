"""Given/expect tests of the pure decision core, without a broker or a database.

Each test reads: given these events (folded with `fold`), when this message arrives, expect these
events and commands. Expected events are written out in full, so a changed field is a failure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from orchestrator.core import (
    Decision,
    RejectTransfer,
    SagaState,
    SagaStatus,
    StartTransfer,
    Verdict,
    command_id_for,
    decide_reject,
    decide_reply,
    decide_start,
    evolve,
    fold,
    participant_of,
    request_hash,
    saga_id_for_transfer,
)
from orchestrator.sagas import SAGAS, TRANSFER
from schemas import (
    SAGA_EVENT_ADAPTER,
    CompensationFailed,
    Direction,
    Outcome,
    RejectionCode,
    SagaCompensated,
    SagaCompleted,
    SagaEvent,
    SagaFailed,
    SagaRejected,
    SagaStarted,
    StepCommand,
    StepCompensated,
    StepFailed,
    StepReply,
    StepStarted,
    StepSucceeded,
    TransferRequested,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FORWARD_ACTIONS = {"screen": "screen", "reserve": "reserve", "credit": "credit",
                   "settle": "settle", "notify": "send"}
COMPENSATION_ACTIONS = {"reserve": "release", "credit": "reverse_credit"}
PARTICIPANTS = {"screen": "risk", "reserve": "ledger", "credit": "ledger", "settle": "ledger",
                "notify": "notify"}
# Decisions needed to end any saga: every step may use all its attempts, forward and back.
MAX_DECISIONS = sum(
    step.max_attempts * (2 if step.compensation else 1) for step in TRANSFER.steps
)


# ---------------------------------------------------------------- builders


def a_request(**changes: object) -> TransferRequested:
    fields: dict[str, object] = {
        "transfer_id": uuid4(), "source_account": "alice", "destination_account": "bob",
        "amount": "25.10", "currency": "EUR", "reference": "rent", "requested_by": "test",
    }
    fields.update(changes)
    return TransferRequested.model_validate(fields)


def start_of(request: TransferRequested) -> StartTransfer:
    return StartTransfer(request, request_hash(request), NOW)


def state_of(events: Sequence[SagaEvent]) -> SagaState:
    """Given: the state these events fold to."""
    state = fold(events)
    assert state is not None, "a history needs at least one event"
    return state


def reply(
    state: SagaState,
    outcome: Outcome = Outcome.SUCCEEDED,
    *,
    code: str | None = None,
    reason: str | None = None,
    retryable: bool = False,
) -> StepReply:
    """A participant's answer to the command the saga is waiting on."""
    assert state.command_id is not None and state.step is not None and state.direction
    return StepReply(
        reply_id=uuid4(),
        command_id=state.command_id,
        saga_id=state.saga_id,
        step=state.step,
        direction=state.direction,
        attempt=state.attempt,
        participant=PARTICIPANTS[state.step],
        outcome=outcome,
        retryable=retryable,
        code=code,
        reason=reason,
        result={"ok": True} if outcome is Outcome.SUCCEEDED else {},
    )


def ok(state: SagaState) -> StepReply:
    return reply(state)


def refused(state: SagaState, code: str = "REFUSED", reason: str = "no",
            *, retryable: bool = False) -> StepReply:
    return reply(state, Outcome.FAILED, code=code, reason=reason, retryable=retryable)


def expected_start(saga_id: UUID, step: str, direction: Direction, attempt: int,
                   payload: dict[str, object]) -> tuple[StepStarted, StepCommand]:
    """Expect: the event and the command that start one attempt of one step."""
    definition_step = TRANSFER.step(step)
    action = (FORWARD_ACTIONS if direction is Direction.FORWARD else COMPENSATION_ACTIONS)[step]
    command_id = command_id_for(saga_id, step, direction, attempt)
    deadline_at = NOW + timedelta(seconds=definition_step.timeout_s)
    return (
        StepStarted(step=step, action=action, direction=direction, attempt=attempt,
                    command_id=command_id, deadline_at=deadline_at),
        StepCommand(command_id=command_id, saga_id=saga_id, saga_type="transfer", step=step,
                    action=action, direction=direction, attempt=attempt,
                    deadline_at=deadline_at, payload=payload),
    )


@dataclass
class Saga:
    """A saga's history, and the decisions that extended it."""

    events: list[SagaEvent] = field(default_factory=list)

    @property
    def state(self) -> SagaState:
        return state_of(self.events)

    def start(self, request: TransferRequested | None = None) -> Decision:
        decision = decide_start(TRANSFER, None, start_of(request or a_request()), NOW)
        self.events.extend(decision.events)
        return decision

    def receive(self, message: StepReply) -> Decision:
        decision = decide_reply(TRANSFER, self.state, message, NOW)
        self.events.extend(decision.events)
        return decision

    def succeed_until(self, step: str, direction: Direction = Direction.FORWARD) -> Saga:
        """Answer every command with success until `step` is the one outstanding."""
        while (self.state.step, self.state.direction) != (step, direction):
            assert not self.state.terminal, f"saga ended before reaching {step}"
            self.receive(ok(self.state))
        return self


def at(step: str, direction: Direction = Direction.FORWARD) -> Saga:
    saga = Saga()
    saga.start()
    return saga.succeed_until(step, direction)


# ---------------------------------------------------------------- starting


def test_start_records_the_request_and_screens_first() -> None:
    request = a_request()
    message = start_of(request)

    decision = decide_start(TRANSFER, None, message, NOW)

    saga_id = saga_id_for_transfer(request.transfer_id)
    payload = request.model_dump(mode="json")
    started, command = expected_start(saga_id, "screen", Direction.FORWARD, 1, payload)
    assert decision == Decision(
        Verdict.STARTED,
        events=(
            SagaStarted(saga_type="transfer", transfer_id=request.transfer_id, input=payload,
                        request_hash=message.request_hash, requested_at=NOW),
            started,
        ),
        commands=(command,),
    )
    assert payload["amount"] == "25.10"  # money stays a string on its way to the participants


def test_happy_path_runs_each_step_once_in_order_and_completes() -> None:
    request = a_request()
    saga = Saga()
    commands = list(saga.start(request).commands)

    while not saga.state.terminal:
        decision = saga.receive(ok(saga.state))
        assert decision.verdict is Verdict.APPLIED
        commands.extend(decision.commands)

    saga_id = saga_id_for_transfer(request.transfer_id)
    payload = request.model_dump(mode="json")
    assert commands == [expected_start(saga_id, step.name, Direction.FORWARD, 1, payload)[1]
                        for step in TRANSFER.steps]
    assert [c.action for c in commands] == ["screen", "reserve", "credit", "settle", "send"]
    assert [participant_of(TRANSFER, c) for c in commands] == [
        "risk", "ledger", "ledger", "ledger", "notify"]
    assert [type(e).__name__ for e in saga.events] == (
        ["SagaStarted"] + ["StepStarted", "StepSucceeded"] * 5 + ["SagaCompleted"])
    assert saga.events[-1] == SagaCompleted()
    state = saga.state
    assert state.status is SagaStatus.COMPLETED
    assert state.applied == ("screen", "reserve", "credit", "settle", "notify")
    assert state.version == len(saga.events)
    assert state.command_id is None and state.step is None


def test_the_last_success_completes_without_a_command() -> None:
    saga = at("notify")
    notify_ok = ok(saga.state)

    decision = saga.receive(notify_ok)

    assert decision == Decision(Verdict.APPLIED, events=(
        StepSucceeded(step="notify", attempt=1, command_id=notify_ok.command_id,
                      result={"ok": True}),
        SagaCompleted(),
    ))


# ---------------------------------------------------------------- business failures

# failed step -> the compensations expected, in the order they must run
COMPENSATIONS_AFTER_FAILURE = {
    "screen": [],
    "reserve": [],
    "credit": ["reserve"],
    "settle": ["credit", "reserve"],
}


@pytest.mark.parametrize("failed_step", list(COMPENSATIONS_AFTER_FAILURE))
def test_business_failure_compensates_applied_steps_in_reverse_order(failed_step: str) -> None:
    request = a_request()
    saga = Saga()
    saga.start(request)
    saga.succeed_until(failed_step)
    saga_id, payload = saga.state.saga_id, request.model_dump(mode="json")
    failure = refused(saga.state, "DENIED", "not today")

    decision = saga.receive(failure)

    failed = StepFailed(step=failed_step, attempt=1, command_id=failure.command_id,
                        code="DENIED", reason="not today", retryable=False)
    done = SagaCompensated(failed_step=failed_step, reason="DENIED: not today")
    pending = COMPENSATIONS_AFTER_FAILURE[failed_step]
    if not pending:
        assert decision == Decision(Verdict.APPLIED, events=(failed, done))
    else:
        started, command = expected_start(saga_id, pending[0], Direction.COMPENSATE, 1, payload)
        assert decision == Decision(Verdict.APPLIED, events=(failed, started), commands=(command,))
    for index, step in enumerate(pending):
        assert (saga.state.step, saga.state.direction) == (step, Direction.COMPENSATE)
        answer = ok(saga.state)
        decision = saga.receive(answer)
        compensated = StepCompensated(step=step, attempt=1, command_id=answer.command_id)
        if index + 1 < len(pending):
            started, command = expected_start(saga_id, pending[index + 1], Direction.COMPENSATE,
                                              1, payload)
            assert decision == Decision(Verdict.APPLIED, events=(compensated, started),
                                        commands=(command,))
        else:
            assert decision == Decision(Verdict.APPLIED, events=(compensated, done))
    compensations = [e.step for e in saga.events
                     if isinstance(e, StepStarted) and e.direction is Direction.COMPENSATE]
    assert compensations == pending
    state = saga.state
    assert state.status is SagaStatus.COMPENSATED
    # only the effect-free screen may stay "applied": it has nothing to undo
    assert state.applied == (() if failed_step == "screen" else ("screen",))
    assert state.failed_step == failed_step


def test_compensation_commands_name_the_undoing_actions() -> None:
    saga = at("settle")
    actions = []
    decision = saga.receive(refused(saga.state, "DAILY_LIMIT_EXCEEDED"))
    while decision.commands:
        (command,) = decision.commands
        actions.append((command.step, command.direction, command.action,
                        participant_of(TRANSFER, command)))
        decision = saga.receive(ok(saga.state))

    assert actions == [
        ("credit", Direction.COMPENSATE, "reverse_credit", "ledger"),
        ("reserve", Direction.COMPENSATE, "release", "ledger"),
    ]


def test_failure_after_the_pivot_fails_the_saga_for_an_operator() -> None:
    saga = at("notify")
    failure = refused(saga.state, "SMTP_DOWN", "mail relay refused")

    decision = saga.receive(failure)

    assert decision == Decision(
        Verdict.APPLIED,
        events=(
            StepFailed(step="notify", attempt=1, command_id=failure.command_id,
                       code="SMTP_DOWN", reason="mail relay refused", retryable=False),
            SagaFailed(step="notify", reason="failed after the pivot: mail relay refused"),
        ),
        saga_failed=True,
    )
    state = saga.state
    assert state.status is SagaStatus.FAILED
    assert "settle" in state.applied  # the money moved and stays moved


def test_failure_code_defaults_when_the_participant_gives_none() -> None:
    saga = at("reserve")
    bare = reply(saga.state, Outcome.FAILED)

    decision = saga.receive(bare)

    assert decision.events[0] == StepFailed(step="reserve", attempt=1, command_id=bare.command_id,
                                            code="FAILED", reason="", retryable=False)
    assert decision.events[-1] == SagaCompensated(failed_step="reserve", reason="FAILED: ")


# ---------------------------------------------------------------- retries


def test_retryable_failure_with_attempts_left_starts_the_next_attempt() -> None:
    request = a_request()
    saga = Saga()
    saga.start(request)
    saga.succeed_until("reserve")
    first = refused(saga.state, "DB_BUSY", "lock timeout", retryable=True)

    decision = saga.receive(first)

    started, command = expected_start(saga.state.saga_id, "reserve", Direction.FORWARD, 2,
                                      request.model_dump(mode="json"))
    assert decision == Decision(
        Verdict.APPLIED,
        events=(StepFailed(step="reserve", attempt=1, command_id=first.command_id,
                           code="DB_BUSY", reason="lock timeout", retryable=True), started),
        commands=(command,),
    )
    assert command.command_id != first.command_id
    assert (saga.state.attempt, saga.state.command_id) == (2, command.command_id)


def test_retryable_failure_on_the_last_attempt_compensates() -> None:
    saga = at("credit")
    max_attempts = TRANSFER.step("credit").max_attempts
    for attempt in range(1, max_attempts):
        decision = saga.receive(refused(saga.state, "DB_BUSY", retryable=True))
        assert decision.commands[0].attempt == attempt + 1
    last = refused(saga.state, "DB_BUSY", "lock timeout", retryable=True)
    assert last.attempt == max_attempts

    decision = saga.receive(last)

    started, command = expected_start(saga.state.saga_id, "reserve", Direction.COMPENSATE, 1,
                                      saga.state.input)
    assert decision == Decision(
        Verdict.APPLIED,
        events=(StepFailed(step="credit", attempt=max_attempts, command_id=last.command_id,
                           code="DB_BUSY", reason="lock timeout", retryable=True), started),
        commands=(command,),
    )


def test_retryable_compensation_failure_is_retried() -> None:
    saga = at("settle")
    saga.receive(refused(saga.state, "DAILY_LIMIT_EXCEEDED"))
    first = refused(saga.state, "DB_BUSY", "lock timeout", retryable=True)

    decision = saga.receive(first)

    started, command = expected_start(saga.state.saga_id, "credit", Direction.COMPENSATE, 2,
                                      saga.state.input)
    assert decision == Decision(
        Verdict.APPLIED,
        events=(CompensationFailed(step="credit", attempt=1, command_id=first.command_id,
                                   code="DB_BUSY", reason="lock timeout", retryable=True),
                started),
        commands=(command,),
    )


def test_compensation_failing_for_good_fails_the_saga() -> None:
    saga = at("settle")
    saga.receive(refused(saga.state, "DAILY_LIMIT_EXCEEDED", "over the limit"))
    assert (saga.state.step, saga.state.direction) == ("credit", Direction.COMPENSATE)
    failure = refused(saga.state, "INSUFFICIENT_FUNDS_FOR_REVERSAL", "bob spent it")

    decision = saga.receive(failure)

    assert decision == Decision(
        Verdict.APPLIED,
        events=(
            CompensationFailed(step="credit", attempt=1, command_id=failure.command_id,
                               code="INSUFFICIENT_FUNDS_FOR_REVERSAL", reason="bob spent it",
                               retryable=False),
            SagaFailed(step="credit",
                       reason="compensation failed: INSUFFICIENT_FUNDS_FOR_REVERSAL: bob spent it"),
        ),
        saga_failed=True,
    )
    state = saga.state
    assert state.status is SagaStatus.FAILED
    # nothing after the failed compensation ran: the hold on the source is still there
    assert state.applied == ("screen", "reserve", "credit")


def test_retry_budget_counts_the_sagas_attempts_not_the_replys() -> None:
    """The reply is matched by command id; its `attempt` field is the participant's word.

    A participant that echoes a wrong attempt (here 1 on the last attempt) must not buy the step
    more attempts, nor make the core reissue a command id it already used."""
    saga = at("reserve")
    for _ in range(TRANSFER.step("reserve").max_attempts - 1):
        saga.receive(refused(saga.state, "DB_BUSY", retryable=True))
    used = {e.command_id for e in saga.events if isinstance(e, StepStarted)}
    lying = refused(saga.state, "DB_BUSY", retryable=True).model_copy(update={"attempt": 1})

    decision = saga.receive(lying)

    assert not any(c.command_id in used for c in decision.commands)
    assert saga.state.status is SagaStatus.COMPENSATED


# ---------------------------------------------------------------- duplicates and late replies


def test_the_same_reply_twice_is_stale_the_second_time() -> None:
    saga = at("reserve")
    answer = ok(saga.state)
    first = saga.receive(answer)
    assert first.verdict is Verdict.APPLIED and first.events

    second = saga.receive(answer)

    assert second == Decision(Verdict.STALE)


def test_a_late_reply_for_a_superseded_attempt_is_stale() -> None:
    saga = at("reserve")
    attempt_1 = saga.state
    saga.receive(refused(attempt_1, "DB_BUSY", retryable=True))
    assert saga.state.attempt == 2
    before = saga.state

    decision = saga.receive(ok(attempt_1))  # attempt 1 answering "succeeded" after all

    assert decision == Decision(Verdict.STALE)
    assert saga.state == before


def test_a_reply_to_a_finished_saga_is_stale() -> None:
    saga = at("screen")
    last_command = saga.state
    saga.receive(refused(last_command, "DENIED"))
    assert saga.state.terminal

    assert saga.receive(ok(last_command)) == Decision(Verdict.STALE)


def test_a_reply_for_an_unknown_saga_is_rejected() -> None:
    orphan = reply(at("screen").state)

    decision = decide_reply(TRANSFER, None, orphan, NOW)

    assert decision.verdict is Verdict.UNKNOWN_SAGA
    assert (decision.events, decision.commands, decision.saga_failed) == ((), (), False)
    assert decision.rejection is not None
    code, reason = decision.rejection
    assert code is RejectionCode.UNKNOWN_SAGA
    assert str(orphan.saga_id) in reason


def test_the_same_request_twice_is_a_harmless_duplicate() -> None:
    request = a_request()
    saga = Saga()
    saga.start(request)

    decision = decide_start(TRANSFER, saga.state, start_of(request), NOW)

    assert decision == Decision(Verdict.DUPLICATE)


def test_the_same_transfer_id_with_another_payload_is_a_conflict() -> None:
    request = a_request()
    saga = Saga()
    saga.start(request)
    changed = a_request(transfer_id=request.transfer_id, amount="2510.00")

    decision = decide_start(TRANSFER, saga.state, start_of(changed), NOW)

    assert decision.verdict is Verdict.CONFLICT
    assert (decision.events, decision.commands) == ((), ())
    assert decision.rejection is not None
    assert decision.rejection[0] is RejectionCode.CONFLICTING_DUPLICATE
    assert str(request.transfer_id) in decision.rejection[1]


# ---------------------------------------------------------------- rejections at intake


def test_reject_on_a_fresh_id_records_a_rejected_saga() -> None:
    transfer_id = uuid4()
    message = RejectTransfer(transfer_id, RejectionCode.UNKNOWN_CURRENCY, "XYZ is no currency")

    decision = decide_reject(None, message)

    assert decision == Decision(
        Verdict.REJECTED,
        events=(SagaRejected(transfer_id=transfer_id, reason_code=RejectionCode.UNKNOWN_CURRENCY,
                             reason="XYZ is no currency"),),
        rejection=(RejectionCode.UNKNOWN_CURRENCY, "XYZ is no currency"),
    )
    state = state_of(decision.events)
    assert state.status is SagaStatus.REJECTED and state.terminal
    assert state.saga_id == saga_id_for_transfer(transfer_id)
    assert state.failure == "UNKNOWN_CURRENCY: XYZ is no currency"


def test_reject_on_an_existing_saga_records_nothing() -> None:
    request = a_request()
    saga = Saga()
    saga.start(request)
    message = RejectTransfer(request.transfer_id, RejectionCode.SCHEMA_VIOLATION, "bad")

    decision = decide_reject(saga.state, message)

    assert decision == Decision(Verdict.REJECTED,
                                rejection=(RejectionCode.SCHEMA_VIOLATION, "bad"))


def test_a_rejected_transfer_id_cannot_be_reused() -> None:
    request = a_request()
    rejected = decide_reject(
        None, RejectTransfer(request.transfer_id, RejectionCode.INVALID_AMOUNT, "0.001"))

    decision = decide_start(TRANSFER, state_of(rejected.events), start_of(request), NOW)

    assert decision.verdict is Verdict.CONFLICT
    assert decision.events == ()


# ---------------------------------------------------------------- determinism and state


def test_deciding_twice_on_the_same_input_gives_the_same_decision() -> None:
    message = start_of(a_request())
    assert decide_start(TRANSFER, None, message, NOW) == decide_start(TRANSFER, None, message, NOW)

    saga = at("settle")
    failure = refused(saga.state, "DAILY_LIMIT_EXCEEDED")
    state = saga.state
    first = decide_reply(TRANSFER, state, failure, NOW)
    second = decide_reply(TRANSFER, state, failure, NOW)
    assert first == second
    assert first.commands and first.commands[0].command_id == second.commands[0].command_id


def test_the_saga_id_is_derived_from_the_transfer_id() -> None:
    transfer_id = uuid4()
    assert saga_id_for_transfer(transfer_id) == saga_id_for_transfer(transfer_id)
    assert saga_id_for_transfer(transfer_id) != saga_id_for_transfer(uuid4())
    assert saga_id_for_transfer(transfer_id) != transfer_id


def _assert_json_round_trip(state: SagaState) -> None:
    # through real JSON text, as the `sagas` table caches it
    assert SagaState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_state_json_round_trip_at_every_point_of_a_saga() -> None:
    saga = at("settle")
    saga.receive(refused(saga.state, "DAILY_LIMIT_EXCEEDED"))
    saga.receive(refused(saga.state, "DB_BUSY", retryable=True))
    while not saga.state.terminal:
        saga.receive(ok(saga.state))
    rejected = decide_reject(None, RejectTransfer(uuid4(), RejectionCode.SAME_ACCOUNT, "a->a"))

    histories = [saga.events[:n] for n in range(1, len(saga.events) + 1)]
    histories.append(list(rejected.events))
    for history in histories:
        _assert_json_round_trip(state_of(history))
    assert saga.state.status is SagaStatus.COMPENSATED


def test_a_history_cannot_begin_with_a_step_event() -> None:
    with pytest.raises(ValueError, match="cannot start a saga's history"):
        fold([SagaCompleted()])


def test_the_transfer_saga_is_registered_by_name() -> None:
    assert SAGAS == {"transfer": TRANSFER}


# ---------------------------------------------------------------- properties

_OUTCOMES = st.sampled_from(["succeed", "refuse", "retry"])
# Deterministic (a fixed seed per test) and without an example database: unit tests do no I/O.
PROPERTY = settings(deadline=None, database=None, derandomize=True)


@dataclass
class Run:
    saga: Saga
    decisions: int
    forward_succeeded: list[str]
    compensations: list[str]
    states: list[SagaState]  # after each decision
    lengths: list[int]  # how many events the history had then


def _drive(data: st.DataObject) -> Run:
    """Run one saga to its end, each participant answering as Hypothesis draws."""
    saga = Saga()
    decision = saga.start()
    # evolved event by event, as the worker does, never re-folded from the start
    current: SagaState | None = None
    for fact in decision.events:
        current = evolve(current, fact)
    assert current is not None
    states, lengths = [current], [len(saga.events)]
    forward_succeeded: list[str] = []
    compensations: list[str] = []
    command_ids: set[UUID] = set()
    decisions = 0
    while not saga.state.terminal:
        assert decisions < MAX_DECISIONS + 1, f"no end after {decisions} replies"
        assert len(decision.commands) == 1, "a running saga always waits on one command"
        (command,) = decision.commands
        assert command.command_id not in command_ids, "a command id was reissued"
        command_ids.add(command.command_id)
        if command.direction is Direction.COMPENSATE and command.attempt == 1:
            compensations.append(command.step)
        state = saga.state
        outcome = data.draw(_OUTCOMES, label=f"{state.step}/{state.direction}#{state.attempt}")
        answer = (ok(state) if outcome == "succeed"
                  else refused(state, "X", retryable=outcome == "retry"))
        decision = saga.receive(answer)
        assert decision == decide_reply(TRANSFER, state, answer, NOW), "not deterministic"
        for fact in decision.events:
            current = evolve(current, fact)
        assert decision.verdict is Verdict.APPLIED and decision.events
        if outcome == "succeed" and state.direction is Direction.FORWARD:
            forward_succeeded.append(state.step or "")
        decisions += 1
        states.append(current)
        lengths.append(len(saga.events))
    assert decision.commands == ()
    return Run(saga, decisions, forward_succeeded, compensations, states, lengths)


@settings(PROPERTY, max_examples=300)
@given(st.data())
def test_any_run_ends_and_compensates_exactly_what_was_applied(data: st.DataObject) -> None:
    run = _drive(data)
    state = run.saga.state
    undo = [s for s in reversed(run.forward_succeeded) if TRANSFER.step(s).compensation]

    event(f"{state.status.value} after {state.failed_step or 'no failure'}")
    assert run.decisions <= MAX_DECISIONS
    assert state.status in {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED}
    assert run.forward_succeeded == [s.name for s in TRANSFER.steps][:len(run.forward_succeeded)]
    if state.status is SagaStatus.COMPLETED:
        assert run.forward_succeeded == [s.name for s in TRANSFER.steps]
        assert run.compensations == []
    elif state.status is SagaStatus.COMPENSATED:
        assert "settle" not in run.forward_succeeded
        assert run.compensations == undo
        assert not any(TRANSFER.step(s).compensation for s in state.applied)
    else:
        final = run.saga.events[-1]
        assert isinstance(final, SagaFailed)
        if "settle" in run.forward_succeeded:  # failed after the pivot: nothing undone
            assert run.compensations == []
            assert final.step == "notify"
        else:  # a compensation failed for good: the ones before it ran, none after
            assert run.compensations == undo[:len(run.compensations)]
            assert final.step == run.compensations[-1]
    # a finished saga ignores any further reply
    last = run.states[-2]
    assert decide_reply(TRANSFER, state, ok(last), NOW) == Decision(Verdict.STALE)


@settings(PROPERTY, max_examples=200)
@given(st.data())
def test_replaying_the_events_rebuilds_the_state(data: st.DataObject) -> None:
    run = _drive(data)
    events = run.saga.events

    # the state evolved decision by decision equals the fold of all events, also after the
    # events went through their JSON form in the event store
    incremental = run.states[-1]
    assert fold(events) == incremental
    stored = [SAGA_EVENT_ADAPTER.validate_json(SAGA_EVENT_ADAPTER.dump_json(e)) for e in events]
    assert stored == events
    assert fold(stored) == incremental
    assert incremental.version == len(events)
    for state, length in zip(run.states, run.lengths, strict=True):
        assert fold(events[:length]) == state
        _assert_json_round_trip(state)
