"""The committed OpenAPI document (docs/api/openapi.json) is what the console serves, and says
how every route is protected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.console.openapi import DOCUMENT, build_document, main, render

REGENERATE = "run `python -m orchestrator.console.openapi` and commit the result"


def test_the_committed_document_is_up_to_date() -> None:
    assert DOCUMENT.is_file(), f"{DOCUMENT} is missing: {REGENERATE}"
    assert DOCUMENT.read_text(encoding="utf-8") == render(build_document()), (
        f"{DOCUMENT} is stale (the API changed): {REGENERATE}")


def test_every_api_route_needs_the_bearer_token_and_documents_its_errors() -> None:
    document = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    operations = [(path, method, op) for path, item in document["paths"].items()
                  for method, op in item.items()]

    assert len(operations) >= 10
    for path, method, op in operations:
        assert path.startswith("/api/v1/"), path
        assert op["security"] == [{"bearer": []}], (path, method)
        assert {"401", "403", "422"} <= set(op["responses"]), (path, method)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert not any(path.startswith("/dev") for path in document["paths"])


def test_check_reports_a_stale_document_without_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "openapi.json"
    path.write_text("{}\n", encoding="utf-8")

    assert main(["--check", str(path)]) == 1
    assert "python -m orchestrator.console.openapi" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == "{}\n"
    assert main([str(path)]) == 0
    assert main(["--check", str(path)]) == 0
