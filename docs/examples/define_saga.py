"""Define a saga and drive it through the pure decision core, with no broker and no database.

Run it: `python docs/examples/define_saga.py` (tests/unit/test_docs_examples.py runs it too).

The saga here is a small "payout": screen the parties and hold the funds on a wallet at the same
time (a parallel group), send them to a bank (the pivot: a bank transfer cannot be called back),
then notify. It is driven five times: every step succeeds; the bank refuses for good (the hold is
released, the saga is compensated); the screening refuses while the hold is still out (the saga
waits for the hold's answer, then releases it); the bank is briefly unavailable (the step is
retried, after a backoff, as a new attempt); the wallet never answers (the hold is re-sent under
the same command id until the step gives up, and then released, since it may have been placed).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid5

from orchestrator.core.definition import Backoff, Parallel, SagaDefinition, Step
from orchestrator.core.saga import (
    Decision,
    SagaState,
    SagaStatus,
    StartTransfer,
    Verdict,
    decide_due,
    decide_reply,
    decide_start,
    evolve,
    outstanding_commands,
    participant_of,
    request_hash,
)
from orchestrator.errors import SagaDefinitionError
from schemas import Direction, Outcome, StepCommand, StepReply, StepTimedOut, TransferRequested
from steps.registry import Action, notify, risk

# Actions are objects, not strings: a typo in a definition is an import error. Existing ones come
# from steps.registry; a new participant ("wallet", "bank") declares its own. The (participant,
# name) pair is persisted in events and routes the command to `saga.steps.<participant>.v1`.
HOLD = Action("wallet", "hold")
RELEASE = Action("wallet", "release")
SEND = Action("bank", "send")

PAYOUT = SagaDefinition(
    name="payout",
    steps=(
        # Screening and the hold do not depend on each other: both commands go out at once, and
        # `send` starts when both succeeded. If one fails for good, the other is waited for and
        # undone if it applied its effect.
        Parallel(
            Step("screen", action=risk.SCREEN, compensation=None, has_effect=False),
            # An attempt with no reply after timeout_s is re-sent under the same command id (the
            # participant answers a command it already applied with its stored reply). Re-sends
            # and retries spend the same max_attempts (default 3), each member its own.
            Step("hold", action=HOLD, compensation=RELEASE, timeout_s=5),
        ),
        # A retryable failure waits out an exponential backoff before the next attempt: 2 s,
        # then 4 s, 8 s ... up to 60 s, less a jitter of up to half that is derived from the
        # failed command's id, so deciding twice gives the same time while sagas that failed
        # together spread out.
        Step("send", action=SEND, compensation=None, pivot=True, max_attempts=3,
             backoff=Backoff(initial_s=2.0, multiplier=2.0, max_s=60.0, jitter=0.5)),
        Step("notify", action=notify.SEND, compensation=None, has_effect=False),
    ),
)


# ---- the definition's rules are checked when it is built, not when a worker meets it

def refused(steps: tuple[Step | Parallel, ...]) -> str:
    try:
        SagaDefinition(name="broken", steps=steps)
    except SagaDefinitionError as error:
        return str(error)
    raise AssertionError("this definition should have been refused")


no_compensation = refused((Step("hold", action=HOLD, compensation=None),
                           Step("send", action=SEND, compensation=None, pivot=True)))
undo_after_pivot = refused((Step("send", action=SEND, compensation=None, pivot=True),
                            Step("hold", action=HOLD, compensation=RELEASE)))
twice = refused((Step("screen", action=risk.SCREEN, compensation=None, has_effect=False),
                 Step("screen", action=risk.SCREEN, compensation=None, has_effect=False)))
undo_nothing = refused((Step("screen", action=risk.SCREEN, compensation=HOLD, has_effect=False),))
shrinking_wait = refused((Step("screen", action=risk.SCREEN, compensation=None, has_effect=False,
                               backoff=Backoff(multiplier=0.5)),))
pivot_in_group = refused((Parallel(Step("hold", action=HOLD, compensation=RELEASE),
                                   Step("send", action=SEND, compensation=None, pivot=True)),))
for reason in (no_compensation, undo_after_pivot, twice, undo_nothing, shrinking_wait,
               pivot_in_group):
    print("refused:", reason)


# ---- the core: (state, message, now) -> events + commands; the caller folds and records them

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def request(n: int) -> StartTransfer:
    transfer = TransferRequested(
        transfer_id=UUID(int=n), source_account="wallet-7", destination_account="bank-9",
        amount=Decimal("25.00"), currency="EUR", reference=f"payout {n}", requested_by="docs",
    )
    return StartTransfer(transfer, request_hash(transfer), requested_at=NOW)


def reply(command: StepCommand, outcome: Outcome = Outcome.SUCCEEDED, code: str | None = None,
          retryable: bool = False) -> StepReply:
    """What the participant would send back on `saga.replies.v1`."""
    return StepReply(
        reply_id=uuid5(command.command_id, "reply"), command_id=command.command_id,
        saga_id=command.saga_id, step=command.step, direction=command.direction,
        attempt=command.attempt, participant=participant_of(PAYOUT, command), outcome=outcome,
        code=code, reason=code and f"the bank said {code}", retryable=retryable,
    )


def record(state: SagaState | None, decision: Decision, log: list[str]) -> SagaState:
    """What the orchestrator's shell does with a decision, minus the database: fold the events."""
    for event in decision.events:
        state = evolve(state, event)
        step = getattr(event, "step", None)
        undo = getattr(event, "direction", None) is Direction.COMPENSATE
        gave_up = isinstance(event, StepTimedOut) and event.gave_up
        detail = ", compensate" if undo else ", gave up" if gave_up else ""
        log.append(event.type + (f"({step}{detail})" if step else ""))
    assert state is not None
    return state


# (step, direction, attempt) -> (outcome, failure code, retryable), or None for no reply at all;
# unlisted commands succeed.
Answers = dict[tuple[str, str, int], tuple[Outcome, str, bool] | None]


def participant_reply(state: SagaState, answers: Answers) -> StepReply | None:
    """A reply to the first command the saga waits on whose participant answers, if any. While
    the group runs the saga waits on two commands; otherwise on one, or none while a retry waits
    out its backoff."""
    for command in outstanding_commands(PAYOUT, state):
        answer = answers.get((command.step, command.direction.value, command.attempt),
                             (Outcome.SUCCEEDED, "", False))
        if answer is None:
            continue  # the participant stays silent: the command's deadline will pass
        outcome, code, retryable = answer
        return reply(command, outcome, code or None, retryable)
    return None


def run(n: int, answers: Answers) -> tuple[SagaState, list[str], timedelta]:
    """Start one saga and play its participants and the recovery worker until it ends; return
    its final state, its events, and how long it took on the saga's clock."""
    log: list[str] = []
    now = NOW
    decision = decide_start(PAYOUT, None, request(n), now)
    assert decision.verdict is Verdict.STARTED
    state = record(None, decision, log)
    while not state.terminal:
        message = participant_reply(state, answers)
        if message is not None:
            decision = decide_reply(PAYOUT, state, message, now)
            state = record(state, decision, log)
            # The same reply again (a redelivery) changes nothing: the command it answers is done.
            assert decide_reply(PAYOUT, state, message, now).verdict is Verdict.STALE
            continue
        # Nothing to answer. The recovery worker wakes the saga at its `due_at` (a retry's
        # backoff is over, or the command's deadline passed) and starts the retry (a new command
        # id), re-sends the command (the same id, a new deadline) or, with the step's attempts
        # spent, gives up on the step. Before then it leaves the saga alone.
        assert state.due_at is not None and decide_due(PAYOUT, state, now) is None
        now = state.due_at
        due = decide_due(PAYOUT, state, now)
        assert due is not None
        state = record(state, due, log)
    return state, log, now - NOW


happy, happy_log, _ = run(1, {})
print("\ncompleted:  ", " ".join(happy_log))

refused_by_bank, refused_log, _ = run(2, {("send", "forward", 1): (Outcome.FAILED, "IBAN_CLOSED",
                                                                    False)})
print("compensated:", " ".join(refused_log))

denied, denied_log, _ = run(5, {("screen", "forward", 1): (Outcome.FAILED, "SANCTIONS_HIT",
                                                            False)})
print("denied:     ", " ".join(denied_log))

retried, retried_log, retry_took = run(3, {("send", "forward", 1): (Outcome.FAILED, "BANK_DOWN",
                                                                    True)})
print("retried:    ", " ".join(retried_log), f"(after {retry_took.total_seconds():.2f} s)")

silent, silent_log, silence_took = run(4, {("hold", "forward", 1): None})
print("timed out:  ", " ".join(silent_log), f"(after {silence_took.total_seconds():.0f} s)")

# Deciding is deterministic: the same input gives the same events and commands (ids are uuid5),
# which is what makes re-processing a redelivered message after a crash safe.
assert decide_start(PAYOUT, None, request(1), NOW) == decide_start(PAYOUT, None, request(1), NOW)
# A re-sent request for a saga that exists is a duplicate, not a second saga.
assert decide_start(PAYOUT, happy, request(1), NOW).verdict is Verdict.DUPLICATE

assert "no compensation" in no_compensation and "must not have a compensation" in undo_after_pivot
assert "repeats a step name" in twice and "must not have a compensation" in undo_nothing
assert "needs a backoff" in shrinking_wait
assert "cannot be inside a parallel group" in pivot_in_group
assert happy.status is SagaStatus.COMPLETED and happy.applied == ("screen", "hold", "send",
                                                                  "notify")
# Both commands of the group go out together; `send` starts once both succeeded.
assert happy_log == ["SagaStarted", "StepStarted(screen)", "StepStarted(hold)",
                     "StepSucceeded(screen)", "StepSucceeded(hold)", "StepStarted(send)",
                     "StepSucceeded(send)", "StepStarted(notify)", "StepSucceeded(notify)",
                     "SagaCompleted"]
assert refused_by_bank.status is SagaStatus.COMPENSATED
# Only the hold had an effect to undo: the screen has none, the send never happened.
assert refused_log[-4:] == ["StepFailed(send)", "StepStarted(hold, compensate)",
                            "StepCompensated(hold)", "SagaCompensated"]
# The screening refused while the hold was out: the saga waited for the hold's answer (it may
# have been placed: it was), then released it.
assert denied.status is SagaStatus.COMPENSATED and denied.failed_step == "screen"
assert denied_log[3:] == ["StepFailed(screen)", "StepSucceeded(hold)",
                          "StepStarted(hold, compensate)", "StepCompensated(hold)",
                          "SagaCompensated"]
assert retried.status is SagaStatus.COMPLETED and retried.version == len(retried_log)
assert retried_log[6:9] == ["StepFailed(send)", "StepRetryScheduled(send)", "StepStarted(send)"]
# The one wait was the backoff after attempt 1: 2 s, less up to half of it.
assert timedelta(seconds=1) <= retry_took <= timedelta(seconds=2)
# The hold went out three times under one command id (at 0, 5 and 10 s); at 15 s the step gave
# up. It may have been placed, so it is released; the saga never reached the bank.
assert silent.status is SagaStatus.COMPENSATED and silence_took == timedelta(seconds=15)
assert silent_log[3:] == ["StepSucceeded(screen)", "StepTimedOut(hold)", "StepTimedOut(hold)",
                          "StepTimedOut(hold, gave up)", "StepStarted(hold, compensate)",
                          "StepCompensated(hold)", "SagaCompensated"]
