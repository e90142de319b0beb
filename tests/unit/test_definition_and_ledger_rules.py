"""The saga definition's construction rules, and the ledger's pure rules (`decide_entry`)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import steps
from orchestrator.core.definition import Backoff, Parallel, SagaDefinition, Step
from orchestrator.errors import SagaDefinitionError, SagaError
from orchestrator.participant import StepResult
from orchestrator.redact import mask_account
from orchestrator.settings import Settings
from schemas import Direction, Outcome, StepCommand
from steps.ledger import LEDGER, AccountView, Entry, after, clearing_account, decide_entry
from steps.notify import NOTIFY
from steps.registry import Action, ledger, notify, risk
from steps.saga import DEFINITIONS, SAGAS, TRANSFER

# Deterministic (a fixed seed per test) and without an example database: unit tests do no I/O.
PROPERTY = settings(deadline=None, database=None, derandomize=True)

# ---------------------------------------------------------------- definition rules

SIDE_EFFECT = Action("test", "apply")
UNDO = Action("test", "undo")
LOOK = Action("test", "look")


def test_the_transfer_saga_is_valid_and_ordered() -> None:
    assert [s.name for s in TRANSFER.all_steps] == [
        "screen", "reserve", "credit", "settle", "notify"]
    # screening and the hold run at the same time; then one step after the other
    assert [[s.name for s in stage] for stage in TRANSFER.stages] == [
        ["screen", "reserve"], ["credit"], ["settle"], ["notify"]]
    assert [s.name for s in TRANSFER.all_steps if s.pivot] == ["settle"]
    assert {s.name: s.compensation for s in TRANSFER.all_steps} == {
        "screen": None, "reserve": ledger.RELEASE, "credit": ledger.REVERSE_CREDIT,
        "settle": None, "notify": None}
    assert TRANSFER.step("credit") is TRANSFER.all_steps[2] is TRANSFER.steps[1]
    assert TRANSFER.index_of("settle") == 3


def test_duplicate_step_names_are_refused() -> None:
    with pytest.raises(SagaDefinitionError, match="repeats a step name"):
        SagaDefinition("bad", (Step("a", LOOK, None, has_effect=False),
                               Step("a", LOOK, None, has_effect=False)))


def test_an_effect_before_the_pivot_needs_a_compensation() -> None:
    with pytest.raises(SagaDefinitionError, match="'apply' has an effect before the pivot"):
        SagaDefinition("bad", (Step("apply", SIDE_EFFECT, None),
                               Step("pivot", SIDE_EFFECT, None, pivot=True)))


def test_without_a_pivot_every_effect_needs_a_compensation() -> None:
    with pytest.raises(SagaDefinitionError, match="no compensation"):
        SagaDefinition("bad", (Step("apply", SIDE_EFFECT, None),))


def test_the_pivot_must_not_have_a_compensation() -> None:
    with pytest.raises(SagaDefinitionError, match="'pivot' is the pivot"):
        SagaDefinition("bad", (Step("pivot", SIDE_EFFECT, UNDO, pivot=True),))


@pytest.mark.parametrize("step", [
    Step("after", SIDE_EFFECT, UNDO),  # after the pivot: can never run backwards
    Step("look", LOOK, UNDO, has_effect=False),  # nothing to undo
])
def test_a_compensation_that_could_never_run_is_refused(step: Step) -> None:
    with pytest.raises(SagaDefinitionError, match="must not have a compensation"):
        SagaDefinition("bad", (Step("pivot", SIDE_EFFECT, None, pivot=True), step))


def test_two_pivots_are_refused() -> None:
    with pytest.raises(SagaDefinitionError, match="more than one pivot"):
        SagaDefinition("bad", (Step("one", SIDE_EFFECT, None, pivot=True),
                               Step("two", SIDE_EFFECT, None, pivot=True)))


@pytest.mark.parametrize(("attempts", "timeout_s"), [(0, 10.0), (-1, 10.0), (1, 0.0)])
def test_a_step_needs_attempts_and_time(attempts: int, timeout_s: float) -> None:
    with pytest.raises(SagaDefinitionError, match="attempts >= 1, timeout > 0"):
        SagaDefinition("bad", (Step("look", LOOK, None, has_effect=False,
                                    max_attempts=attempts, timeout_s=timeout_s),))


@pytest.mark.parametrize("backoff", [
    Backoff(initial_s=-0.1),
    Backoff(multiplier=0.5),  # a shrinking wait
    Backoff(jitter=-0.1),
    Backoff(jitter=1.5),  # would wait a negative time
    Backoff(max_s=-1.0),  # every retry's not_before would lie in the past
], ids=["negative_initial", "shrinking", "negative_jitter", "jitter_over_1", "negative_cap"])
def test_a_bad_backoff_is_refused(backoff: Backoff) -> None:
    with pytest.raises(SagaDefinitionError, match="'look' needs a backoff with initial_s >= 0"):
        SagaDefinition("bad", (Step("look", LOOK, None, has_effect=False, backoff=backoff),))


@pytest.mark.parametrize("backoff", [
    Backoff(initial_s=0.0),  # retry at once
    Backoff(multiplier=1.0),  # a constant wait
    Backoff(jitter=0.0),
    Backoff(jitter=1.0),
], ids=["no_wait", "constant", "no_jitter", "full_jitter"])
def test_the_edges_of_a_valid_backoff_are_accepted(backoff: Backoff) -> None:
    definition = SagaDefinition("ok", (Step("look", LOOK, None, has_effect=False,
                                            backoff=backoff),))

    assert definition.step("look").backoff == backoff


def test_a_saga_needs_steps() -> None:
    with pytest.raises(SagaDefinitionError, match="no steps"):
        SagaDefinition("bad", ())


def test_definition_errors_are_saga_errors_and_not_retryable() -> None:
    assert issubclass(SagaDefinitionError, SagaError)
    assert SagaDefinitionError.retryable is False


def test_effects_after_the_pivot_need_no_compensation() -> None:
    definition = SagaDefinition("ok", (
        Step("apply", SIDE_EFFECT, UNDO),
        Step("pivot", SIDE_EFFECT, None, pivot=True),
        Step("after", SIDE_EFFECT, None),
    ))
    assert definition.index_of("after") == 2


# ---------------------------------------------------------------- parallel groups


def look(name: str) -> Step:
    return Step(name, LOOK, None, has_effect=False)


def apply(name: str) -> Step:
    return Step(name, SIDE_EFFECT, UNDO)


def test_a_parallel_group_is_one_stage_and_its_members_are_steps_of_the_saga() -> None:
    definition = SagaDefinition("ok", (
        look("first"),
        Parallel(apply("left"), look("middle"), apply("right")),
        Step("pivot", SIDE_EFFECT, None, pivot=True),
        Parallel(look("tell_a"), look("tell_b")),
    ))

    assert [[s.name for s in stage] for stage in definition.stages] == [
        ["first"], ["left", "middle", "right"], ["pivot"], ["tell_a", "tell_b"]]
    assert [s.name for s in definition.all_steps] == [
        "first", "left", "middle", "right", "pivot", "tell_a", "tell_b"]
    assert definition.step("right") is definition.stages[1][2]
    assert (definition.index_of("right"), definition.stage_of("right")) == (3, 1)
    assert (definition.index_of("tell_b"), definition.stage_of("tell_b")) == (6, 3)
    assert definition.steps[1] == Parallel(apply("left"), look("middle"), apply("right"))


def test_the_pivot_cannot_be_inside_a_parallel_group() -> None:
    with pytest.raises(SagaDefinitionError,
                       match=r"the pivot 'pivot' cannot be inside a parallel group "
                             r"\['left', 'pivot'\]: a sibling could still fail after the pivot"):
        SagaDefinition("bad", (Parallel(apply("left"), Step("pivot", SIDE_EFFECT, None,
                                                             pivot=True)),))


@pytest.mark.parametrize("group", [Parallel(), Parallel(look("alone"))], ids=["empty", "one"])
def test_a_parallel_group_needs_two_steps(group: Parallel) -> None:
    with pytest.raises(SagaDefinitionError, match="a parallel group needs at least two steps"):
        SagaDefinition("bad", (look("first"), group))


def test_a_parallel_group_holds_steps_only() -> None:
    nested = Parallel(look("a"), Parallel(look("b"), look("c")))  # type: ignore[arg-type]
    with pytest.raises(SagaDefinitionError, match="a parallel group holds steps only"):
        SagaDefinition("bad", (nested,))
    with pytest.raises(SagaDefinitionError, match="is neither a Step nor a Parallel group"):
        SagaDefinition("bad", ("screen",))  # type: ignore[arg-type]


def test_step_names_are_unique_across_groups() -> None:
    with pytest.raises(SagaDefinitionError, match="repeats a step name"):
        SagaDefinition("bad", (look("a"), Parallel(look("b"), look("a"))))


def test_members_follow_the_compensation_rules_of_their_place() -> None:
    with pytest.raises(SagaDefinitionError, match="'left' has an effect before the pivot"):
        SagaDefinition("bad", (Parallel(Step("left", SIDE_EFFECT, None), look("right")),
                               Step("pivot", SIDE_EFFECT, None, pivot=True)))
    with pytest.raises(SagaDefinitionError, match="'after' is the pivot, after it"):
        SagaDefinition("bad", (Step("pivot", SIDE_EFFECT, None, pivot=True),
                               Parallel(Step("after", SIDE_EFFECT, UNDO), look("tell"))))


# ---------------------------------------------------------------- backoff

SEED = UUID("0b2a3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d")


def test_the_backoff_grows_exponentially_up_to_its_cap() -> None:
    backoff = Backoff(initial_s=0.5, multiplier=3.0, max_s=10.0, jitter=0.0)

    delays = [backoff.delay_s(attempt, SEED) for attempt in range(1, 7)]

    assert delays == [0.5, 1.5, 4.5, 10.0, 10.0, 10.0]


def test_the_default_backoff() -> None:
    backoff = Backoff(jitter=0.0)

    assert [backoff.delay_s(attempt, SEED) for attempt in range(1, 9)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


# what Backoff(initial_s=1, multiplier=2, max_s=60) waits after each failed attempt, before jitter
_BASE_DELAYS_S = [1, 2, 4, 8, 16, 32, 60, 60, 60]


@PROPERTY
@given(seed=st.uuids(), jitter=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]))
def test_the_jitter_takes_at_most_its_fraction_off(seed: UUID, jitter: float) -> None:
    backoff = Backoff(initial_s=1.0, multiplier=2.0, max_s=60.0, jitter=jitter)

    for attempt, base in enumerate(_BASE_DELAYS_S, start=1):
        delay = backoff.delay_s(attempt, seed)
        assert base * (1 - jitter) <= delay <= base, (attempt, delay)
        assert delay > 0


def test_the_jitter_is_the_same_for_the_same_seed() -> None:
    """The core decides twice on a redelivered message and must get the same retry time."""
    seed = uuid4()

    first = [Backoff().delay_s(attempt, seed) for attempt in range(1, 6)]

    assert first == [Backoff().delay_s(attempt, seed) for attempt in range(1, 6)]


def test_the_jitter_spreads_different_seeds_over_its_range() -> None:
    """Sagas that failed together (a participant outage) do not all retry at the same moment."""
    backoff = Backoff(initial_s=1.0, jitter=0.5)

    delays = [backoff.delay_s(1, UUID(int=n)) for n in range(200)]

    assert len(set(delays)) == len(delays)
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert min(delays) < 0.55 and max(delays) > 0.95
    # both halves of the range get a fair share
    assert 60 <= sum(d < 0.75 for d in delays) <= 140


# ---------------------------------------------------------------- every action has a handler

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def command(action: Action | str, amount: str = "30.00", *, step: str | None = None,
            direction: Direction | None = None) -> StepCommand:
    name = action.name if isinstance(action, Action) else action
    compensating = name in (ledger.RELEASE.name, ledger.REVERSE_CREDIT.name)
    default_step = {"release": "reserve", "reverse_credit": "credit", "send": "notify"}
    return StepCommand(
        command_id=uuid4(), saga_id=uuid4(), saga_type="transfer",
        step=step or default_step.get(name, name), action=name,
        direction=direction or (Direction.COMPENSATE if compensating else Direction.FORWARD),
        attempt=1, deadline_at=NOW,
        payload={"transfer_id": str(uuid4()), "source_account": "alice",
                 "destination_account": "bob", "amount": amount, "currency": "EUR",
                 "reference": "", "requested_by": "test", "schema_version": 1},
    )


def account(account_id: str = "alice", *, balance: str = "100.00", held: str = "0.00",
            closed: bool = False, currency: str = "EUR", limit: str | None = None,
            settled_today: str = "0.00") -> AccountView:
    return AccountView(account_id, currency, closed, Decimal(balance), Decimal(held),
                       Decimal(limit) if limit is not None else None, Decimal(settled_today))


def _actions_used() -> set[Action]:
    used = set()
    for definition in (d for saga_type in SAGAS for d in saga_type.definitions):
        for step in definition.all_steps:
            used.add(step.action)
            if step.compensation is not None:
                used.add(step.compensation)
    return used


def test_every_action_has_a_handler() -> None:
    """Each participant the application runs has a handler for every action the sagas name for
    it, in its direction, and the ledger's rule accepts each of its actions."""
    used = _actions_used()
    participants = {name: steps.APPLICATION.participant(name, Settings())
                    for name in steps.APPLICATION.participants}
    assert {a.participant for a in used} <= set(participants)
    for name, participant in participants.items():
        assert participant.name == name
    for definition in DEFINITIONS:
        for step in definition.all_steps:
            for action, direction in ((step.action, Direction.FORWARD),
                                      (step.compensation, Direction.COMPENSATE)):
                if action is not None:
                    probe = command(action, step=step.name, direction=direction)
                    assert participants[action.participant].unhandled(probe) is None, action
    for action in sorted(used, key=str):
        if action.participant != "ledger":
            continue
        # an account the rule accepts for every action: open, funded, in the transfer's currency
        entry, result = decide_entry(command(action), account(limit=None))
        assert result.code != "UNKNOWN_ACTION", f"the ledger does not handle {action}"
        assert result.outcome is Outcome.SUCCEEDED and entry is not None, action
    assert {a.name for a in used if a.participant == "ledger"} == {
        "reserve", "release", "credit", "reverse_credit", "settle"}
    assert {str(a) for a in used if a.participant != "ledger"} == {"risk.screen", "notify.send"}


def test_a_participant_routes_only_the_actions_and_directions_it_handles() -> None:
    """A forward action is not its own compensation: the ledger handles `reserve` forward and
    `release` as a compensation, never the other way round, nor an action it does not know."""
    assert LEDGER.unhandled(command(ledger.RESERVE)) is None
    assert LEDGER.unhandled(command(ledger.RELEASE)) is None
    backwards = LEDGER.unhandled(command(ledger.RESERVE, direction=Direction.COMPENSATE))
    assert backwards is not None and "no handler for the compensation 'reserve'" in backwards
    unknown = LEDGER.unhandled(command("teleport"))
    assert unknown is not None and "no handler for the forward action 'teleport'" in unknown
    assert {(str(a), d.value) for a, d in NOTIFY.handled} == {("notify.send", "forward")}


def test_an_unknown_ledger_action_is_refused() -> None:
    entry, result = decide_entry(command("teleport"), account())

    assert entry is None
    assert (result.outcome, result.code) == (Outcome.FAILED, "UNKNOWN_ACTION")


def test_actions_are_named_constants_of_their_participant() -> None:
    assert (risk.SCREEN.participant, notify.SEND.participant) == ("risk", "notify")
    assert str(ledger.REVERSE_CREDIT) == "ledger.reverse_credit"


# ---------------------------------------------------------------- ledger rules


def refusal(result: StepResult) -> str | None:
    assert result.outcome is Outcome.FAILED
    assert result.retryable is False  # a business refusal: trying again cannot change it
    return result.code


def test_reserve_with_enough_available_holds_the_amount() -> None:
    cmd = command(ledger.RESERVE, "30.00")

    entry, result = decide_entry(cmd, account(balance="100.00", held="70.00"))

    assert entry == Entry(step="reserve", direction=Direction.FORWARD, currency="EUR",
                          amount=Decimal("30.00"), hold_account="alice",
                          hold_delta=Decimal("30.00"))
    assert result == StepResult.ok(held="30.00")


def test_reserve_beyond_the_available_funds_is_refused() -> None:
    # 100 on the account but 70.01 already held: 29.99 available
    entry, result = decide_entry(command(ledger.RESERVE, "30.00"),
                                 account(balance="100.00", held="70.01"))

    assert entry is None
    assert refusal(result) == "INSUFFICIENT_FUNDS"
    # The reason names the amount asked for, never the balance (it reaches logs and dead
    # letters: orchestrator.redact).
    assert result.reason is not None and "less than 30.00 available" in result.reason
    assert "29.99" not in result.reason


def test_reserve_on_a_closed_account_is_refused() -> None:
    entry, result = decide_entry(command(ledger.RESERVE), account(closed=True))

    assert entry is None
    assert refusal(result) == "ACCOUNT_CLOSED"


@pytest.mark.parametrize("action", [ledger.RESERVE, ledger.CREDIT, ledger.SETTLE,
                                    ledger.RELEASE, ledger.REVERSE_CREDIT])
def test_an_account_in_another_currency_is_refused(action: Action) -> None:
    entry, result = decide_entry(command(action), account(currency="USD"))

    assert entry is None
    assert refusal(result) == "CURRENCY_MISMATCH"


@pytest.mark.parametrize(("action", "missing"), [(ledger.RESERVE, "alice"),
                                                 (ledger.CREDIT, "bob")])
def test_an_unknown_account_is_refused(action: Action, missing: str) -> None:
    entry, result = decide_entry(command(action), None)

    assert entry is None
    assert refusal(result) == "UNKNOWN_ACCOUNT"
    # Masked: a refusal's reason reaches logs and dead letters (orchestrator.redact).
    assert result.reason == f"account {mask_account(missing)} does not exist"
    assert result.reason is not None and missing not in result.reason


def test_credit_moves_money_from_clearing_to_the_destination() -> None:
    entry, result = decide_entry(command(ledger.CREDIT, "30.00"), account("bob", balance="0"))

    assert entry == Entry(step="credit", direction=Direction.FORWARD, currency="EUR",
                          amount=Decimal("30.00"), debit_account="clearing.EUR",
                          credit_account="bob")
    assert result == StepResult.ok(credited="30.00")


def test_credit_to_a_closed_account_is_refused() -> None:
    entry, result = decide_entry(command(ledger.CREDIT), account("bob", closed=True))

    assert entry is None
    assert refusal(result) == "ACCOUNT_CLOSED"


def test_reverse_credit_takes_the_money_back_to_clearing() -> None:
    entry, result = decide_entry(command(ledger.REVERSE_CREDIT, "30.00"),
                                 account("bob", balance="30.00"))

    assert entry == Entry(step="credit", direction=Direction.COMPENSATE, currency="EUR",
                          amount=Decimal("30.00"), debit_account="bob",
                          credit_account="clearing.EUR")
    assert result == StepResult.ok(reversed="30.00")


def test_reverse_credit_is_refused_once_the_destination_spent_the_money() -> None:
    # bob received 30.00 and has since spent 5.00 of it
    entry, result = decide_entry(command(ledger.REVERSE_CREDIT, "30.00"),
                                 account("bob", balance="25.00"))

    assert entry is None
    assert refusal(result) == "INSUFFICIENT_FUNDS_FOR_REVERSAL"


def test_reverse_credit_counts_holds_as_spent() -> None:
    entry, result = decide_entry(command(ledger.REVERSE_CREDIT, "30.00"),
                                 account("bob", balance="30.00", held="0.01"))

    assert entry is None
    assert refusal(result) == "INSUFFICIENT_FUNDS_FOR_REVERSAL"


def test_release_gives_the_hold_back() -> None:
    entry, result = decide_entry(command(ledger.RELEASE, "30.00"), account(held="30.00"))

    assert entry == Entry(step="reserve", direction=Direction.COMPENSATE, currency="EUR",
                          amount=Decimal("30.00"), hold_account="alice",
                          hold_delta=Decimal("-30.00"))
    assert result == StepResult.ok(released="30.00")


@pytest.mark.parametrize(("settled_today", "limit"), [("0.00", None), ("20.00", "50.00"),
                                                      ("0.00", "30.00")])
def test_settle_within_the_daily_limit_debits_the_source_and_consumes_the_hold(
    settled_today: str, limit: str | None
) -> None:
    entry, result = decide_entry(
        command(ledger.SETTLE, "30.00"),
        account(held="30.00", limit=limit, settled_today=settled_today))

    assert entry == Entry(step="settle", direction=Direction.FORWARD, currency="EUR",
                          amount=Decimal("30.00"), debit_account="alice",
                          credit_account="clearing.EUR", hold_account="alice",
                          hold_delta=Decimal("-30.00"))
    assert result == StepResult.ok(settled="30.00")


def test_settle_over_the_daily_limit_is_refused() -> None:
    entry, result = decide_entry(
        command(ledger.SETTLE, "30.00"),
        account(held="30.00", limit="50.00", settled_today="20.01"))

    assert entry is None
    assert refusal(result) == "DAILY_LIMIT_EXCEEDED"
    # The amount asked for, neither the limit nor what was settled (account data).
    assert result.reason is not None and "30.00 more today" in result.reason
    assert "50.00" not in result.reason and "20.01" not in result.reason


def test_clearing_accounts_are_per_currency() -> None:
    assert clearing_account("EUR") == "clearing.EUR"
    assert clearing_account("JPY") != clearing_account("EUR")


# ---------------------------------------------------------------- after()


def _apply(view: AccountView, action: Action, amount: str) -> AccountView:
    entry, result = decide_entry(command(action, amount), view)
    assert entry is not None, result
    return after(view, entry)


def test_after_reserve_and_settle_move_balance_and_hold() -> None:
    alice = account(balance="100.00", limit="1000.00")

    reserved = _apply(alice, ledger.RESERVE, "30.00")
    assert (reserved.balance, reserved.held, reserved.available) == (
        Decimal("100.00"), Decimal("30.00"), Decimal("70.00"))

    settled = _apply(reserved, ledger.SETTLE, "30.00")
    assert (settled.balance, settled.held, settled.available) == (
        Decimal("70.00"), Decimal("0.00"), Decimal("70.00"))
    assert settled.settled_today == Decimal("30.00")


def test_after_release_restores_the_available_funds() -> None:
    alice = account(balance="100.00")

    released = _apply(_apply(alice, ledger.RESERVE, "30.00"), ledger.RELEASE, "30.00")

    assert released == alice


def test_after_credit_and_reverse_credit_leave_the_destination_as_it_was() -> None:
    bob = account("bob", balance="5.00")

    credited = _apply(bob, ledger.CREDIT, "30.00")
    assert credited.balance == Decimal("35.00") and credited.held == 0

    assert _apply(credited, ledger.REVERSE_CREDIT, "30.00") == bob


def test_after_ignores_entries_for_other_accounts() -> None:
    carol = account("carol", balance="10.00")
    entry, _ = decide_entry(command(ledger.SETTLE, "30.00"), account(held="30.00"))
    assert entry is not None

    assert after(carol, entry) == carol


def test_settlements_accumulate_towards_the_daily_limit() -> None:
    alice = account(balance="100.00", limit="50.00")
    for _ in range(2):
        alice = _apply(_apply(alice, ledger.RESERVE, "25.00"), ledger.SETTLE, "25.00")
    alice = _apply(alice, ledger.RESERVE, "0.01")

    _, result = decide_entry(command(ledger.SETTLE, "0.01"), alice)

    assert alice.settled_today == Decimal("50.00")
    assert refusal(result) == "DAILY_LIMIT_EXCEEDED"


# ---------------------------------------------------------------- properties

_CENTS = st.integers(min_value=1, max_value=20_000).map(lambda c: Decimal(c).scaleb(-2))


@PROPERTY
@given(
    opening=_CENTS,
    limit=st.none() | _CENTS,
    operations=st.lists(st.tuples(st.sampled_from([ledger.RESERVE, ledger.SETTLE,
                                                   ledger.RELEASE]), _CENTS), max_size=40),
)
def test_gated_entries_never_make_available_negative(
    opening: Decimal, limit: Decimal | None, operations: list[tuple[Action, Decimal]]
) -> None:
    """Any sequence of reserve/settle/release commands, each applied only if `decide_entry`
    accepts it: the available funds never go below zero."""
    alice = account(balance=str(opening), limit=str(limit) if limit is not None else None)
    for action, amount in operations:
        entry, result = decide_entry(command(action, str(amount)), alice)
        assert (entry is None) == (result.outcome is Outcome.FAILED)
        if entry is not None:
            alice = after(alice, entry)
        assert alice.available >= 0, (action, amount, alice)


@PROPERTY
@given(
    opening=_CENTS,
    limit=st.none() | _CENTS,
    transfers=st.lists(st.tuples(_CENTS, st.booleans()), max_size=30),
)
def test_transfers_that_follow_the_saga_keep_the_source_whole(
    opening: Decimal, limit: Decimal | None, transfers: list[tuple[Decimal, bool]]
) -> None:
    """Each transfer reserves, then settles (or releases, when it fails elsewhere or settling is
    refused), as the saga orders them: balance and holds stay non-negative and the money that
    left is exactly what was settled."""
    alice = account(balance=str(opening), limit=str(limit) if limit is not None else None)
    settled = Decimal(0)
    for amount, goes_through in transfers:
        entry, _ = decide_entry(command(ledger.RESERVE, str(amount)), alice)
        if entry is None:
            assert amount > alice.available
            continue
        alice = after(alice, entry)
        entry, _ = decide_entry(command(ledger.SETTLE, str(amount)), alice)
        if not goes_through or entry is None:
            entry, _ = decide_entry(command(ledger.RELEASE, str(amount)), alice)
            assert entry is not None
        else:
            settled += amount
        alice = after(alice, entry)
        assert alice.held == 0
        assert alice.balance == alice.available >= 0
    assert alice.balance == opening - settled
    assert alice.settled_today == settled
    assert limit is None or settled <= limit
