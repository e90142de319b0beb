"""The card top-up example (docs/examples/card_topup) is what the docs say a team writes: an
application of its own that uses only the public surfaces of the kit, the core and the wire
schemas, with its own start message, intake rules and migrations."""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import pytest
from pydantic import ValidationError

import card_topup
from card_topup.messages import CardTopUpRequested, business_key
from orchestrator.application import Application
from orchestrator.postgres.store import MIGRATIONS_DIR
from steps import APPLICATION as TRANSFERS

PACKAGE = Path(card_topup.__file__).parent
# What a participant needs of the engine; the package's __init__ registers the application.
PARTICIPANT_SURFACE = {"orchestrator.participant", "orchestrator.core", "schemas"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_the_example_uses_only_the_public_surfaces(path: Path) -> None:
    ours = {m for m in imported_modules(path)
            if m.split(".")[0] in ("orchestrator", "schemas", "steps")}
    allowed = PARTICIPANT_SURFACE | ({"orchestrator.application"}
                                     if path.name == "__init__.py" else set())
    assert ours <= allowed, f"{path.name} imports {sorted(ours - allowed)}"


def test_the_example_is_an_application_of_its_own() -> None:
    application = card_topup.APPLICATION

    assert isinstance(application, Application)
    assert set(application.saga_types) == {"card_topup"}
    assert application.worker_kinds[-2:] == ("participant:wallet", "participant:cards")
    # Its own tables, by names that no other migration folder uses (migrate refuses twins).
    [folder] = application.migrations
    own = {p.name for p in folder.glob("*.sql")}
    others = {p.name for d in (MIGRATIONS_DIR, *TRANSFERS.migrations) for p in d.glob("*.sql")}
    assert own and not own & others


def request(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {"topup_id": str(uuid4()), "wallet_id": "w-1", "card_id": "c-1",
                               "amount": "10.5", "currency": "EUR", "requested_by": "app"}
    return {**body, **overrides}


def test_a_valid_request_is_money_with_the_currencys_exponent() -> None:
    parsed = CardTopUpRequested.model_validate(request(amount="10.5"))

    assert parsed.amount == Decimal("10.50")
    assert parsed.model_dump(mode="json")["amount"] == "10.50"
    assert business_key(parsed) == str(parsed.topup_id)


@pytest.mark.parametrize(("overrides", "error_type"), [
    ({"amount": 10.5}, "invalid_amount"),          # a JSON number went through a float
    ({"amount": "1e3"}, "invalid_amount"),
    ({"amount": "0.00"}, "invalid_amount"),
    ({"amount": "1.001"}, "invalid_amount"),       # more decimals than EUR has
    ({"currency": "XYZ"}, "unknown_currency"),
    ({"currency": "eur"}, "string_pattern_mismatch"),
    ({"surprise": 1}, "extra_forbidden"),
])
def test_the_intake_rules_refuse_with_the_types_the_intake_maps(
        overrides: dict[str, object], error_type: str) -> None:
    with pytest.raises(ValidationError) as error:
        CardTopUpRequested.model_validate(request(**overrides))

    assert error.value.errors()[0]["type"] == error_type
