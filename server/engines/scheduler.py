"""The embedded engine's queue: waiting model work, oldest first, admitted row by row between steps.

Contract:
- The invariant of the whole server: no row is ever computed with another request's gains. Batches may
  mix adaptations freely (each row carries its own gain slot, see server/engines/slots.py); the engine
  decides per step whether the step runs dense (every row of the one adaptation the weights hold) or
  factored. So the scheduler no longer groups by adaptation and never swaps weights.
- Two FIFO queues, one per `JobKind`: first-pass scoring (short, unblocks second passes) and generation.
- `take(kind, limit, admit)` hands out, oldest first, up to `limit` jobs that `admit(job)` accepts (it
  acquires the job's slot; False = no slot for it now). A refused job keeps its place and does not block
  the jobs behind it — until it has waited `max_wait_s`: then it is *overdue* and nothing younger is
  admitted (of either kind) until it is, so the slots held by running rows drain and it gets one (the
  starvation guard: without it, traffic for live adaptations could keep every slot busy forever).
- `remove(pred)` takes out waiting jobs (an expert was unloaded: the engine fails them with a 404).
- Bounded (`max_queue`): `submit` raises Overloaded when full. `wait` blocks until work is waiting;
  `wake` makes it return at once (control work), `close` stops intake and returns what still waited.
Thread-safe: submit/remove/close on the event loop, take/wait on the engine's worker.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from experts.mix import Adaptation
from server.errors import Overloaded


class JobKind(str, enum.Enum):
    SCORE = "score"          # the dispatch pass: one prefill, a constrained choice
    GENERATE = "generate"    # an answer: prefill, then decode steps

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Job:
    kind: JobKind
    adaptation: Adaptation
    payload: Any                  # the engine's request object
    sink: Any = None              # how the engine delivers results
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    slot: int | None = None       # its adaptation's gain slot while admitted (the engine's)


@dataclass
class Batch:
    """Jobs admitted together (what the engine's `fault_hook` sees before it runs them)."""
    kind: JobKind
    jobs: list[Job]


class Scheduler:
    def __init__(self, max_batch: int = 8, max_wait_s: float = 0.5, max_queue: int = 1024):
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._cv = threading.Condition()
        self._queues: dict[JobKind, deque[Job]] = {k: deque() for k in JobKind}
        self._overdue: Job | None = None      # the oldest refused job past max_wait_s, while it waits
        self._closed = False
        self._woken = False

    # -- producers (event loop) -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self.waiting() >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._queues[job.kind].append(job)
            self._cv.notify()

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def remove(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Take out every waiting job `pred` selects; returns them."""
        with self._cv:
            out = [j for q in self._queues.values() for j in q if pred(j)]
            for k, q in self._queues.items():
                self._queues[k] = deque(j for j in q if not pred(j))
            if self._overdue in out:
                self._overdue = None
            return out

    def wake(self) -> None:
        """Make a blocked `wait` return now (the worker has control work to do)."""
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    def close(self) -> list[Job]:
        """Stop accepting work; return the jobs that were still waiting (the engine fails them)."""
        with self._cv:
            self._closed = True
            left = [j for q in self._queues.values() for j in q]
            for q in self._queues.values():
                q.clear()
            self._cv.notify_all()
            return left

    # -- the consumer (the engine's worker) ------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until a job waits (True), or `timeout`, `wake` or `close` (False)."""
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                self._drop_cancelled()
                if self._woken:
                    self._woken = False
                    return False
                if self.waiting():
                    return True
                if self._closed:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)

    def take(self, kind: JobKind, limit: int, admit: Callable[[Job], bool]) -> list[Job]:
        """Up to `limit` waiting jobs of `kind`, oldest first, that `admit` accepts (see the contract)."""
        with self._cv:
            self._drop_cancelled()
            q, now = self._queues[kind], time.monotonic()
            out: list[Job] = []
            keep: deque[Job] = deque()
            for j in q:
                od = self._overdue
                if len(out) >= limit or (od is not None and j is not od and j.enqueued > od.enqueued):
                    keep.append(j)                 # full, or younger than an overdue job: wait
                elif admit(j):
                    out.append(j)
                    if j is od:
                        self._overdue = None
                else:
                    keep.append(j)
                    if od is None and now - j.enqueued >= self.max_wait_s:
                        self._overdue = j          # the guard: nothing younger until it has a slot
            self._queues[kind] = keep
            return out

    def _drop_cancelled(self) -> None:
        for k, q in self._queues.items():
            if any(j.cancelled for j in q):
                self._queues[k] = deque(j for j in q if not j.cancelled)
        if self._overdue is not None and self._overdue.cancelled:
            self._overdue = None
