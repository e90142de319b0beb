"""Topics an application adds to the engine's own: each saga type's start topic."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator.errors import BusError
from orchestrator.settings import Settings


def ensure_named_topics(settings: Settings, names: Iterable[str], timeout_s: float = 30.0
                        ) -> None:
    """Create the topics `names` (before `SAGA_TOPIC_PREFIX`) if missing, with the settings'
    partition count. Idempotent; an existing topic is left as it is."""
    wanted = sorted({settings.topic(name) for name in names})
    if not wanted:
        return
    assert settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, settings.topic_partitions, 1) for name in wanted],
        operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout_s)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BusError(f"cannot create topic {name}: {error}") from error
