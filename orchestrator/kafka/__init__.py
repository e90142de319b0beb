"""The Kafka adapter: topics, the batch consumer with its partition ownership and broker-loss
handling (ADR 0004, ADR 0007), the producer with per-record delivery results, and headers."""

from orchestrator.kafka.consumer import (
    ORCHESTRATOR_GROUP,
    Consumed,
    all_topics,
    consuming_groups,
    decode_headers,
    encode_headers,
    ensure_topics,
    participant_group,
    trim_committed,
)
from orchestrator.kafka.producer import MESSAGE_MAX_BYTES, KafkaProducer, Record

__all__ = [
    "MESSAGE_MAX_BYTES",
    "ORCHESTRATOR_GROUP",
    "Consumed",
    "KafkaProducer",
    "Record",
    "all_topics",
    "consuming_groups",
    "decode_headers",
    "encode_headers",
    "ensure_topics",
    "participant_group",
    "trim_committed",
]
