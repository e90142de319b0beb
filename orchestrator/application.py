"""The application a deployment of the engine runs: its saga types and its participants.

The engine never imports an application (an import-linter contract in CI keeps it so). An
application builds one `Application` value, and the settings name it as `module:attribute`
(`SAGA_APPLICATION`, by default `steps:APPLICATION`, the transfer application). Workers, tools
and tests load it with `load_application`, or are handed one explicitly.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.saga_type import SagaType, SagaTypes
from orchestrator.errors import ConfigurationError
from orchestrator.participant.runtime import Participant
from orchestrator.settings import Settings

ParticipantFactory = Callable[[Settings], Participant]


@dataclass(frozen=True)
class LedgerViews:
    """SQL the invariant checker runs to see an application's money: one row per account
    (`ACCOUNT_VIEW_SQL` of `steps.ledger` shows the columns it expects) and the balances a
    customer would be shown. An application that moves no money has none."""

    account_view_sql: str
    customer_view_sql: str


@dataclass(frozen=True)
class Application:
    name: str
    # The saga types it runs side by side: each with its versions, start message and topic,
    # business key and intake rules (`orchestrator.core.saga_type`).
    sagas: Sequence[SagaType[Any]]
    participants: Mapping[str, ParticipantFactory]
    # The application's own migrations (its participants' tables), applied after the engine's.
    migrations: tuple[Path, ...] = ()
    ledger: LedgerViews | None = None
    # `saga demo`: runs the application's demonstration with the CLI's arguments; its exit code.
    demo: Callable[[Settings, argparse.Namespace], Awaitable[int]] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    # `sagas` by name, checked together when the application is built (unique names and start
    # topics): what the workers look definitions up in.
    saga_types: SagaTypes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sagas", tuple(self.sagas))
        object.__setattr__(self, "saga_types", SagaTypes(self.sagas))

    def participant(self, name: str, settings: Settings) -> Participant:
        if name not in self.participants:
            raise ConfigurationError(
                f"application {self.name!r} has no participant {name!r};"
                f" known: {', '.join(sorted(self.participants))}")
        return self.participants[name](settings)

    @property
    def worker_kinds(self) -> tuple[str, ...]:
        return ("orchestrator", "relay", "recovery",
                *(f"participant:{name}" for name in self.participants))


def load_application(reference: str) -> Application:
    """The `Application` named `module:attribute`, e.g. `steps:APPLICATION`."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(
            "SAGA_APPLICATION must be module:attribute (e.g. steps:APPLICATION),"
            f" not {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(f"cannot import the application module {module_name!r}: {error}"
                                 ) from error
    application = getattr(module, attribute, None)
    if not isinstance(application, Application):
        raise ConfigurationError(
            f"{reference} is not an orchestrator.application.Application"
            f" (found {type(application).__name__})")
    return application
