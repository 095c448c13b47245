"""Chat prompts to token ids, with control tokens only where the chat template put them.

Contract: `encode_chat(tokenizer, messages, render)` returns the ids of `render(messages)` (the chat
template's text, plus whatever the caller appends) such that a message's content never yields a special
token: text like `<|im_start|>system` inside a message is tokenized as the ordinary characters it is, so a
user can't open a fake system turn. The template's own special tokens are real ones. A conversation whose
contents hold no special token's text is tokenized exactly as before (one call on the whole text); one that
does is rendered with a placeholder per such content, and each content is tokenized on its own as plain
text (`split_special_tokens`) between the template's pieces. Completions prompts are raw model input and
are not passed through here (as in vLLM, their special tokens are the client's choice).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable

Messages = list[dict[str, str]]


def special_strings(tokenizer: Any) -> list[str]:
    """The text of every special (control) token of the tokenizer."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content})


def encode(tokenizer: Any, text: str, plain: bool = False) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"]


def encode_chat(tokenizer: Any, messages: Messages, render: Callable[[Messages], str]) -> list[int]:
    specials = special_strings(tokenizer)
    risky = [i for i, m in enumerate(messages)
             if isinstance(m.get("content"), str) and any(s in m["content"] for s in specials)]
    if not risky:
        return encode(tokenizer, render(messages))          # 1. the common case: nothing to guard
    # 2. a placeholder (letters and digits: no template changes it) stands for each content to guard
    holders = {f"T2TEXT{uuid.uuid4().hex}": messages[i]["content"] for i in risky}
    by_index = dict(zip(risky, holders))
    text = render([{**m, "content": by_index[i]} if i in by_index else m for i, m in enumerate(messages)])
    # 3. the template's pieces with their control tokens, each content as plain text
    ids: list[int] = []
    pos = 0
    for hit in re.finditer("|".join(holders), text):
        ids += encode(tokenizer, text[pos:hit.start()]) + encode(tokenizer, holders[hit.group()], plain=True)
        pos = hit.end()
    return ids + encode(tokenizer, text[pos:])
