"""Incremental detokenisation with stop strings, for engines that sample token by token.

Contract: `Detokenizer.push(token_id)` returns the text that is now final (never a partial UTF-8 character,
never a piece that could still turn out to be the start of a stop string) and whether a stop string was hit;
the text of the stop string itself is never returned. `flush()` returns what was held back at the end.
"""

from __future__ import annotations

from typing import Any, Sequence


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0          # characters of the decoded text already returned
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait for more bytes
            return "", False
        self.text = text
        # 1. a stop string completes the answer; search only where a new match can start
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                out = text[self.emitted:cut] if cut > self.emitted else ""
                self.emitted, self.stopped = max(self.emitted, cut), True
                self.text = text[:cut]
                return out, True
        # 2. hold back a tail that could still become a stop string
        final = len(text) - self._holdback(text)
        out = text[self.emitted:final] if final > self.emitted else ""
        self.emitted = max(self.emitted, final)
        return out, False

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _holdback(self, text: str) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best
