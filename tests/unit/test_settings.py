"""Settings reach worker processes intact, and the embedded stack's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.dev.embedded import EmbeddedStack, settings_for
from orchestrator.dev.processes import settings_env
from orchestrator.settings import Settings


def test_a_child_process_reads_back_exactly_the_parents_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parent = Settings(database_url="postgresql+asyncpg://u@db:5432/saga",
                      kafka_bootstrap="k1:9092,k2:9092", topic_prefix="t.", topic_partitions=1,
                      risk_denied_accounts=["a", "b"], risk_failure_rate=0.25,
                      worker_name="the-parent")
    for key, value in settings_env(parent).items():
        if key.startswith("SAGA_"):
            monkeypatch.setenv(key, value)

    child = Settings()

    assert child.model_dump(exclude={"worker_name"}) == parent.model_dump(
        exclude={"worker_name"})
    assert child.worker_name == ""  # each worker names itself


def test_unset_values_do_not_leak_from_the_parents_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(kafka_bootstrap="k:9092")
    assert settings.database_url is None
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql+asyncpg://stale@old/db")
    env = settings_env(settings)
    assert "SAGA_DATABASE_URL" not in env


def test_settings_for_the_embedded_stack_point_at_it(tmp_path: Path) -> None:
    stack = EmbeddedStack(root=tmp_path)  # not started: only its addresses are read
    assert settings_for(stack, Settings(topic_partitions=8)).topic_partitions == 8
    pointed = settings_for(stack, Settings())
    assert pointed.database_url == stack.postgres.url
    assert pointed.kafka_bootstrap == stack.broker.bootstrap
