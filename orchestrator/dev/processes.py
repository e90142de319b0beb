"""Workers as child processes (`saga worker ...`), for the demo, `saga dev`, benchmarks and
tests that need real process boundaries. Each child's output goes to a log file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.application import load_application
from orchestrator.dev.embedded import die_with_parent
from orchestrator.errors import EmbeddedStackError
from orchestrator.settings import Settings
from orchestrator.workers.runner import workers_ready


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings (every field, so a
    value set in code, not only one read from the environment, reaches the workers)."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude={"worker_name"}).items():
        key = f"SAGA_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            # pydantic-settings reads lists and dicts (the console's role names) as JSON.
            env[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def worker_argv(kind: str) -> list[str]:
    if kind.startswith("participant:"):
        return [sys.executable, "-m", "orchestrator.cli", "worker", "participant",
                kind.split(":", 1)[1]]
    return [sys.executable, "-m", "orchestrator.cli", "worker", kind]


@dataclass
class WorkerProcesses:
    """Worker processes by label: the kind (`orchestrator`, `participant:ledger`, ...), or
    `kind#n` for a further instance of the same kind."""

    settings: Settings
    log_dir: Path
    # Every worker kind of the application the settings name, unless given.
    kinds: tuple[str, ...] = ()
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Unique per start, so readiness means *these* processes, even on a shared database.
    names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kinds:
            self.kinds = load_application(self.settings.application).worker_kinds

    def start(self, kind: str | None = None, env: dict[str, str] | None = None) -> None:
        """Start every kind, or the one labelled `kind`, with `env` added (for example a
        `SAGA_CRASH_AT` for the chaos tests)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = settings_env(self.settings)
        for label in [kind] if kind else list(self.kinds):
            log_path = self.log_path(label)
            self.names[label] = f"{label}#{uuid.uuid4().hex[:8]}"
            with open(log_path, "ab") as log_file:
                self.processes[label] = subprocess.Popen(
                    worker_argv(label.split("#", 1)[0]), stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**base, **(env or {}), "SAGA_WORKER_NAME": self.names[label]},
                    start_new_session=True, preexec_fn=die_with_parent,
                )

    def signal(self, label: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one worker (SIGKILL: no cleanup at all, as a crash)."""
        process = self.processes[label]
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(10)

    def restart(self, label: str, env: dict[str, str] | None = None) -> None:
        """SIGKILL the worker if it still runs, then start it again."""
        self.signal(label, signal.SIGKILL)
        self.start(label, env)

    def alive(self, label: str) -> bool:
        return self.processes[label].poll() is None

    def returncode(self, label: str) -> int | None:
        """None while the worker runs; then its exit status (-N: ended by signal N)."""
        return self.processes[label].poll()

    async def wait_exit(self, label: str, timeout_s: float) -> int | None:
        """Until the worker exits (its `returncode`), or None if it still runs after
        `timeout_s`. Polls, so the event loop stays free meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.returncode(label)
            if code is not None or time.monotonic() >= deadline:
                return code
            await asyncio.sleep(0.05)

    def terminate(self, label: str, timeout_s: float = 15.0) -> None:
        """Stop one worker cleanly (SIGTERM; SIGKILL if it is not gone after `timeout_s`)."""
        self._stop([self.processes[label]], timeout_s)

    async def wait_ready(self, engine: AsyncEngine, timeout_s: float = 90.0,
                         labels: list[str] | None = None) -> None:
        """Until every worker (or those labelled) owns its partitions; a worker that exits
        meanwhile is an error, with the path of its log."""
        wanted = labels if labels is not None else list(self.processes)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for label in wanted:
                process = self.processes[label]
                if process.poll() is not None:
                    raise EmbeddedStackError(
                        f"worker {label} exited with {process.returncode}; see "
                        f"{self.log_path(label)}")
            with contextlib.suppress(Exception):
                if await workers_ready(engine, {self.names[label] for label in wanted}):
                    return
            await asyncio.sleep(0.05)
        raise EmbeddedStackError(f"workers not ready after {timeout_s}s; logs in {self.log_dir}")

    def log_path(self, label: str) -> Path:
        return self.log_dir / f"{label.replace(':', '-').replace('#', '-')}.log"

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop(list(self.processes.values()), timeout_s)

    @staticmethod
    def _stop(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)  # a frozen worker must hear SIGTERM
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(5)
