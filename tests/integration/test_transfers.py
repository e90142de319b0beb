"""Transfers end to end on the real broker and PostgreSQL, each ending with the invariant
checker."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest

from tests.integration.conftest import DENIED, DeadLetterTap, Harness

pytestmark = pytest.mark.integration


def _types(events: list) -> list[tuple[str, str | None]]:
    return [(e.type, e.step) for e in events]


async def test_happy_path_moves_the_money_once(harness: Harness) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "30.25")
    harness.publish(request)

    saga = await harness.wait_terminal(request["transfer_id"])

    assert saga.status == "COMPLETED"
    assert await harness.balances(source, destination) == {
        source: (Decimal("69.75"), Decimal("0")), destination: (Decimal("30.25"), Decimal("0"))}
    events = await harness.events(saga.saga_id)
    assert [seq for seq, *_ in events] == list(range(1, len(events) + 1))
    assert _types(events)[-1] == ("SagaCompleted", None)
    started = [e.payload["action"] for e in events if e.type == "StepStarted"]
    assert started == ["screen", "reserve", "credit", "settle", "send"]
    assert [(e.step, e.direction) for e in await harness.entries(saga.saga_id)] == [
        ("reserve", "forward"), ("credit", "forward"), ("settle", "forward")]
    await harness.assert_invariants()


async def test_insufficient_funds_compensates_without_moving_money(harness: Harness) -> None:
    source = await harness.open("poor", "10.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "10.01")
    harness.publish(request)

    saga = await harness.wait_terminal(request["transfer_id"])

    assert saga.status == "COMPENSATED"
    assert "INSUFFICIENT_FUNDS" in saga.state["failure"]
    assert await harness.entries(saga.saga_id) == []
    assert await harness.balances(source, destination) == {
        source: (Decimal("10.00"), Decimal("0")), destination: (Decimal("0.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_failure_after_two_effects_compensates_in_reverse_order(harness: Harness) -> None:
    source = await harness.open("limited", "500.00", daily_limit="50.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "75.00")
    harness.publish(request)

    saga = await harness.wait_terminal(request["transfer_id"])

    assert saga.status == "COMPENSATED"
    events = await harness.events(saga.saga_id)
    compensations = [e.payload["action"] for e in events
                     if e.type == "StepStarted" and e.payload["direction"] == "compensate"]
    assert compensations == ["reverse_credit", "release"]
    assert ("StepFailed", "settle") in _types(events)
    assert [(e.step, e.direction) for e in await harness.entries(saga.saga_id)] == [
        ("reserve", "forward"), ("credit", "forward"), ("credit", "compensate"),
        ("reserve", "compensate")]
    assert await harness.balances(source, destination) == {
        source: (Decimal("500.00"), Decimal("0")), destination: (Decimal("0.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_closed_destination_releases_the_hold(harness: Harness) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("closed", "0.00", closed=True)
    request = harness.request(source, destination, "5.00")
    harness.publish(request)

    saga = await harness.wait_terminal(request["transfer_id"])

    assert saga.status == "COMPENSATED"
    assert "ACCOUNT_CLOSED" in saga.state["failure"]
    assert [(e.step, e.direction) for e in await harness.entries(saga.saga_id)] == [
        ("reserve", "forward"), ("reserve", "compensate")]
    assert (await harness.balances(source))[source] == (Decimal("100.00"), Decimal("0"))
    await harness.assert_invariants()


async def test_sanctioned_party_is_refused_at_screening(harness: Harness) -> None:
    source = await harness.open("src", "100.00")
    request = harness.request(source, DENIED, "5.00")
    harness.publish(request)

    saga = await harness.wait_terminal(request["transfer_id"])

    assert saga.status == "COMPENSATED"
    assert "SANCTIONS_HIT" in saga.state["failure"]
    # The hold was placed while the screening ran (they run in parallel), and released.
    assert [(e.step, e.direction) for e in await harness.entries(saga.saga_id)] == [
        ("reserve", "forward"), ("reserve", "compensate")]
    assert (await harness.balances(source))[source] == (Decimal("100.00"), Decimal("0"))
    events = await harness.events(saga.saga_id)
    assert ("StepFailed", "screen") in _types(events)
    assert [e.payload["action"] for e in events if e.type == "StepStarted"] == [
        "screen", "reserve", "release"]
    await harness.assert_invariants()


async def test_duplicate_request_creates_no_second_saga(harness: Harness) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "20.00")
    first = harness.publish(request)
    harness.publish(first, key=request["transfer_id"])  # the same bytes again
    # The same request written differently (key order): a different message, the same transfer.
    reordered = json.dumps(dict(reversed(list(request.items())))).encode()
    harness.publish(reordered, key=request["transfer_id"])

    saga = await harness.wait_terminal(request["transfer_id"])
    # Same key, same partition: once the reordered copy is recorded, the others were before it.
    for _ in range(500):
        async with harness.engine.connect() as conn:
            from sqlalchemy import text

            verdicts = list((await conn.execute(text(
                "SELECT verdict FROM inbox WHERE saga_id = :s AND topic LIKE '%transfers%'"),
                {"s": saga.saga_id})).scalars())
        if "duplicate" in verdicts:
            break
        await asyncio.sleep(0.02)

    assert sorted(verdicts) == ["duplicate", "started"]
    events = await harness.events(saga.saga_id)
    assert [e.type for e in events].count("SagaStarted") == 1
    assert await harness.balances(source, destination) == {
        source: (Decimal("80.00"), Decimal("0")), destination: (Decimal("20.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_conflicting_duplicate_is_refused_and_original_untouched(
        harness: Harness, dlq_tap: DeadLetterTap) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "20.00")
    harness.publish(request)
    original = await harness.wait_terminal(request["transfer_id"])

    conflicting = harness.publish({**request, "amount": "90.00"})
    letter = await harness.wait_dead_letter(conflicting)

    assert letter.reason_code == "CONFLICTING_DUPLICATE"
    assert (letter.saga_type, letter.business_key) == ("transfer", request["transfer_id"])
    after = await harness.saga(request["transfer_id"])
    assert (after.status, after.version, after.state) == (
        original.status, original.version, original.state)
    assert await harness.balances(source, destination) == {
        source: (Decimal("80.00"), Decimal("0")), destination: (Decimal("20.00"), Decimal("0"))}
    await harness.assert_invariants()


BAD_INPUTS = {
    "malformed_json": (lambda h, a, b: b'{"transfer_id": "x", "amount": ', "MALFORMED_JSON"),
    "not_an_object": (lambda h, a, b: b'["a", 1]', "SCHEMA_VIOLATION"),
    "missing_field": (lambda h, a, b: {k: v for k, v in h.request(a, b, "1.00").items()
                                       if k != "requested_by"}, "SCHEMA_VIOLATION"),
    "float_amount": (lambda h, a, b: h.request(a, b, 12.5), "INVALID_AMOUNT"),
    "unknown_currency": (lambda h, a, b: h.request(a, b, "1.00", currency="XTS"),
                         "UNKNOWN_CURRENCY"),
    "zero_amount": (lambda h, a, b: h.request(a, b, "0.00"), "INVALID_AMOUNT"),
    "negative_amount": (lambda h, a, b: h.request(a, b, "-5.00"), "INVALID_AMOUNT"),
    "too_precise": (lambda h, a, b: h.request(a, b, "1.005"), "INVALID_AMOUNT"),
    "too_precise_yen": (lambda h, a, b: h.request(a, b, "10.5", currency="JPY"),
                        "INVALID_AMOUNT"),
    "same_account": (lambda h, a, b: h.request(a, a, "1.00"), "SAME_ACCOUNT"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_is_dead_lettered_and_never_blocks_the_partition(
        harness: Harness, dlq_tap: DeadLetterTap, case: str) -> None:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    build, expected_code = BAD_INPUTS[case]
    body = build(harness, source, destination)
    key = "same-partition-key"
    raw = harness.publish(body, key=key)

    letter = await harness.wait_dead_letter(raw)

    assert letter.reason_code == expected_code
    assert letter.stage == "intake"
    assert letter.reason
    if isinstance(body, dict):
        saga = await harness.saga(body["transfer_id"])
        assert saga.status == "REJECTED"
        assert await harness.entries(saga.saga_id) == []
    # It is on the dead-letter topic too, byte for byte, with the reason in its headers.
    for _ in range(500):
        record = dlq_tap.find(raw)
        if record:
            break
        await asyncio.sleep(0.02)
    assert record is not None, "dead letter never reached the dead-letter topic"
    assert record["headers"]["dlq-reason-code"] == expected_code
    assert record["headers"]["dlq-original-topic"].endswith("transfers.commands.v1")
    # The partition goes on: a good request behind it on the same key completes.
    good = harness.request(source, destination, "1.00")
    harness.publish(good, key=key)
    assert (await harness.wait_terminal(good["transfer_id"])).status == "COMPLETED"
    assert await harness.balances(source, destination) == {
        source: (Decimal("99.00"), Decimal("0")), destination: (Decimal("1.00"), Decimal("0"))}
    await harness.assert_invariants()


async def test_concurrent_transfers_never_overdraw_a_hot_account(harness: Harness) -> None:
    hot = await harness.open("hot", "100.00")
    destinations = [await harness.open(f"d{i}", "0.00") for i in range(5)]
    requests = [harness.request(hot, destinations[i % 5], "10.00") for i in range(30)]
    for request in requests:
        harness.publish(request)

    sagas = [await harness.wait_terminal(r["transfer_id"], timeout_s=60) for r in requests]

    statuses = [s.status for s in sagas]
    assert statuses.count("COMPLETED") == 10
    assert statuses.count("COMPENSATED") == 20
    assert (await harness.balances(hot))[hot] == (Decimal("0.00"), Decimal("0"))
    received = await harness.balances(*destinations)
    assert sum(balance for balance, _ in received.values()) == Decimal("100.00")
    await harness.assert_invariants()
