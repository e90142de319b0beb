"""Chaos tests: workers run as subprocesses and are killed, frozen and restarted, and the
servers under them are restarted; every scenario ends with the invariant checker.

The chaos package shares one embedded stack (PostgreSQL + tansu); every scenario gets its own
database and topic prefix on it (see `harness.World`), so the checker judges one scenario's data.
The scenarios that restart a server (tests/chaos/test_restarts.py) restart this one: the worlds
of the modules before them are closed by then, and those after them only need it running.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import pytest

from orchestrator.dev.embedded import EmbeddedStack
from tests.chaos.harness import SUMMARIES, World, unique

NewWorld = Callable[..., Awaitable[World]]


@pytest.fixture(scope="package")  # stopped after the last chaos test, not left idle after it
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack() as started:
        yield started


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
async def new_world(stack: EmbeddedStack, request: pytest.FixtureRequest
                    ) -> AsyncIterator[NewWorld]:
    """Makes worlds for one test: `await new_world("name", **settings)`. Their workers are
    stopped at the end; their logs kept if the test failed."""
    worlds: list[World] = []

    async def make(name: str, **overrides: Any) -> World:
        world = await World.create(stack, unique(name), **overrides)
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        await world.close(keep_logs=request.node.stash.get(FAILED, False))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The scenarios' figures, in the CI log even when every test passed (output is captured)."""
    if SUMMARIES:
        terminalreporter.section("chaos scenarios")
        for line in SUMMARIES:
            terminalreporter.write_line(line)
