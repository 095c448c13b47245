"""Admission for an engine that batches by itself and mixes adaptations in one batch (vLLM).

There is nothing left to group: vLLM's own scheduler batches requests of any adaptations together (each
token carries its slot, server/engines/vllm_layers.py). What stays:
1. a bound: at most `limit` requests in the engine (running + queued inside vLLM); beyond, Overloaded (429);
2. per adaptation key, the requests inside (the unload of an expert waits for those of its keys, `drain`);
3. `close`: after shutdown every new request is refused.
Event-loop only: not thread-safe by design.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

from server.errors import Overloaded


class InFlight:
    def __init__(self, limit: int):
        self.limit = limit
        self.running: Counter[str] = Counter()   # adaptation key → requests inside
        self._changed = asyncio.Event()
        self._closed: BaseException | None = None

    @property
    def total(self) -> int:
        return sum(self.running.values())

    @contextmanager
    def admitted(self, key: str) -> Iterator[None]:
        if self._closed is not None:
            raise self._closed
        if self.total >= self.limit:
            raise Overloaded(f"the engine holds {self.limit} requests already; retry later")
        self.running[key] += 1
        try:
            yield
        finally:
            self.running[key] -= 1
            if not self.running[key]:
                del self.running[key]
            self._changed.set()

    async def drain(self, which: Callable[[str], bool], timeout_s: float) -> list[str]:
        """Wait until no request of a key with `which(key)` is inside, at most `timeout_s`; the keys left."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [k for k in self.running if which(k)]
            rest = deadline - time.monotonic()
            if not left or rest <= 0:
                return left
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), rest)
            except asyncio.TimeoutError:
                pass

    def close(self, exc: BaseException) -> None:
        self._closed = exc
