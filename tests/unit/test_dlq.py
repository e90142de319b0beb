"""The pure parts of `saga dlq`: the headers a redrive republishes, id prefixes, readable bytes,
and the commands and output its operations page shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from orchestrator.cli import build_parser
from orchestrator.consuming.handling import REDRIVE_HEADER, message_id_of
from orchestrator.errors import NotFound
from orchestrator.kafka.consumer import Consumed
from orchestrator.ops.dlq import Encoded, RedriveResult, prefix_bounds, redrive_headers

DEAD_LETTER_ID = UUID("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b")


def test_redrive_keeps_the_original_headers_in_order_and_appends_its_own() -> None:
    original = [("traceparent", b"00-abc-01"), ("message-id", b"m-1"), ("type", b"\xff\x00")]

    headers = redrive_headers(original, DEAD_LETTER_ID, "alice")

    assert headers == (("traceparent", b"00-abc-01"), ("message-id", b"m-1"),
                       ("type", b"\xff\x00"), (REDRIVE_HEADER, str(DEAD_LETTER_ID).encode()),
                       ("saga-redriven-by", b"alice"))


def test_redrive_strips_dlq_headers_and_an_earlier_redrive_whatever_their_case() -> None:
    earlier = uuid4()
    original = [
        ("dlq-reason-code", b"MALFORMED_JSON"), ("traceparent", b"t"), ("DLQ-Reason", b"x"),
        (REDRIVE_HEADER, str(earlier).encode()), ("Saga-Redrive-Id", b"older"),
        ("saga-redriven-by", b"bob"), ("dlqueue", b"not a dlq- header, kept"),
    ]

    headers = redrive_headers(original, DEAD_LETTER_ID, "alice")

    assert headers == (("traceparent", b"t"), ("dlqueue", b"not a dlq- header, kept"),
                       (REDRIVE_HEADER, str(DEAD_LETTER_ID).encode()),
                       ("saga-redriven-by", b"alice"))


def test_a_stale_redrive_id_left_in_front_would_make_the_copy_a_duplicate() -> None:
    # Why stripping matters: the worker reads the first `saga-redrive-id`, and its inbox id of
    # an intake record is the payload plus that header.
    payload = b'{"transfer_id": "not valid anyway"'
    first_redrive = redrive_headers([], uuid4(), "alice")
    second_redrive = redrive_headers(first_redrive, DEAD_LETTER_ID, "alice")

    def inbox_id(headers: tuple[tuple[str, bytes], ...]) -> str:
        return message_id_of(Consumed("transfers.commands.v1", 0, 7, None, payload, headers,
                                      None))

    appended_only = (*first_redrive, (REDRIVE_HEADER, str(DEAD_LETTER_ID).encode()))
    assert inbox_id(appended_only) == inbox_id(first_redrive)
    assert len({inbox_id(()), inbox_id(first_redrive), inbox_id(second_redrive)}) == 3


def test_a_full_id_is_itself_with_or_without_hyphens_and_in_any_case() -> None:
    assert prefix_bounds(str(DEAD_LETTER_ID).upper()) == DEAD_LETTER_ID
    assert prefix_bounds(DEAD_LETTER_ID.hex) == DEAD_LETTER_ID


def test_a_prefix_is_the_range_of_ids_it_can_stand_for() -> None:
    assert prefix_bounds("6f1c2a3b-4d") == (UUID("6f1c2a3b-4d00-0000-0000-000000000000"),
                                             UUID("6f1c2a3b-4dff-ffff-ffff-ffffffffffff"))


@pytest.mark.parametrize("wanted", ["", "6f1", "not-hex!", "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b0"])
def test_what_cannot_name_a_dead_letter_is_not_found(wanted: str) -> None:
    with pytest.raises(NotFound, match="dead letter id"):
        prefix_bounds(wanted)


def test_bytes_are_shown_as_text_when_utf8_else_as_base64() -> None:
    assert Encoded.of("naïve".encode()) == Encoded("naïve", "utf-8", 6)
    assert Encoded.of(b"\xff\xfe") == Encoded("//4=", "base64", 2)


DLQ_PAGE = Path(__file__).resolve().parents[2] / "docs" / "operations" / "dlq.md"


def _documented_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DLQ_PAGE.read_text(), re.DOTALL)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith("saga dlq")]


def test_the_page_documents_every_dlq_command() -> None:
    assert {shlex.split(c)[2] for c in _documented_commands()} == {"list", "show", "redrive"}


@pytest.mark.parametrize("command", _documented_commands())
def test_every_documented_command_parses(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command)[1:])

    assert args.command == "dlq"
    assert callable(args.run)


def test_the_documented_redrive_summary_is_what_a_redrive_prints() -> None:
    result = RedriveResult("alice", (uuid4(), uuid4()), (uuid4(),), (), (1, 2))

    assert result.describe() == "redriven 2, already redriven 1 (nothing done), not found 0"
    assert result.describe() in DLQ_PAGE.read_text()
