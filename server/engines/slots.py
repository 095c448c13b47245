"""Gain-table slots of the live adaptations (embedded engine).

Contract:
- Slot 0 is the base (all ones), always there, never counted. Slots 1..capacity hold one adaptation each.
- `acquire(key, fill)` gives a running row its adaptation's slot: the one it already has (its gains are
  computed once per adaptation, not per step or per row), else a never-used slot, else the least recently
  used slot no row holds (recycled: `fill(slot)` writes the new gains first). It returns None when every
  slot is held by running rows: the caller leaves the request waiting. Each acquire is matched by one
  `release(key)`; a slot is never recycled while a row holds it.
- `forget(pred)` drops the idle slots of the adaptations `pred` selects (an expert was unloaded); held ones
  stay until released, then go (they are not kept for reuse).
Single-threaded: only the engine's worker calls it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from experts.mix import BASE_NAME


class Slots:
    def __init__(self, capacity: int):
        assert capacity >= 1
        self.capacity = capacity
        self._slot: dict[str, int] = {}                      # key → slot
        self._refs: dict[str, int] = {}                      # key → running rows holding it
        self._idle: OrderedDict[str, None] = OrderedDict()   # filled, unheld keys, least recently used first
        self._free = list(range(capacity, 0, -1))            # never-used (or forgotten) slots
        self._doomed: set[str] = set()                       # forgotten while held: free on last release
        self.fills = 0                                       # gain rows written (first use or recycling)

    def can_acquire(self, key: str) -> bool:
        if key in self._doomed:
            return False                          # its old gains are still held: wait for their release
        return key == BASE_NAME or key in self._slot or bool(self._free or self._idle)

    def acquire(self, key: str, fill: Callable[[int], None]) -> int | None:
        if key == BASE_NAME:
            return 0
        if key in self._doomed:
            return None
        if key in self._slot:
            self._idle.pop(key, None)
            self._refs[key] += 1
            return self._slot[key]
        if self._free:
            slot = self._free.pop()
        elif self._idle:
            old, _ = self._idle.popitem(last=False)
            slot = self._slot.pop(old)
            del self._refs[old]
        else:
            return None
        fill(slot)
        self.fills += 1
        self._slot[key], self._refs[key] = slot, 1
        return slot

    def release(self, key: str) -> None:
        if key == BASE_NAME:
            return
        self._refs[key] -= 1
        if self._refs[key] == 0:
            if key in self._doomed:
                self._doomed.discard(key)
                self._free.append(self._slot.pop(key))
                del self._refs[key]
            else:
                self._idle[key] = None

    def forget(self, pred: Callable[[str], bool]) -> None:
        for key in [k for k in self._slot if pred(k)]:
            if self._refs[key] == 0:
                self._idle.pop(key, None)
                self._free.append(self._slot.pop(key))
                del self._refs[key]
            else:
                self._doomed.add(key)

    def held(self) -> int:
        """Slots running rows hold now."""
        return sum(1 for r in self._refs.values() if r > 0)

    def used(self) -> int:
        """Slots with gains in them (held or idle)."""
        return len(self._slot)
