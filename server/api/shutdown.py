"""The end of the graceful period: every open generation request is ended now, in the OpenAI shape.

Contract: on SIGTERM uvicorn stops accepting connections and waits for the open ones; `t2 serve` calls
`Shutdown.stop()` once `graceful_timeout_s` has passed (server/cli.py). From then on, every wait that a
generation request registered with `cut(timeout)` (its `asyncio.timeout_at` around one step: the whole
non-stream request, or one piece of a stream) fires at once, and `stopping` tells the route that this
timeout is the shutdown, not the request timeout: a stream gets an error event and `[DONE]`, a request
that has not answered yet gets a 503. So every response ends properly before uvicorn's own, later deadline
would cancel the tasks (which cuts streams mid-body and logs CancelledError tracebacks).
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Iterator

from server.errors import EngineUnavailable


def shutting_down() -> EngineUnavailable:
    return EngineUnavailable("the server is shutting down; retry on another replica", code="server_shutdown")


class Shutdown:
    def __init__(self) -> None:
        self.stopping = False
        self._open: set[asyncio.Timeout] = set()

    @contextmanager
    def cut(self, timeout: asyncio.Timeout) -> Iterator[None]:
        """Inside `async with asyncio.timeout_at(...) as timeout`: make that timeout fire at stop()."""
        if self.stopping:
            timeout.reschedule(asyncio.get_running_loop().time())
        self._open.add(timeout)
        try:
            yield
        finally:
            self._open.discard(timeout)

    def stop(self) -> None:
        """End every open request now (call on the event loop)."""
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for t in list(self._open):
            t.reschedule(now)
