"""The JSON Schemas in docs/schemas are what the models say, and say what upstream must send."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas.export import build_schemas, main, render, write_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
REGENERATE = "run `python -m schemas.export` and commit the result"
SCHEMAS = build_schemas()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_file_is_up_to_date(name: str) -> None:
    path = DOCS / name
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render(SCHEMAS[name]), (
        f"{path} is stale (the models changed): {REGENERATE}")


def test_no_schema_file_is_left_over() -> None:
    orphans = sorted(p.name for p in DOCS.glob("*.json") if p.name not in SCHEMAS)
    assert orphans == [], (
        f"no model produces {orphans}; published names never change, so a renamed message is a "
        f"new version: restore the model, or delete the files and {REGENERATE}")


def test_the_published_messages() -> None:
    assert set(SCHEMAS) == {"transfer_requested.v1.json", "step_command.v1.json",
                            "step_reply.v1.json", "dead_letter.v1.json", "saga_event.v1.json",
                            "saga_outcome.v1.json"}
    for schema in SCHEMAS.values():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_transfer_requested_amount_is_a_string_and_nothing_extra_is_allowed() -> None:
    schema = SCHEMAS["transfer_requested.v1.json"]
    amount = schema["properties"]["amount"]

    assert amount["type"] == "string"
    assert re.fullmatch(amount["pattern"], "10.50")
    assert not re.fullmatch(amount["pattern"], "-10.50")
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"transfer_id", "source_account", "destination_account",
                                       "amount", "currency", "requested_by"}


def test_every_event_and_message_forbids_extra_fields() -> None:
    def objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
        return [schema, *schema.get("$defs", {}).values()]

    models = [obj for schema in SCHEMAS.values() for obj in objects(schema)
              if obj.get("type") == "object"]
    assert len(models) >= 22  # 4 messages, 13 events and 5 outcomes
    assert all(obj.get("additionalProperties") is False for obj in models), [
        obj.get("title") for obj in models if obj.get("additionalProperties") is not False]


def test_the_event_union_is_discriminated_by_type() -> None:
    schema = SCHEMAS["saga_event.v1.json"]

    mapping = schema["discriminator"]["mapping"]
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(mapping) == {"SagaStarted", "SagaRejected", "StepStarted", "StepSucceeded",
                            "StepFailed", "StepCompensated", "CompensationFailed",
                            "StepRetryScheduled", "StepTimedOut",
                            "SagaCompleted", "SagaCompensated", "SagaFailed", "SagaResolved",
                            "OperatorActed", "StepResent"}


def test_the_outcome_union_is_discriminated_by_outcome_and_keyed_for_dedup() -> None:
    schema = SCHEMAS["saga_outcome.v1.json"]

    assert schema["discriminator"]["propertyName"] == "outcome"
    assert set(schema["discriminator"]["mapping"]) == {
        "completed", "compensated", "rejected", "failed", "resolved"}
    for model in schema["$defs"].values():
        if model.get("type") == "object" and "outcome" in model["properties"]:
            assert {"event_id", "saga_id", "saga_type", "business_key"} <= set(
                model["required"]), model["title"]
            assert "const" in model["properties"]["outcome"], model["title"]


def test_files_are_sorted_pretty_json_with_a_trailing_newline(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "out")

    assert sorted(p.name for p in written) == sorted(SCHEMAS)
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n") and not text.endswith("\n\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True,
                                  ensure_ascii=False) + "\n"


def test_check_reports_stale_files_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path)]) == 0
    stale = tmp_path / "step_reply.v1.json"
    stale.write_text("{}\n", encoding="utf-8")
    (tmp_path / "dead_letter.v1.json").unlink()
    capsys.readouterr()

    assert main(["--check", str(tmp_path)]) == 1

    err = capsys.readouterr().err
    assert "step_reply.v1.json" in err and "dead_letter.v1.json" in err
    assert "python -m schemas.export" in err
    assert stale.read_text(encoding="utf-8") == "{}\n"
    assert not (tmp_path / "dead_letter.v1.json").exists()
    assert main([str(tmp_path)]) == 0
    assert main(["--check", str(tmp_path)]) == 0
