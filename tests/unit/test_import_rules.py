"""The import rules of pyproject's `[tool.importlinter]` hold, and the tool really trips on a
broken one: each rule is broken in a copy of the packages and `lint-imports` must fail there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("layers")
    for name in ("orchestrator", "steps", "schemas"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_the_repository_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("orchestrator/core/saga.py", "import sqlalchemy", "The decision core does no I/O"),
    ("orchestrator/core/definition.py", "from orchestrator.settings import Settings",
     "The decision core does no I/O"),
    ("orchestrator/participant/runtime.py", "from orchestrator.workers import relay",
     "The participant kit never imports the workers"),
    ("orchestrator/workers/recovery.py", "import steps",
     "The engine never imports an application"),
    ("orchestrator/postgres/store.py", "from orchestrator.kafka import producer",
     "The engine's layers point down only"),
    ("orchestrator/errors.py", "from orchestrator.core import saga", "The shared leaves"),
    ("orchestrator/ops/dlq.py", "from orchestrator.console import auth",
     "The engine's layers point down only"),
    ("orchestrator/workers/relay.py", "import httpx",
     "Only the console and the composition root speak HTTP"),
    ("schemas/messages.py", "from orchestrator import errors", "The wire schemas are the bottom"),
])
def test_a_broken_rule_fails_the_check(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # the broken rule\n")
    try:
        result = _lint(tree)
    finally:
        path.write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
