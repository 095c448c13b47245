"""A thin Python client for the Transformer² server, on top of the official `openai` SDK.

Contract:
- `T2Client(base_url, api_key)` wraps `openai.OpenAI` (available as `.openai` for anything else); every call
  is a plain OpenAI call, our extensions travel in `extra_body={"t2": ...}` and come back in `t2`.
- `t2_options(expert=, experts=, dispatch=)` builds the `t2` request extension: one expert, a blend
  {name: weight}, and/or a dispatch strategy (explicit | prompt | classifier | none). Conflicting choices
  raise ValueError here, before any request.
- `report(response_or_chunk)` reads the `t2` report (what the dispatch decided, first-pass / patch / queue
  times) from a response or a stream chunk as a `T2Report`, or None where there is none.
- `chat()` / `complete()` return the OpenAI objects; `stream_chat()` yields text pieces and keeps the final
  report and usage on the returned `StreamResult`.
- `wait_ready(url, proc)` blocks until a server process answers GET /health with 200 (raises if it exits or
  takes longer than `timeout_s`); `stop_process(proc)` stops it (SIGTERM, SIGKILL after 60 s).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import httpx
from openai import OpenAI

STRATEGIES = ("explicit", "prompt", "classifier", "none")


def t2_options(expert: str | None = None, experts: Mapping[str, float] | None = None,
               dispatch: str | None = None) -> dict[str, Any]:
    """The `t2` request extension for one expert, a blend of experts, and/or a dispatch strategy."""
    if expert is not None and experts is not None:
        raise ValueError("give either expert or experts, not both")
    if dispatch is not None and dispatch not in STRATEGIES:
        raise ValueError(f"dispatch must be one of {STRATEGIES}, got {dispatch!r}")
    mix = {expert: 1.0} if expert is not None else (dict(experts) if experts is not None else None)
    if mix is not None:
        if dispatch not in (None, "explicit"):
            raise ValueError(f"an explicit expert mix conflicts with dispatch={dispatch!r}")
        if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("expert weights must be ≥ 0 and not all 0")
    out: dict[str, Any] = {}
    if mix is not None:
        out["experts"] = {k: float(v) for k, v in mix.items()}
    if dispatch is not None:
        out["dispatch"] = dispatch
    return out


def parse_mix(text: str) -> dict[str, float]:
    """'math=0.7,code=0.3' (or 'math') → {'math': 0.7, 'code': 0.3}."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition("=")
        mix[name.strip()] = float(w) if w else 1.0
    return mix


@dataclass(frozen=True)
class T2Report:
    strategy: str
    mix: dict[str, float]
    adaptation: str
    label: Optional[str] = None
    label_probs: Optional[dict[str, float]] = None
    first_pass_ms: float = 0.0
    patch_ms: float = 0.0
    queue_ms: float = 0.0

    def summary(self) -> str:
        mix = "+".join(f"{k}×{v:g}" for k, v in self.mix.items()) or "base"
        label = f" label={self.label}" if self.label else ""
        return (f"[{self.strategy}{label} → {mix}; first pass {self.first_pass_ms:.0f} ms, "
                f"patch {self.patch_ms:.1f} ms, queue {self.queue_ms:.0f} ms]")


def report(obj: Any) -> T2Report | None:
    """The `t2` report of a response or stream chunk (an openai object or a dict), or None."""
    raw = obj.get("t2") if isinstance(obj, Mapping) else (getattr(obj, "model_extra", None) or {}).get("t2")
    if not raw:
        return None
    fields = T2Report.__dataclass_fields__
    return T2Report(**{k: v for k, v in raw.items() if k in fields})


@dataclass
class StreamResult:
    text: str = ""
    finish_reason: str | None = None
    report: T2Report | None = None
    usage: Any = None
    pieces: list[str] = field(default_factory=list)


class T2Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None, **openai_kw: Any):
        self.openai = OpenAI(base_url=base_url, api_key=api_key or "none", **openai_kw)

    # -- catalogue --------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [m.id for m in self.openai.models.list()]

    def base_model(self) -> str:
        for m in self.openai.models.list():
            if (m.model_extra or {}).get("t2", {}).get("kind") == "base":
                return m.id
        raise RuntimeError("the server lists no base model (is it a Transformer² server?)")

    def experts(self) -> dict[str, dict[str, Any]]:
        """name → {label, description, params} of every expert the server has loaded."""
        out = {}
        for m in self.openai.models.list():
            t2 = (m.model_extra or {}).get("t2") or {}
            if t2.get("kind") == "expert":
                out[m.id.split(":", 1)[1]] = {k: v for k, v in t2.items() if k != "kind"}
        return out

    # -- requests ---------------------------------------------------------------------------------
    @staticmethod
    def _body(kw: dict[str, Any], expert, experts, dispatch) -> dict[str, Any]:
        t2 = t2_options(expert, experts, dispatch)
        if t2:
            kw["extra_body"] = {**kw.get("extra_body", {}), "t2": t2}
        return kw

    def chat(self, messages: list[dict[str, Any]] | str, *, model: str = "auto", expert: str | None = None,
             experts: Mapping[str, float] | None = None, dispatch: str | None = None, **kw: Any):
        """One chat completion; `expert` / `experts` / `dispatch` choose the adaptation."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.openai.chat.completions.create(model=model, messages=messages,
                                                   **self._body(kw, expert, experts, dispatch))

    def complete(self, prompt: str, *, model: str = "auto", expert: str | None = None,
                 experts: Mapping[str, float] | None = None, dispatch: str | None = None, **kw: Any):
        return self.openai.completions.create(model=model, prompt=prompt, **self._body(kw, expert, experts, dispatch))

    def stream_chat(self, messages: list[dict[str, Any]] | str, *, result: StreamResult | None = None,
                    model: str = "auto", expert: str | None = None, experts: Mapping[str, float] | None = None,
                    dispatch: str | None = None, **kw: Any) -> Iterator[str]:
        """Yield the answer's text pieces; `result` (if given) receives the text, report and usage."""
        result = result if result is not None else StreamResult()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        kw.setdefault("stream_options", {"include_usage": True})
        stream = self.openai.chat.completions.create(model=model, messages=messages, stream=True,
                                                     **self._body(kw, expert, experts, dispatch))
        for chunk in stream:
            result.report = report(chunk) or result.report
            if chunk.usage is not None:
                result.usage = chunk.usage
            for choice in chunk.choices:
                if choice.finish_reason:
                    result.finish_reason = choice.finish_reason
                if choice.delta.content:
                    result.text += choice.delta.content
                    result.pieces.append(choice.delta.content)
                    yield choice.delta.content


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    """Return once the server `proc` started answers `url`/health with 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it answered")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer /health within {timeout_s:.0f} s")
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), SIGKILL after 60 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
