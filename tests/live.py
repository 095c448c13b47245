"""The real app served in a background thread on a loopback port: for tests, benchmarks and notebooks.

Lives in tests/ (not in the installed package): the tests import it as `tests.live`, the benchmarks too (they
put the repository root on sys.path).

Contract: `LiveServer(config)` builds the app with `create_app(config)`; as a context manager it starts
uvicorn in a daemon thread, returns once the server accepts connections (or raises if it died or took
longer than `start_timeout`), and on exit asks uvicorn to shut down gracefully and joins the thread.
"""

from __future__ import annotations

import threading
import time

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
