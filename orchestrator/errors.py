"""Every error this package raises on purpose derives from `SagaError`.

    SagaError
    ├── ConfigurationError        settings that cannot work (bad URL, missing binary)
    ├── EmbeddedStackError        the embedded PostgreSQL or broker did not start or stop
    ├── SagaDefinitionError       a saga definition that breaks the rules (duplicate step, ...)
    ├── StoreError                the event store refused or failed an operation
    │   ├── ConcurrencyConflict   another writer appended to the saga first (retryable)
    │   └── StoreUnavailable      the database is unreachable or shedding load (retryable)
    ├── BusError                  the Kafka bus failed to deliver or consume (retryable)
    ├── InvariantViolation        `saga check` found money or history that is not right
    └── NotFound                  no saga, dead letter or account with that id

Whether an error is worth retrying is an attribute of its class (`retryable`), never decided by
matching its message.
"""

from __future__ import annotations


class SagaError(Exception):
    """Root of this package's errors."""

    retryable: bool = False


class ConfigurationError(SagaError):
    pass


class EmbeddedStackError(SagaError):
    pass


class SagaDefinitionError(SagaError):
    pass


class StoreError(SagaError):
    pass


class ConcurrencyConflict(StoreError):
    """Two writers raced to append the same `(saga_id, seq)`; the loser re-reads and retries."""

    retryable = True


class StoreUnavailable(StoreError):
    """The connection was lost or refused, the server is shutting down, or it cancelled a
    statement to break a deadlock: nothing is wrong with the batch, try it again later."""

    retryable = True


class BusError(SagaError):
    retryable = True


class InvariantViolation(SagaError):
    pass


class NotFound(SagaError):
    pass
