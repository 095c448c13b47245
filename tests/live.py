"""The real app served in a background thread on a loopback port: for tests, benchmarks and notebooks.

Lives in tests/ (not in the installed package): the tests import it as `tests.live`, the benchmarks too (they
put the repository root on sys.path).

`spawn_server(env, port)` is the other way: `t2 serve` as a real process (signals, exit codes), configured by
`T2_*` variables; it returns the process once /health answers (or fails the test with the process's output).

Contract: `LiveServer(config)` builds the app with `create_app(config)`; as a context manager it starts
uvicorn in a daemon thread, returns once the server accepts connections (or raises if it died or took
longer than `start_timeout`), and on exit asks uvicorn to shut down gracefully and joins the thread.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from server.config import ServerConfig


class LiveServer:
    def __init__(self, config: ServerConfig, start_timeout: float = 300.0, stop_timeout: float = 60.0):
        import uvicorn

        from server.api.app import create_app
        self.app = create_app(config)
        self.url = f"http://127.0.0.1:{config.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.stop_timeout)

    @property
    def engine(self):
        return self.app.state.engine


def spawn_server(env: dict[str, str], port: int, start_timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`python -m server.cli serve` with `env` (T2_PORT = port); returns (process, url) once /health is 200."""
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env={**env, "T2_PORT": str(port)},
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout     # a cold start on a loaded 2-core machine can take minutes
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start")
        time.sleep(0.2)
