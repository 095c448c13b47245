"""A bound on new client-chosen blends: each new mix of two or more experts costs a weight composition.

Contract: `BlendBudget(per_minute).admit(key)` lets an adaptation key through when it was used recently
(one of the last `remember` distinct blends) or when fewer than `per_minute` new blends were admitted in
the last 60 s; else it raises `Overloaded` (429, code `too_many_new_blends`, with Retry-After). A single
expert or the base is never a blend. `per_minute == 0` turns the bound off. Called on the event loop only.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable

from server.errors import Overloaded

WINDOW_S = 60.0


class BlendBudget:
    def __init__(self, per_minute: int, remember: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.remember, self.clock = per_minute, remember, clock
        self._recent: OrderedDict[str, None] = OrderedDict()     # distinct blends, least recently used first
        self._created: deque[float] = deque()                   # when each new blend of the window came

    def admit(self, key: str) -> None:
        if self.per_minute == 0:
            return
        if key in self._recent:
            self._recent.move_to_end(key)
            return
        now = self.clock()
        while self._created and now - self._created[0] >= WINDOW_S:
            self._created.popleft()
        if len(self._created) >= self.per_minute:
            raise Overloaded(f"too many new expert blends: at most {self.per_minute} new t2.experts mixes per "
                             "minute on this server; reuse a recent mix or retry later", "t2.experts",
                             code="too_many_new_blends")
        self._created.append(now)
        self._recent[key] = None
        while len(self._recent) > self.remember:
            self._recent.popitem(last=False)
