"""`saga serve` never opens without a way to authenticate, and the dev mode stays on loopback.
Run as a user runs it: the real command in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.console import Role, dev_token_from_state, require_identity_provider
from orchestrator.errors import ConfigurationError
from orchestrator.settings import Settings

# Nothing listens there: a refusal must come before any connection is tried.
UNREACHABLE_DB = "postgresql+asyncpg://nobody:nothing@127.0.0.1:9/none"


def saga(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          env={**clean, "SAGA_DATABASE_URL": UNREACHABLE_DB, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_serve_without_an_issuer_is_refused_with_what_to_set() -> None:
    result = saga("serve", "--port", "0")

    assert result.returncode == 2, result
    assert "SAGA_CONSOLE_OIDC_ISSUER and SAGA_CONSOLE_OIDC_AUDIENCE" in result.stderr
    assert "saga serve --dev" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_issuer_without_an_audience_is_refused() -> None:
    with pytest.raises(ConfigurationError) as refused:
        require_identity_provider(Settings(console_oidc_issuer="https://id.example",
                                           console_oidc_audience=None), dev=False)

    assert "SAGA_CONSOLE_OIDC_AUDIENCE" in str(refused.value)
    assert "SAGA_CONSOLE_OIDC_ISSUER" not in str(refused.value)


def test_dev_mode_refuses_to_listen_beyond_loopback() -> None:
    result = saga("serve", "--dev", "--host", "0.0.0.0", "--port", "0")

    assert result.returncode == 2, result
    assert "loopback only" in result.stderr


def test_dev_token_without_a_running_dev_console_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="start `saga serve --dev` first"):
        dev_token_from_state(tmp_path / "none.json", Role.OPERATOR)


def test_an_issuer_and_audience_or_the_dev_mode_are_enough() -> None:
    require_identity_provider(Settings(console_oidc_issuer=None), dev=True)
    require_identity_provider(Settings(console_oidc_issuer="https://id.example",
                                       console_oidc_audience="saga"), dev=False)
