"""`saga` commands in real processes, without paying for a fresh interpreter each time.

Each command runs in a process of its own, with its own environment, stdout, stderr and exit
status, entering `orchestrator.cli.main` as the `saga` console script does. The processes are
forked from one server process (multiprocessing's forkserver) that imported the CLI once: a
fresh `python -m orchestrator.cli` spends about half a CPU second importing before it does
anything, which the suite's hundred-odd commands paid on a 2-core CI machine that also runs the
stack and the workers. The server is started by exec (never forked from pytest, whose workers
and Kafka clients run threads) and ends with the test session.

What this does not cover, a fresh interpreter running `python -m orchestrator.cli`, the tests of
`saga dev`, `saga demo` and `saga serve` still do.
"""

from __future__ import annotations

import io
import locale
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import wait
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["orchestrator.cli"])
# Commands run from several threads at once (tests that race two of them). A child's exit
# status is read once from its sentinel, and `Process.start` reads those of every finished
# child: two threads reading one status at once lose it (255). So starts and reads take turns;
# waiting for a child to end (the sentinel readable) does not.
_STATUS_READ = threading.Lock()


def _saga(argv: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """In the forked process: the environment, stdout and stderr a `saga` process would have
    (as `subprocess.run(capture_output=True)` gives it: files, not a terminal), then `main`."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        opened = os.open(path, os.O_WRONLY)
        os.dup2(opened, fd)
        os.close(opened)
    encoding = locale.getpreferredencoding(False)
    # As the interpreter sets them up when stdout and stderr are not a terminal.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                  errors="backslashreplace", line_buffering=True)
    from orchestrator.cli import main

    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def run_saga(args: Sequence[str], env: Mapping[str, str], timeout_s: float = 60
             ) -> subprocess.CompletedProcess[str]:
    """`saga ARGS` in a process of its own; what `subprocess.run(..., capture_output=True,
    text=True, timeout=timeout_s)` returns for it (and raises on its timeout)."""
    with tempfile.TemporaryDirectory(prefix="saga-cli-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        out.touch()
        err.touch()
        process = _CONTEXT.Process(target=_saga, args=(list(args), dict(env), str(out),
                                                       str(err)), name="saga")
        with _STATUS_READ:
            process.start()
        ended = wait([process.sentinel], timeout_s)
        if not ended:
            process.kill()
        with _STATUS_READ:
            process.join()
        if not ended:
            raise subprocess.TimeoutExpired(["saga", *args], timeout_s, out.read_bytes(),
                                            err.read_bytes())
        return subprocess.CompletedProcess(["saga", *args], process.exitcode, out.read_text(),
                                           err.read_text())
