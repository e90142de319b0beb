"""Saga types: what the engine needs to run one kind of saga beside others in one deployment.

A `SagaType` registers, all pure values and functions (no I/O):

    name             persisted (events, `sagas.saga_type`, `StepCommand.saga_type`): never rename
    definitions      every version of its definition still deployed; a saga finishes on the
                     version it started on, new sagas start on `current_version` (the highest
                     unless named)
    start_model      the pydantic model of its start message
    start_topic      the topic the start message arrives on (before `SAGA_TOPIC_PREFIX`)
    business_key     the idempotency key of a valid start message: the same key with the same
                     payload is one saga (a duplicate), with another payload it is refused
                     (`CONFLICTING_DUPLICATE`) and the original saga is unchanged
    intake           what it refuses at intake and why (`IntakeRules`)
    describe         optional: a saga's start message (as JSON) in one line, for its timeline
    events_topic     optional: the public topic its outcome events go to (before
                     `SAGA_TOPIC_PREFIX`), keyed by business key; by default its start topic with
                     `commands` made `events` (`transfers.commands.v1` -> `transfers.events.v1`),
                     or `<name>.events.v1`
    account_fields   optional: the fields of its start message that name accounts (dotted paths
                     into the message's JSON, e.g. "source_account"), so that operators can
                     find a saga by account (`saga list --account`, `search_sagas`)

The saga id is `uuid5(namespace, f"{name}:{business_key}")` (`saga_id_for`): one saga per key and
type, fenced by the event table's primary key.

`SagaTypes` holds a deployment's types, checked together (unique names and start topics), and
finds the definition a saga runs on by (type, version). Removing a version that sagas still run on
is refused when a worker starts (`SagaTypes.missing`, used by `orchestrator.workers.runner`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from orchestrator.core.definition import SagaDefinition
from orchestrator.core.saga import RejectSaga, SagaState, StartSaga, request_hash
from orchestrator.errors import ConfigurationError, SagaDefinitionError
from schemas import RejectionCode, default_events_topic

M = TypeVar("M", bound=BaseModel)

# No ':' (the saga id's name is "<type>:<key>") and nothing a topic or a log line would mangle.
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
# A business key is stored as text and is part of the saga id's name: bounded, never empty.
BUSINESS_KEY_MAX = 200


@dataclass(frozen=True)
class Refusal:
    """Why a start message is refused: a persisted code and a reason for the operator. The
    reason may be shown to anyone who reads dead letters: no personal data in it."""

    code: RejectionCode
    reason: str


@dataclass(frozen=True)
class IntakeRules(Generic[M]):
    """What a saga type refuses at intake, and why.

    - a start message that fails its model's validation is refused with the code of its first
      error: by the error's *type* (`codes_by_error_type`, e.g. a `PydanticCustomError` type the
      model raises), else by the field it is about (`codes_by_field`), else `SCHEMA_VIOLATION`.
      Codes come from error types, never from message text;
    - a valid one is then put to each of `checks` in order; the first `Refusal` refuses it;
    - a refused message whose document still names a usable business key (`key_of_refused`)
      becomes a `REJECTED` saga on that key, so the key cannot be reused by a later request;
      one that does not is only dead-lettered.
    """

    codes_by_error_type: Mapping[str, RejectionCode] = field(default_factory=dict)
    codes_by_field: Mapping[str, RejectionCode] = field(default_factory=dict)
    checks: tuple[Callable[[M], Refusal | None], ...] = ()
    key_of_refused: Callable[[object], str | None] = field(default=lambda _document: None)


@dataclass(frozen=True, eq=False)
class SagaType(Generic[M]):
    name: str
    definitions: tuple[SagaDefinition, ...]
    start_model: type[M]
    start_topic: str
    business_key: Callable[[M], str]
    intake: IntakeRules[M] = field(default_factory=IntakeRules)
    current_version: int | None = None
    # Shown to on-call engineers: no personal data beyond what the timeline's payload holds.
    describe: Callable[[Mapping[str, Any]], str] | None = None
    events_topic: str = ""
    account_fields: tuple[str, ...] = ()
    _by_version: dict[int, SagaDefinition] = field(init=False, repr=False)
    _current: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise SagaDefinitionError(
                f"saga type name {self.name!r} must match {_NAME.pattern} (no ':')")
        if not self.definitions:
            raise SagaDefinitionError(f"saga type {self.name!r} has no definition")
        by_version: dict[int, SagaDefinition] = {}
        for definition in self.definitions:
            if definition.name != self.name:
                raise SagaDefinitionError(
                    f"saga type {self.name!r} lists a definition of {definition.name!r}")
            if definition.version in by_version:
                raise SagaDefinitionError(
                    f"saga type {self.name!r} has two definitions of version {definition.version}")
            by_version[definition.version] = definition
        current = self.current_version if self.current_version is not None else max(by_version)
        if current not in by_version:
            raise SagaDefinitionError(
                f"saga type {self.name!r} starts new sagas on version {current}, which it does not"
                f" define (versions: {sorted(by_version)})")
        object.__setattr__(self, "_current", current)
        object.__setattr__(self, "_by_version", by_version)
        if not self.start_topic:
            raise SagaDefinitionError(f"saga type {self.name!r} needs a start topic")
        if not self.events_topic:
            object.__setattr__(self, "events_topic",
                               default_events_topic(self.name, self.start_topic))
        if self.events_topic == self.start_topic:
            raise SagaDefinitionError(
                f"saga type {self.name!r} cannot publish its outcomes on its start topic")
        # A misspelt field would make every search by account of this type find nothing.
        unknown = [path for path in self.account_fields
                   if path.split(".")[0] not in self.start_model.model_fields]
        if isinstance(self.account_fields, str) or unknown:
            raise SagaDefinitionError(
                f"saga type {self.name!r}: account_fields must be a tuple of fields of"
                f" {self.start_model.__name__}; not fields of it: {unknown or self.account_fields}")

    @property
    def current(self) -> SagaDefinition:
        """The definition new sagas start on."""
        return self._by_version[self._current]

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._by_version))

    def definition(self, version: int) -> SagaDefinition:
        if version not in self._by_version:
            raise ConfigurationError(
                f"saga type {self.name!r} has no definition version {version} in this deployment"
                f" (it has {', '.join(f'v{v}' for v in self.versions)})")
        return self._by_version[version]

    def key_of(self, request: M) -> str:
        """The business key of a valid start message, checked: never empty, bounded."""
        key = self.business_key(request)
        if not isinstance(key, str) or not key or len(key) > BUSINESS_KEY_MAX:
            raise ValueError(f"saga type {self.name!r} derived no usable business key: "
                             f"{str(key)[:40]!r}")
        return key

    def start(self, request: M, requested_at: datetime | None = None) -> StartSaga:
        """The start of a saga of this type for a valid start message."""
        return StartSaga(self.name, self.key_of(request), request, request_hash(request),
                         requested_at)

    def reject(self, business_key: str, code: RejectionCode, reason: str,
               request_hash: str | None = None) -> RejectSaga:
        return RejectSaga(self.name, business_key, code, reason, request_hash)


class SagaTypes(Mapping[str, SagaType[Any]]):
    """The saga types of one deployment, by name: no two share a name or a start topic (a start
    message is told apart by the topic it arrives on)."""

    def __init__(self, types: Iterable[SagaType[Any]]) -> None:
        self._types: dict[str, SagaType[Any]] = {}
        topics: dict[str, str] = {}
        for saga_type in types:
            if saga_type.name in self._types:
                raise ConfigurationError(f"two saga types are named {saga_type.name!r}")
            if saga_type.start_topic in topics:
                raise ConfigurationError(
                    f"saga types {topics[saga_type.start_topic]!r} and {saga_type.name!r} both"
                    f" start on {saga_type.start_topic}: each needs a topic of its own")
            if saga_type.events_topic in topics:
                raise ConfigurationError(
                    f"saga type {saga_type.name!r} publishes its outcomes on"
                    f" {saga_type.events_topic}, which saga type"
                    f" {topics[saga_type.events_topic]!r} uses already")
            self._types[saga_type.name] = saga_type
            topics[saga_type.start_topic] = saga_type.name
            topics[saga_type.events_topic] = saga_type.name

    def __getitem__(self, name: str) -> SagaType[Any]:
        return self._types[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)

    def definition(self, saga_type: str, version: int) -> SagaDefinition:
        """The definition a saga of `saga_type` started on `version` runs on."""
        if saga_type not in self._types:
            raise ConfigurationError(
                f"no saga type {saga_type!r} in this deployment (it has"
                f" {', '.join(sorted(self._types)) or 'none'})")
        return self._types[saga_type].definition(version)

    def definition_of(self, state: SagaState) -> SagaDefinition:
        """The definition `state`'s saga runs on: its type's, of the version it started on."""
        if state.definition_version is None:
            raise ConfigurationError(f"saga {state.saga_id} was rejected: it runs no definition")
        return self.definition(state.saga_type, state.definition_version)

    def missing(self, in_flight: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Of the (type, version) pairs sagas in flight run on, those this deployment lacks."""
        return sorted({(name, version) for name, version in in_flight
                       if name not in self._types or version not in self._types[name].versions})


__all__ = ["BUSINESS_KEY_MAX", "IntakeRules", "Refusal", "SagaType", "SagaTypes"]
