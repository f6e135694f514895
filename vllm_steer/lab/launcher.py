"""``vllm-steer serve`` as a child process, for the benchmarks, the soak and the tests: on a
free local port, in its own process group (so stopping it stops its engine and workers too),
returned once ``/health`` answers. The child is ``python -m vllm_steer.cli serve`` with this
interpreter, so it works from an installed package as from a checkout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: Sequence[str], log: Path, *, port: int | None = None,
                 timeout: float = 900, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``vllm-steer serve ARGS --host 127.0.0.1 --port PORT`` (with ``env`` added to this
    process's environment); returns (process, url). Raises with the end of the server's log
    when it exits or ``timeout`` passes first."""
    port = port or free_port()
    command = [sys.executable, "-m", "vllm_steer.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=None if env is None else {**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                stop_server(process)
                raise RuntimeError(f"the server did not start; its log:\n{log.read_text()[-5000:]}") from None
            time.sleep(1)


def stop_server(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the process group (its engine and workers too, even when the ``serve``
    process itself has ended); SIGKILL when it has not ended within ``timeout``."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
