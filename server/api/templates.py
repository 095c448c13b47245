"""Chat templates: the model's own, a file given by `--chat-template`, or one we ship.

Contract: `resolve_chat_template(value, default_model)` → the Jinja text to use, or None for the
tokenizer's own. `value` is a file path or the name of a shipped template (`chatml-tools`: ChatML that
knows tools, Hermes format, server/templates/chatml_tools.jinja). Unset, the embedded default model
(SmolLM2-135M-Instruct, whose own template knows nothing of tools) gets `chatml-tools`, which renders a
conversation without tools exactly as SmolLM2's own template does (same default system turn), so the first
pass and every plain prompt are unchanged; any other model keeps its own template.
`render(tokenizer, messages, template, tools)` applies it with the generation prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SHIPPED = {"chatml-tools": TEMPLATES / "chatml_tools.jinja"}


def resolve_chat_template(value: str | None, default_model: bool) -> str | None:
    if value is None:
        return SHIPPED["chatml-tools"].read_text() if default_model else None
    if value in SHIPPED:
        return SHIPPED[value].read_text()
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"--chat-template {value!r} is neither a file nor one of {sorted(SHIPPED)}")
    return path.read_text()


def render(tokenizer: Any, messages: list[dict[str, Any]], template: str | None,
           tools: list[dict[str, Any]] | None = None) -> str:
    kw: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    if template is not None:
        kw["chat_template"] = template
    if tools:
        kw["tools"] = tools
    return tokenizer.apply_chat_template(messages, **kw)
