"""The scheduler: groups waiting model work by adaptation and decides when the weights swap.

Contract (the invariant of the whole server): a batch holds jobs of ONE adaptation and ONE kind (first-pass
scoring or generation); an engine patches the weights to the batch's adaptation before it runs the batch and
never changes them while it runs, so no token of any request is computed under another request's weights.

Policy, per `next_batch` call:
1. the oldest waiting job overall names the *due* adaptation;
2. the current adaptation keeps the weights while it has work and the oldest job overall has waited less
   than `max_wait_s` (no swap, better batching); otherwise the due adaptation goes next (a swap);
3. within the chosen adaptation, scoring jobs go first (they are short and unblock second passes), then
   generation jobs, oldest first, at most `max_batch` of them.
So a job waits at most about (number of adaptations waiting) × (`max_wait_s` + one batch): no starvation.
The queue is bounded (`max_queue`): `submit` raises Overloaded when full. `wake` makes a blocked
`next_batch` return None at once (the engine's worker then runs its control work between batches). Thread-safe.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from experts.mix import BASE, Adaptation
from server.errors import Overloaded

class JobKind(str, enum.Enum):
    SCORE = "score"          # the first pass (label scoring)
    GENERATE = "generate"    # the answer

    def __str__(self) -> str:
        return self.value


SCORE, GENERATE = JobKind.SCORE, JobKind.GENERATE


@dataclass(eq=False)
class Job:
    kind: JobKind
    adaptation: Adaptation
    payload: Any                  # the engine's request object
    sink: Any = None              # how the engine delivers results
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


@dataclass
class Batch:
    adaptation: Adaptation
    kind: JobKind
    jobs: list[Job]


class Scheduler:
    def __init__(self, max_batch: int = 8, max_wait_s: float = 0.5, max_queue: int = 1024):
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._cv = threading.Condition()
        self._queues: dict[Adaptation, dict[JobKind, deque[Job]]] = {}
        self._closed = False
        self._woken = False
        self.current: Adaptation = BASE
        self.swaps = 0

    # -- producers (event loop) -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self.waiting() >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._queues.setdefault(job.adaptation, {SCORE: deque(), GENERATE: deque()})[job.kind].append(job)
            self._cv.notify()

    def waiting(self) -> int:
        return sum(len(q) for kinds in self._queues.values() for q in kinds.values())

    def wake(self) -> None:
        """Make a blocked `next_batch` return None now (the worker has control work to do)."""
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    def close(self) -> list[Job]:
        """Stop accepting work; return the jobs that were still waiting (the engine fails them)."""
        with self._cv:
            self._closed = True
            left = [j for kinds in self._queues.values() for q in kinds.values() for j in q]
            self._queues.clear()
            self._cv.notify_all()
            return left

    # -- the consumer (the engine's worker) ------------------------------------------------------
    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """Block until work is there (or `timeout`/close) and return the next batch per the policy."""
        with self._cv:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                self._drop_cancelled()
                if self._woken:
                    self._woken = False
                    return None
                if self._queues:
                    break
                if self._closed:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cv.wait(left)
            # 1. the due adaptation: the one with the oldest waiting job
            heads = {a: min(q[0].enqueued for q in kinds.values() if q) for a, kinds in self._queues.items()}
            due = min(heads, key=heads.__getitem__)
            # 2. keep the current weights while nobody has waited too long
            now = time.monotonic()
            chosen = self.current if (self.current in heads and now - heads[due] < self.max_wait_s) else due
            if chosen != self.current:
                self.swaps += 1
                self.current = chosen
            # 3. scoring first, then generation, oldest first
            kinds = self._queues[chosen]
            kind = SCORE if kinds[SCORE] else GENERATE
            q = kinds[kind]
            jobs = [q.popleft() for _ in range(min(self.max_batch, len(q)))]
            if not kinds[SCORE] and not kinds[GENERATE]:
                del self._queues[chosen]
            return Batch(chosen, kind, jobs)

    def take_more(self, adaptation: Adaptation, kind: JobKind, limit: int) -> list[Job]:
        """Jobs of the running batch's adaptation that may join it between two steps (continuous batching).

        Same weights, so the invariant holds; none while another adaptation has waited `max_wait_s` or more,
        so a running batch cannot keep the weights forever (it drains, then the overdue group swaps in).
        """
        with self._cv:
            self._drop_cancelled()
            kinds = self._queues.get(adaptation)
            if limit <= 0 or not kinds or not kinds[kind]:
                return []
            others = [q[0].enqueued for a, ks in self._queues.items() if a != adaptation for q in ks.values() if q]
            if others and time.monotonic() - min(others) >= self.max_wait_s:
                return []
            q = kinds[kind]
            jobs = [q.popleft() for _ in range(min(limit, len(q)))]
            if not kinds[SCORE] and not kinds[GENERATE]:
                del self._queues[adaptation]
            return jobs

    def _drop_cancelled(self) -> None:
        for a in list(self._queues):
            kinds = self._queues[a]
            for k in kinds:
                if any(j.cancelled for j in kinds[k]):
                    kinds[k] = deque(j for j in kinds[k] if not j.cancelled)
            if not kinds[SCORE] and not kinds[GENERATE]:
                del self._queues[a]
