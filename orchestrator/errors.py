"""Every error this package raises on purpose derives from `SagaError`.

    SagaError
    ├── ConfigurationError        settings that cannot work (bad URL, missing binary)
    ├── EmbeddedStackError        the embedded PostgreSQL or broker did not start or stop
    ├── SagaDefinitionError       a saga definition that breaks the rules (duplicate step, ...)
    ├── StoreError                the event store refused or failed an operation
    │   ├── ConcurrencyConflict   another writer appended to the saga first (retryable)
    │   └── StoreUnavailable      the database is unreachable or shedding load (retryable)
    ├── BusError                  the Kafka bus failed to deliver or consume (retryable)
    │   └── RecordRefused         the client or broker refused one record for what it is (too
    │       │                     large, invalid): the same bytes are refused again (not retryable)
    │       └── TopicRefused      refused for where it goes (unknown topic or partition, not
    │                             authorized): may heal when the topic is created (retryable)
    ├── InvariantViolation        `saga check` found money or history that is not right
    ├── NotFound                  no saga, dead letter or account with that id
    ├── Conflict                  an action the saga's or dead letter's state does not allow
    │   └── OperatorActionRefused an operator action that does not apply to the saga as it is
    │                             (cancelling past the pivot, resolving a saga not FAILED)
    ├── OutcomeTimeout            the client saw no outcome for its request in time (retryable:
    │                             submitting the same request again is safe)
    ├── NotAuthenticated          the console got no token, or one it cannot trust (HTTP 401)
    ├── NotAllowed                the token's roles do not allow what was asked (HTTP 403)
    └── IssuerUnreachable         the console cannot fetch its issuer's keys (HTTP 503, retryable)

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
    """A delivery or consumption that failed for the transport's sake (a timeout, a lost
    broker): nothing is wrong with the records, send them again."""

    retryable = True


class RecordRefused(BusError):
    """One record refused for good: the same bytes would be refused again. `code` is the
    librdkafka error name (`MSG_SIZE_TOO_LARGE`, `INVALID_RECORD`, ...), for logs and metrics.
    The outbox relay sets such a row aside at once (docs/operations/runbook.md)."""

    retryable = False

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class TopicRefused(RecordRefused):
    """Refused for its destination: the topic or partition does not exist (yet) or may not be
    written. That can heal (the recovery worker re-creates the topics after a broker restart,
    an operator creates a new one), so the relay tries the row again with backoff, up to
    `SAGA_OUTBOX_MAX_ATTEMPTS`, before it sets it aside."""

    retryable = True


class InvariantViolation(SagaError):
    pass


class NotFound(SagaError):
    pass


class Conflict(SagaError):
    """An action that the current state of its saga or dead letter does not allow (a redrive
    of a dead letter that records a FAILED saga, not a message). Nothing was changed."""


class OperatorActionRefused(Conflict):
    """An operator action the saga's state does not allow (cancelling a saga past its pivot,
    retrying now a saga that waits on nothing, resolving a saga that is not FAILED, a second
    resolve) or one without an actor or a reason. The message says why. Nothing was changed;
    the CLI exits 2, the console answers 409."""


class OutcomeTimeout(SagaError):
    retryable = True


class NotAuthenticated(SagaError):
    """A console request without a credential, or with one that is expired, for another
    audience, signed by an unknown key or not signed right. The message says which, and never
    echoes the token."""


class NotAllowed(SagaError):
    """An authenticated console request its roles do not allow (a viewer acting, an operator
    redriving in bulk), or a browser request that failed the cross-site request check."""


class IssuerUnreachable(SagaError):
    """The identity provider's discovery document or key set could not be fetched: nothing is
    wrong with the request, ask again later."""

    retryable = True
