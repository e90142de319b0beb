"""Every docs example is a runnable file, and runs clean (each ends with its own assertions)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "docs" / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES, "docs/examples/*.py found nothing to run"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = runpy.run_path(str(path), run_name="__main__")
    # run_path returns the module's globals only if the whole file ran; an example's own
    # assertions (or any error) raise out of it and fail this test.
    assert namespace["__name__"] == "__main__"
    assert capsys.readouterr().out, f"{path.name} printed nothing to show its reader"
