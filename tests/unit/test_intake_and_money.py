"""Intake classification of raw `transfers.commands.v1` records (the transfer saga type's intake
rules, applied by the generic intake), and money on the wire."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.intake import Unparseable, classify
from orchestrator.core.saga import RejectSaga, StartSaga
from schemas import (
    CURRENCY_EXPONENTS,
    MoneyError,
    RejectionCode,
    TransferRequested,
    format_amount,
    parse_amount,
)
from schemas.money import MAX_AMOUNT, UnknownCurrency
from steps.saga import TRANSFER_TYPE

# Deterministic (a fixed seed per test) and without an example database: unit tests do no I/O.
PROPERTY = settings(deadline=None, database=None, derandomize=True)

TIMESTAMP_MS = 1_740_830_400_000  # 2025-03-01T12:00:00Z


def a_request(**changes: Any) -> dict[str, Any]:
    """A valid request as upstream would publish it; `...` removes a field."""
    document: dict[str, Any] = {
        "schema_version": 1, "transfer_id": str(uuid4()), "source_account": "alice",
        "destination_account": "bob", "amount": "10.50", "currency": "EUR",
        "reference": "rent", "requested_by": "billing",
    }
    for name, value in changes.items():
        if value is ...:
            document.pop(name)
        else:
            document[name] = value
    return document


def classify_value(value: bytes, timestamp_ms: int | None = TIMESTAMP_MS
                   ) -> StartSaga | RejectSaga | Unparseable:
    return classify(TRANSFER_TYPE, value, timestamp_ms)


def classify_document(document: object) -> StartSaga | RejectSaga | Unparseable:
    return classify_value(json.dumps(document).encode())


def rejected(document: dict[str, Any]) -> RejectSaga:
    """Expect: refused, attached to the document's transfer id (the transfer's business key)."""
    result = classify_document(document)
    assert isinstance(result, RejectSaga), result
    assert (result.saga_type, result.business_key) == (
        "transfer", str(UUID(document["transfer_id"])))
    return result


def started(document: dict[str, Any]) -> StartSaga:
    result = classify_document(document)
    assert isinstance(result, StartSaga), result
    assert (result.saga_type, result.business_key) == ("transfer", document["transfer_id"])
    return result


# ---------------------------------------------------------------- unreadable records


@pytest.mark.parametrize("value", [b"{not json", b'{"transfer_id": ', b"   "])
def test_malformed_json_is_refused_without_a_transfer_id(value: bytes) -> None:
    result = classify_value(value)

    assert isinstance(result, Unparseable)
    assert result.code is RejectionCode.MALFORMED_JSON
    assert result.reason.startswith("not valid JSON: ")


@pytest.mark.parametrize(("value", "reason"), [
    (b"", "empty payload (0 bytes): expected a JSON object"),
    (b"\xff\xfe\x00", "not UTF-8 text: byte 0xff at offset 0 of 3 cannot be decoded"
                      " (JSON must be UTF-8)"),
    (b'{"reference": "caf\xe9"}', "not UTF-8 text: byte 0xe9 at offset 18 of 21 cannot be"
                                  " decoded (JSON must be UTF-8)"),
])
def test_an_empty_record_and_bytes_that_are_not_utf8_say_so(value: bytes, reason: str) -> None:
    """Both used to read "not valid JSON: Expecting value: line 1 column 1 (char 0)", which
    sends on-call looking for a syntax error."""
    result = classify_value(value)

    assert result == Unparseable(RejectionCode.MALFORMED_JSON, reason)


def test_a_misspelt_amount_is_named_in_the_reason_quoted() -> None:
    """The reason once read `amount {value!r} is not written as digits`: pydantic's message
    templates know `{name}` only, so a conversion stayed in the text as written."""
    result = rejected(a_request(amount="1e5"))

    assert result.code is RejectionCode.INVALID_AMOUNT
    assert result.reason == ("amount: amount '1e5' is not written as digits with an optional"
                             " decimal point")


@pytest.mark.parametrize("value", [b"[1, 2]", b'"transfer"', b"null", b"42"])
def test_json_that_is_not_an_object_is_a_schema_violation(value: bytes) -> None:
    result = classify_value(value)

    assert isinstance(result, Unparseable)
    assert result.code is RejectionCode.SCHEMA_VIOLATION


def test_a_missing_field_is_refused_with_the_transfer_id() -> None:
    result = rejected(a_request(requested_by=...))

    assert result.code is RejectionCode.SCHEMA_VIOLATION
    assert "requested_by" in result.reason


@pytest.mark.parametrize("transfer_id", [..., "not-a-uuid", 12])
def test_a_request_without_a_usable_transfer_id_cannot_be_attached(transfer_id: Any) -> None:
    result = classify_document(a_request(transfer_id=transfer_id))

    assert isinstance(result, Unparseable)
    assert result.code is RejectionCode.SCHEMA_VIOLATION
    assert "transfer_id" in result.reason


def test_every_problem_is_named_in_the_reason() -> None:
    result = rejected(a_request(requested_by=..., source_account=...))

    assert "requested_by" in result.reason and "source_account" in result.reason


def test_an_extra_field_is_forbidden() -> None:
    result = rejected(a_request(priority="high"))

    assert result.code is RejectionCode.SCHEMA_VIOLATION
    assert "priority" in result.reason


# ---------------------------------------------------------------- money rules


@pytest.mark.parametrize("amount", [10.5, 10, True])
def test_a_json_number_amount_is_refused(amount: object) -> None:
    result = rejected(a_request(amount=amount))

    assert result.code is RejectionCode.INVALID_AMOUNT
    assert "not a number" in result.reason


@pytest.mark.parametrize("amount", ["0", "0.00", "-1.00", "-0.01"])
def test_zero_and_negative_amounts_are_refused(amount: str) -> None:
    result = rejected(a_request(amount=amount))

    assert result.code is RejectionCode.INVALID_AMOUNT
    assert "greater than zero" in result.reason


@pytest.mark.parametrize("amount", ["abc", "", "NaN", "Infinity", "1000000000000.01"])
def test_amounts_that_are_not_money_are_refused(amount: str) -> None:
    assert rejected(a_request(amount=amount)).code is RejectionCode.INVALID_AMOUNT


@pytest.mark.parametrize(
    ("amount", "currency"), [("10.001", "EUR"), ("0.001", "EUR"), ("1.5", "JPY"), ("1.0001", "BHD")]
)
def test_more_decimals_than_the_currency_has_are_refused_not_rounded(
    amount: str, currency: str
) -> None:
    result = rejected(a_request(amount=amount, currency=currency))

    assert result.code is RejectionCode.INVALID_AMOUNT
    assert f"more decimals than {currency} allows" in result.reason


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [("100", "JPY", "100"), ("10.5", "EUR", "10.50"), ("7", "EUR", "7.00"),
     ("1.234", "BHD", "1.234"), ("1000000000000", "EUR", "1000000000000.00")],
)
def test_valid_amounts_are_kept_at_the_currency_exponent(
    amount: str, currency: str, expected: str
) -> None:
    request = started(a_request(amount=amount, currency=currency)).request

    assert request.amount == Decimal(expected)
    assert str(request.amount) == expected  # the exponent, not just the value
    assert request.model_dump(mode="json")["amount"] == expected
    assert json.loads(request.model_dump_json())["amount"] == expected


def test_an_unknown_currency_is_refused() -> None:
    result = rejected(a_request(currency="XYZ"))

    assert result.code is RejectionCode.UNKNOWN_CURRENCY
    assert "XYZ" in result.reason


@pytest.mark.parametrize("currency", ["eur", "Eur", "EURO", "E1R"])
def test_a_currency_not_spelled_as_an_iso_code_is_refused(currency: str) -> None:
    result = rejected(a_request(currency=currency))

    assert result.code is RejectionCode.SCHEMA_VIOLATION
    assert result.reason.startswith("currency:")


def test_source_and_destination_must_differ() -> None:
    result = rejected(a_request(source_account="alice", destination_account="alice"))

    assert result.code is RejectionCode.SAME_ACCOUNT


def test_amount_spellings_outside_the_published_pattern_are_refused() -> None:
    """docs/schemas/transfer_requested.v1.json promises `^[0-9]+(\\.[0-9]+)?$` for amount; a
    producer validating against it and the intake must agree on what a valid amount is."""
    spellings = ["1_000", "\u0661\u0660", "+10", " 10", "10 ", "1E+2", "10.", ".5"]

    accepted = [s for s in spellings
                if isinstance(classify_document(a_request(amount=s)), StartSaga)]

    assert accepted == [], f"intake accepts amounts its published schema refuses: {accepted!r}"


# ---------------------------------------------------------------- a valid request


def test_a_valid_request_starts_a_transfer() -> None:
    document = a_request()

    result = started(document)

    assert result.request == TransferRequested.model_validate(document)
    assert result.request.transfer_id == UUID(document["transfer_id"])
    assert result.requested_at == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert len(result.request_hash) == 64


def test_without_a_kafka_timestamp_the_request_time_is_unknown() -> None:
    result = classify_value(json.dumps(a_request()).encode(), None)

    assert isinstance(result, StartSaga)
    assert result.requested_at is None


def test_the_request_hash_is_stable_and_follows_the_content() -> None:
    document = a_request()
    first = started(document).request_hash

    assert started(document).request_hash == first
    # the same content in another key order and amount spelling is the same request
    respelled = dict(reversed(list({**document, "amount": "10.5"}.items())))
    assert started(respelled).request_hash == first
    # any change of content is another request
    for change in ({"reference": "rent, March"}, {"amount": "10.51"},
                   {"requested_by": "payroll"}, {"destination_account": "carol"}):
        assert started({**document, **change}).request_hash != first, change


def test_the_timestamp_does_not_change_the_request_hash() -> None:
    value = json.dumps(a_request()).encode()
    first, second = classify_value(value), classify_value(value, TIMESTAMP_MS + 60_000)

    assert isinstance(first, StartSaga) and isinstance(second, StartSaga)
    assert first.request_hash == second.request_hash


# ---------------------------------------------------------------- money helpers


@pytest.mark.parametrize(
    ("text", "currency", "expected"),
    [("10.5", "EUR", "10.50"), ("10.50", "EUR", "10.50"), ("100", "JPY", "100"),
     ("0.001", "BHD", "0.001"), ("3", "KWD", "3.000")],
)
def test_parse_amount_quantizes_to_the_exponent(text: str, currency: str, expected: str) -> None:
    amount = parse_amount(text, currency)

    assert isinstance(amount, Decimal)
    assert str(amount) == expected
    assert format_amount(amount, currency) == expected


@pytest.mark.parametrize(
    ("text", "currency", "message"),
    [("1.5", "JPY", "more decimals"), ("0", "EUR", "greater than zero"),
     ("-3", "EUR", "greater than zero"), ("x", "EUR", "not a decimal number"),
     ("NaN", "EUR", "not a finite number"), ("sNaN", "EUR", "not a finite number"),
     ("Infinity", "EUR", "not a finite number"), ("1000000000000.01", "EUR", "exceeds")],
)
def test_parse_amount_refuses(text: str, currency: str, message: str) -> None:
    with pytest.raises(MoneyError, match=message) as refused:
        parse_amount(text, currency)
    assert refused.value.code == "invalid_amount"


def test_an_unknown_currency_is_its_own_kind_of_money_error() -> None:
    with pytest.raises(UnknownCurrency) as refused:
        parse_amount("1.00", "XXX")
    assert refused.value.code == "unknown_currency"
    with pytest.raises(UnknownCurrency):
        format_amount(Decimal("1.00"), "XXX")


def test_format_amount_pads_to_the_exponent() -> None:
    assert format_amount(Decimal("10.5"), "EUR") == "10.50"
    assert format_amount(Decimal("7"), "BHD") == "7.000"
    assert format_amount(Decimal("1E+2"), "JPY") == "100"


def test_decimal_sums_are_exact_where_floats_are_not() -> None:
    # the classic: 0.1 + 0.2 != 0.3 in binary floating point
    total = parse_amount("0.10", "EUR") + parse_amount("0.20", "EUR")

    assert total == parse_amount("0.30", "EUR")
    assert str(total) == "0.30"


@st.composite
def amounts(draw: st.DrawFn) -> tuple[Decimal, str]:
    """A positive amount written with at most its currency's exponent of decimals, built from
    integers (minor units), so no float is involved in making it."""
    currency = draw(st.sampled_from(sorted(CURRENCY_EXPONENTS)))
    exponent = CURRENCY_EXPONENTS[currency]
    minor = draw(st.integers(min_value=1, max_value=int(MAX_AMOUNT.scaleb(exponent))))
    # Write it with fewer decimals when the dropped ones are zeros: "10.5" for 1050 cents.
    decimals = draw(st.integers(min_value=0, max_value=exponent))
    unit = 10 ** (exponent - decimals)
    if minor % unit:
        decimals, unit = exponent, 1
    return Decimal(minor // unit).scaleb(-decimals), currency


@PROPERTY
@given(amounts())
def test_parse_and_format_round_trip_exactly(amount_and_currency: tuple[Decimal, str]) -> None:
    amount, currency = amount_and_currency
    exponent = CURRENCY_EXPONENTS[currency]

    text = format_amount(amount, currency)
    parsed = parse_amount(str(amount), currency)

    assert parsed == amount  # the value, to the last minor unit
    assert parsed.as_tuple().exponent == -exponent  # and written at the currency's exponent
    assert parse_amount(text, currency) == parsed
    assert format_amount(parsed, currency) == text
    assert text == f"{amount:.{exponent}f}"
    assert isinstance(parsed, Decimal) and Decimal(text) == amount


@PROPERTY
@given(amounts())
def test_amounts_travel_as_strings_in_a_request(amount_and_currency: tuple[Decimal, str]) -> None:
    amount, currency = amount_and_currency
    document = a_request(amount=str(amount), currency=currency)

    request = started(document).request
    wire = json.loads(request.model_dump_json())

    assert request.amount == amount
    assert isinstance(wire["amount"], str)
    assert Decimal(wire["amount"]) == amount
    assert TransferRequested.model_validate(wire) == request
