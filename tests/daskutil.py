"""`dask scheduler` and `dask worker` processes started by tests (plain or TLS), each in a
working directory of its own when asked (they then share no relative paths with the driver)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], log: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    # own session: teardown signals exactly this process group, nothing else
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                            env=None if env is None else {**os.environ, **env})


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def wait_port(port: int, procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a dask process exited early")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def dask_cluster(tmp: Path, n_workers: int, tls: dict[str, Path] | None = None,
                 env: dict[str, str] | None = None, own_dirs: bool = False,
                 procs_out: list[subprocess.Popen] | None = None):
    """`dask scheduler` + n `dask worker` processes on 127.0.0.1; yields the address.

    With ``own_dirs`` each process runs in an empty directory of its own under ``tmp``;
    ``env`` is added to their environment; ``procs_out`` receives the processes (the
    scheduler first), for tests that kill one."""
    port = free_port()
    proto = "tls" if tls else "tcp"
    tls_args = ["--tls-ca-file", str(tls["ca"]), "--tls-cert", str(tls["cert"]),
                "--tls-key", str(tls["key"])] if tls else []

    def home(name: str) -> Path | None:
        if not own_dirs:
            return None
        d = tmp / name
        d.mkdir()
        return d

    procs: list[subprocess.Popen] = [] if procs_out is None else procs_out
    try:
        procs.append(spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                            "--port", str(port), "--protocol", proto,
                            "--dashboard-address", "127.0.0.1:0", *tls_args],
                           tmp / "scheduler.log", home("scheduler"), env))
        wait_port(port, procs)
        address = f"{proto}://127.0.0.1:{port}"
        for i in range(n_workers):
            procs.append(spawn(["distributed.cli.dask_worker", address, "--host", "127.0.0.1",
                                "--nthreads", "1", "--memory-limit", "2GiB",
                                "--no-dashboard", "--name", f"w{i}", *tls_args],
                               tmp / f"worker{i}.log", home(f"worker{i}"), env))
        yield address
    finally:
        stop(procs)
