"""Settings, read from `SAGA_*` environment variables (pydantic-settings).

With neither `SAGA_DATABASE_URL` nor `SAGA_KAFKA_BOOTSTRAP` set, the CLI starts the embedded stack.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://user:pass@host:5432/saga",
    )
    kafka_bootstrap: str | None = Field(default=None, description="host:port[,host:port]")
    topic_prefix: str = Field(
        default="", description="Prepended to every topic name; tests use it to isolate runs"
    )
    topic_partitions: int = 4

    # How long the broker may hold a fetch open when it has no record for it. Apache Kafka
    # answers as soon as a record arrives, so this costs no latency; the embedded noida holds no
    # fetch at all (it answers an empty one at once: ADR 0020); tansu answers only when it
    # expires, so its embedded stack sets 1 ms (ADR 0001, ADR 0007).
    kafka_fetch_wait_ms: int = 500
    # Whether the broker's high watermark tells where a log ends. A consumer whose position is
    # past it reads the partition again from its committed offset (or the start): the log was
    # shortened or re-created under it. tansu reports watermarks below records it serves, so
    # its embedded stack turns this off (ADR 0007).
    kafka_trust_watermarks: bool = True
    # How long a consumer blocks waiting for a first record before polling again (it then takes
    # whatever else is queued at once, up to consume_batch_max); bounds shutdown time when idle.
    consume_poll_s: float = 0.1
    consume_batch_max: int = 500
    kafka_session_timeout_ms: int = 6000
    # How a consumer's librdkafka threads are scheduled beside the worker's own: "lower" (10 nice
    # values below), "idle" (that, and only when no other thread wants the CPU) or "normal".
    # Against a broker that answers empty fetches at once (the embedded noida, whose stack sets
    # "idle") they spin; lowered, the spin takes only CPU the work leaves (ADR 0020).
    kafka_thread_priority: Literal["normal", "lower", "idle"] = "lower"

    # How consumers get their partitions: "lease" (PostgreSQL advisory-lock leases, handed on
    # at once when a worker dies; ADR 0004) or "group" (Kafka consumer-group membership).
    partition_ownership: Literal["lease", "group"] = "lease"
    # A lease is proven alive this often; a worker frozen this long loses its partitions.
    lease_heartbeat_s: float = Field(default=0.5, gt=0)
    lease_timeout_s: float = Field(default=5.0, gt=0)

    db_pool_size: int = 5
    # PostgreSQL ends a session idle inside a transaction this long (a frozen worker's), which
    # releases its row locks instead of blocking every other writer behind them.
    db_idle_in_transaction_timeout_s: float = Field(default=10.0, gt=0)

    # The recovery worker: how often it scans for due sagas, and how many per transaction.
    recovery_poll_s: float = Field(default=0.2, gt=0)
    recovery_batch_max: int = Field(default=200, gt=0)
    # With metrics on: how often the recovery worker samples the database's gauges (sagas in
    # flight, outbox backlog, dead letters pending), and how often each consumer's librdkafka
    # reports its statistics (the consumer lag gauge).
    metrics_sample_s: float = Field(default=15.0, gt=0)

    # After the broker was lost, outbox rows published this long before its last answer are
    # published again: a crashed broker may have lost its last seconds (noida keeps a snapshot
    # a few seconds old) or everything (tansu). Step commands of in-flight sagas are re-sent
    # whatever their age.
    broker_loss_republish_s: float = Field(default=30.0, ge=0)

    relay_batch_max: int = 1000
    relay_idle_poll_s: float = 0.2
    # How old an unpublished outbox row must be before the relay takes it over from the fast path.
    relay_grace_s: float = 0.5
    # How many times the relay tries an outbox row the broker refuses for its topic (unknown,
    # not authorized) before it sets the row aside; a record refused for what it is (too large,
    # invalid) is set aside at its first refusal, since the same bytes are refused again.
    outbox_max_attempts: int = Field(default=5, gt=0)

    # Risk participant's stand-in for a third-party provider.
    risk_latency_ms: float = 0.0
    risk_failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    risk_denied_accounts: list[str] = Field(default_factory=list)

    # Which Kafka-protocol server `saga demo`, `saga dev` and the tests start when no external
    # one is configured (ADR 0007): noida (snapshot persistence) or tansu (memory storage).
    embedded_broker: Literal["noida", "tansu"] = "noida"
    # The embedded broker's logs are trimmed up to what every consumer group committed, so a
    # long-running stack stays bounded (noida rewrites a snapshot of everything it holds).
    kafka_trim_committed: bool = False

    # The console (`saga serve`, docs/operations/console.md): every request carries an OpenID
    # Connect bearer token (or a browser session holding one) that this issuer signed for this
    # audience. Without an issuer `saga serve` refuses to start, unless `--dev`.
    console_oidc_issuer: str | None = None
    console_oidc_audience: str | None = None
    # Where the issuer's signing keys are; by default the `jwks_uri` of its discovery document
    # (<issuer>/.well-known/openid-configuration).
    console_oidc_jwks_url: str | None = None
    # The claim that lists a token's roles: a dotted path for nested claims, e.g.
    # `realm_access.roles` (Keycloak). Its value is a list of names or one name.
    console_roles_claim: str = "roles"
    # Which name in that claim grants which console role (viewer, operator, admin).
    console_role_names: dict[str, str] = Field(default_factory=lambda: {
        "viewer": "saga-viewer", "operator": "saga-operator", "admin": "saga-admin"})
    # Keys are cached this long; a token naming a key not in the cache refreshes it at once,
    # at most once per `console_jwks_min_refresh_s` (so random key ids cannot flood the issuer).
    console_jwks_cache_s: float = Field(default=600.0, gt=0)
    console_jwks_min_refresh_s: float = Field(default=10.0, ge=0)
    console_jwt_leeway_s: float = Field(default=30.0, ge=0)
    console_jwt_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "PS256",
                                                                     "EdDSA"])
    # JSON fields whose values a viewer sees masked to their last four characters (a regular
    # expression matched against each field name of sagas, timelines and dead letters).
    console_masked_fields: str = r"(^|_)(account|account_id|card_id)$"
    # A dead letter's payload is shown up to this size; the whole is a download.
    console_payload_preview_bytes: int = Field(default=16384, gt=0)
    # Browser sessions' cookies carry `Secure` (only over HTTPS); the dev mode turns it off.
    console_cookie_secure: bool = True

    worker_name: str = Field(default="", description="Recorded as the actor of worker events")
    # The application the workers and tools run: `module:attribute` naming an
    # `orchestrator.application.Application` (its saga types and participants).
    application: str = "steps:APPLICATION"

    @property
    def embedded(self) -> bool:
        return self.database_url is None and self.kafka_bootstrap is None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


def worker_name(kind: str, settings: Settings) -> str:
    """A worker's name: `SAGA_WORKER_NAME`, or `kind@host:pid`."""
    return settings.worker_name or f"{kind}@{socket.gethostname()}:{os.getpid()}"
