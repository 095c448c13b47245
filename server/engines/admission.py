"""The asynchronous admission gate, for engines that batch by themselves (vLLM).

An engine such as vLLM forms its own batches from every request it has been handed, so the invariant has to
be kept one step earlier: at admission. The gate lets a request into the engine only while the weights are
those of its adaptation, and swaps the weights only when no admitted request is left. The policy is the
Scheduler's, read for requests instead of batches:
1. a request of the current adaptation is admitted at once, unless another adaptation has a request that
   has waited `max_wait_s` or more (then it queues, so that the current adaptation drains);
2. when no admitted request is left (drained) and requests wait, the oldest waiting request names the due
   adaptation; the current one keeps the weights if it has waiters and the due one has waited less than
   `max_wait_s`; otherwise the gate swaps to the due adaptation (one swap at a time) and admits all of its
   waiters;
3. requests that arrive during a swap queue (never an error); the queue is bounded (`max_queue`: Overloaded).
So a request waits at most about (adaptations waiting) × (`max_wait_s` + the longest admitted request).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from experts.mix import BASE, Adaptation
from server.errors import Overloaded


@dataclass(eq=False)
class GatePass:
    """The gate's record of one request it let in: when it came and got in, and the swap that let it in
    (None: no swap). (Not the API's in-flight limit, server/api/app.py InFlightLimit.)"""

    adaptation: Adaptation
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    swap: Any = None


class AdmissionGate:
    """Async admission by adaptation (see the policy above). Event-loop only: not thread-safe by design."""

    def __init__(self, swap: Callable[[Adaptation], Awaitable[Any]], max_wait_s: float = 0.5,
                 max_queue: int = 1024):
        self._swap = swap                       # async: make the weights those of an adaptation; returns a report
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self.current: Adaptation | None = BASE  # None: unknown (a swap failed); the next swap rewrites
        self.running = 0                        # admitted and not yet released
        self.swaps = 0
        self._waiting: dict[Adaptation, deque[tuple[GatePass, asyncio.Future]]] = {}
        self._swapping = False
        self._closed: BaseException | None = None

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @asynccontextmanager
    async def admitted(self, adaptation: Adaptation) -> AsyncIterator[GatePass]:
        adm = await self.acquire(adaptation)
        try:
            yield adm
        finally:
            self.release(adm)

    async def acquire(self, adaptation: Adaptation) -> GatePass:
        """Wait until `adaptation` holds the weights and this request may run; count it as running."""
        if self._closed is not None:
            raise self._closed
        adm = GatePass(adaptation)
        # 1. fast path: the weights are right and nobody has waited too long
        if (not self._swapping and adaptation == self.current and not self._waiting.get(adaptation)
                and not self._must_yield()):
            return self._enter(adm)
        # 2. queue (bounded) and let the policy decide
        if self.waiting() >= self.max_queue:
            raise Overloaded(f"the queue is full ({self.max_queue} waiting requests); retry later")
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(adaptation, deque()).append((adm, fut))
        self._pump()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(adm)            # admitted just as the caller went away
            else:
                self._forget(adaptation, fut)
            raise

    def release(self, adm: GatePass) -> None:
        self.running -= 1
        self._pump()

    def close(self, exc: BaseException) -> None:
        """Refuse new requests and fail the waiting ones with `exc`."""
        self._closed = exc
        for q in self._waiting.values():
            for _, fut in q:
                if not fut.done():
                    fut.set_exception(exc)
        self._waiting.clear()

    # -- policy ------------------------------------------------------------------------------------------
    def _enter(self, adm: GatePass) -> GatePass:
        adm.admitted = time.perf_counter()
        self.running += 1
        return adm

    def _heads(self) -> dict[Adaptation, float]:
        return {a: q[0][0].enqueued for a, q in self._waiting.items() if q}

    def _must_yield(self) -> bool:
        """Another adaptation's oldest request has waited max_wait_s: the current one must drain."""
        now = time.perf_counter()
        return any(a != self.current and now - t >= self.max_wait_s for a, t in self._heads().items())

    def _forget(self, adaptation: Adaptation, fut: asyncio.Future) -> None:
        q = self._waiting.get(adaptation)
        if q is not None:
            self._waiting[adaptation] = deque(x for x in q if x[1] is not fut)
            if not self._waiting[adaptation]:
                del self._waiting[adaptation]
        self._pump()

    def _admit_all(self, adaptation: Adaptation, report: Any) -> None:
        for adm, fut in self._waiting.pop(adaptation, ()):
            if not fut.done():
                adm.swap = report
                fut.set_result(self._enter(adm))

    def _pump(self) -> None:
        if self._swapping or self._closed is not None:
            return
        heads = self._heads()
        if not heads:
            return
        # 1. the due adaptation: the one with the oldest waiting request
        due = min(heads, key=heads.__getitem__)
        # 2. the current adaptation keeps the weights while nobody has waited too long
        now = time.perf_counter()
        if self.current in heads and (due == self.current or now - heads[due] < self.max_wait_s):
            self._admit_all(self.current, None)
            return
        if self.running > 0:
            return                              # drain first: a swap never happens under admitted requests
        # 3. swap to the due adaptation, then admit its waiters
        self._swapping = True
        asyncio.get_running_loop().create_task(self._do_swap(due))

    async def _do_swap(self, target: Adaptation) -> None:
        try:
            report = await self._swap(target)
        except Exception as e:  # the weights are in an unknown state: fail this group, rewrite on the next swap
            self.current = None
            for _, fut in self._waiting.pop(target, ()):
                if not fut.done():
                    fut.set_exception(e)
        else:
            self.current = target
            self.swaps += 1
            self._admit_all(target, report)
        finally:
            self._swapping = False
        self._pump()
