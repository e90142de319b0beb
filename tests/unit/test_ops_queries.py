"""The pure parts of the operator queries: how a time, a page and an id prefix are read, what a
search by account asks of each saga type, and how much of a dead letter is shown."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from pydantic import ValidationError

from orchestrator.core.saga import SagaStatus
from orchestrator.core.saga_type import SagaType
from orchestrator.errors import ConfigurationError, SagaDefinitionError
from orchestrator.ops.dlq import Encoded
from orchestrator.ops.queries import (
    SEARCH_LIMIT_MAX,
    SagaFilter,
    _account_clause,
    id_prefix,
    parse_time,
    prefix_range,
)
from steps.saga import TRANSFER, TRANSFER_TYPE

NOW = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(("spelled", "expected"), [
    ("15m", NOW - timedelta(minutes=15)),
    ("2h", NOW - timedelta(hours=2)),
    ("3d", NOW - timedelta(days=3)),
    ("90s", NOW - timedelta(seconds=90)),
    ("1.5H", NOW - timedelta(minutes=90)),
    ("2026-12-05", datetime(2026, 12, 5, tzinfo=UTC)),
    ("2026-12-05T09:30", datetime(2026, 12, 5, 9, 30, tzinfo=UTC)),
    ("2026-12-05T09:30:00Z", datetime(2026, 12, 5, 9, 30, tzinfo=UTC)),
    ("2026-12-05T10:30:00+01:00", datetime(2026, 12, 5, 9, 30, tzinfo=UTC)),
])
def test_a_time_is_iso_8601_in_utc_unless_offset_or_an_age(spelled: str,
                                                          expected: datetime) -> None:
    assert parse_time(spelled, NOW) == expected


@pytest.mark.parametrize("spelled", ["yesterday", "", "15 minutes", "-2h", "2026-13-01"])
def test_a_time_that_is_neither_is_refused_saying_what_is_taken(spelled: str) -> None:
    with pytest.raises(ValueError, match="is not a time: give ISO 8601"):
        parse_time(spelled, NOW)


def test_a_filter_takes_a_status_in_any_case() -> None:
    assert SagaFilter(status="compensated").status is SagaStatus.COMPENSATED  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "field"), [
    ({"limit": 0}, "limit"), ({"limit": -1}, "limit"), ({"limit": SEARCH_LIMIT_MAX + 1}, "limit"),
    ({"offset": -1}, "offset"), ({"status": "PAUSED"}, "status"),
    ({"definition_version": 0}, "definition_version"), ({"account": ""}, "account"),
    ({"since": datetime(2026, 12, 5)}, "since"),  # no time zone: which 09:00?
    ({"bogus": 1}, "bogus"),
])
def test_a_filter_refuses_bad_values_before_any_query(changes: dict[str, Any],
                                                      field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        SagaFilter(**changes)

    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_a_filter_refuses_an_empty_time_range() -> None:
    with pytest.raises(ValidationError, match=r"since .* must be before until"):
        SagaFilter(since=NOW, until=NOW)


def test_an_id_prefix_is_hex_in_any_case_with_dashes_anywhere() -> None:
    assert id_prefix("ABCDEF01-12") == "abcdef0112"
    assert id_prefix("not-hex!") is None
    assert id_prefix("a" * 33) is None
    assert prefix_range("abcdef01") == (UUID("abcdef01-0000-0000-0000-000000000000"),
                                        UUID("abcdef01-ffff-ffff-ffff-ffffffffffff"))


def test_a_search_by_account_asks_each_type_its_own_fields_as_parameters() -> None:
    params: dict[str, Any] = {}

    clause = _account_clause(SagaFilter(account="acct-1"), {"transfer": TRANSFER_TYPE}, params)

    assert clause == (
        "((saga_type = :account_type_0 AND :account IN ("
        "state #>> CAST(:account_path_0_0 AS text[]), "
        "state #>> CAST(:account_path_0_1 AS text[]))))")
    assert params == {"account": "acct-1", "account_type_0": "transfer",
                      "account_path_0_0": ["input", "source_account"],
                      "account_path_0_1": ["input", "destination_account"]}


def test_a_search_by_account_of_a_type_without_account_fields_is_refused() -> None:
    silent = replace(TRANSFER_TYPE, account_fields=())

    with pytest.raises(ConfigurationError, match="'transfer' declares no account fields"):
        _account_clause(SagaFilter(account="a", saga_type="transfer"), {"transfer": silent}, {})


def test_a_saga_type_refuses_account_fields_its_start_message_lacks() -> None:
    with pytest.raises(SagaDefinitionError, match=r"not fields of it: \['source'\]"):
        SagaType(name="transfer", definitions=(TRANSFER,),
                 start_model=TRANSFER_TYPE.start_model, start_topic="t.v1",
                 business_key=TRANSFER_TYPE.business_key, account_fields=("source",))


def test_a_shown_payload_is_cut_to_its_limit_and_says_so() -> None:
    text = "é".encode() * 10  # 20 bytes of UTF-8

    whole = Encoded.of(text)
    cut = Encoded.of(text, limit=7)  # inside the fourth "é"
    binary = Encoded.of(b"\xff" * 10, limit=6)

    assert (whole.value, whole.truncated, whole.size_bytes) == ("é" * 10, False, 20)
    assert (cut.value, cut.truncated, cut.size_bytes, cut.encoding) == ("ééé", True, 20, "utf-8")
    assert (binary.value, binary.truncated, binary.encoding) == ("////////", True, "base64")
    assert Encoded.of(b"short", limit=7) == Encoded("short", "utf-8", 5, False)


def test_a_tz_aware_time_in_another_zone_is_the_same_instant() -> None:
    east = datetime(2026, 12, 5, 11, 0, tzinfo=timezone(timedelta(hours=1)))

    assert SagaFilter(since=east).since == NOW
