"""What every engine shares: device/dtype resolution, expert loading, the loaded check, the first pass's walk.

Contract:
- `resolve_device` / `resolve_dtype`: `auto` = CUDA + bfloat16 when there is a GPU, else CPU + float32.
- `load_experts(dir, ranks, fingerprint, base, spectra)`: every `*.safetensors` of the folder, each checked
  against the base exactly as at runtime (`Expert.check_against`, with the singular values `spectra` for the
  rescale check); a bad file raises ExpertError naming it.
- `check_servable(experts, adaptation)`: raises ExpertNotFound for the first expert of the mix not loaded.
- `label_walk(prompt_ids, candidates)`: the first pass's constrained choice of a label, written once for all
  engines as a generator. It yields `(prefix_ids, allowed_token_ids)` and is sent back `{token: log p}` for
  (at least) the allowed tokens at the position after the prefix; it returns the `LabelScores`. The first
  request scores every candidate's first token (one prefill); a further request happens only where the best
  candidates share their first tokens (a step per shared token). Ties go to the lowest candidate index.
  `walk_sync` / `walk_async` drive it with an engine's own scoring function.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Awaitable, Callable, Generator, Mapping

import torch

from experts.errors import ExpertNotFound
from experts.expert import Expert
from experts.mix import Adaptation
from server.engines.base import LabelScores

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (prefix token ids, allowed next tokens) → {token id: log-probability}
NextLogprobs = Callable[[list[int], list[int]], Mapping[int, float]]
Walk = Generator[tuple[list[int], list[int]], Mapping[int, float], LabelScores]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_experts(experts_dir: Path | None, ranks: dict[str, int], fingerprint: str,
                 base_model: str, spectra: Mapping[str, torch.Tensor] | None = None) -> dict[str, Expert]:
    """Every `*.safetensors` of `experts_dir`, each checked against the base; a bad file stops the start."""
    out: dict[str, Expert] = {}
    if experts_dir is None or not Path(experts_dir).is_dir():
        return out
    for path in sorted(Path(experts_dir).glob("*.safetensors")):
        e = Expert.load(path)
        e.check_against(ranks, fingerprint, base_model, spectra)
        out[e.name] = e
    return out


def check_servable(experts: Mapping[str, Expert], adaptation: Adaptation) -> None:
    """Every expert of the mix is loaded (else ExpertNotFound, a 404)."""
    for name in adaptation.experts:
        if name not in experts:
            raise ExpertNotFound(f"expert {name!r} is not loaded")


def label_walk(prompt_ids: list[int], candidates: list[list[int]]) -> Walk:
    """Constrained choice among `candidates` (token ids of each continuation) after `prompt_ids`."""
    first = [c[0] for c in candidates]
    uniq = sorted(set(first))
    # 1. one prefill: log p of each distinct first token
    lp = yield list(prompt_ids), uniq
    best = max(range(len(candidates)), key=lambda k: (lp.get(first[k], -math.inf), -k))
    tokens = len(prompt_ids)
    # 2. candidates sharing the best first token: one more step per token where they part (rare)
    tied = [k for k, t in enumerate(first) if t == first[best]]
    depth, prefix = 1, list(prompt_ids)
    while len(tied) > 1:
        prefix.append(candidates[tied[0]][depth - 1])
        live = [k for k in tied if len(candidates[k]) > depth]
        if not live:
            break
        options = sorted({candidates[k][depth] for k in live})
        if len(options) == 1:     # one allowed token: the answer is known, no forward
            best, tied, depth = live[0], live, depth + 1
            continue
        nxt = yield list(prefix), options
        tokens += len(prefix)
        best = max(live, key=lambda k: (nxt.get(candidates[k][depth], -math.inf), -k))
        tied = [k for k in live if candidates[k][depth] == candidates[best][depth]]
        depth += 1
    # 3. the probability of each candidate's first token, renormalised over the distinct first tokens
    z = torch.softmax(torch.tensor([lp.get(t, -math.inf) for t in uniq], dtype=torch.float64), 0).tolist()
    p_of = dict(zip(uniq, z))
    return LabelScores(best=best, probs=tuple(p_of[t] for t in first), forward_tokens=tokens)


def walk_sync(walk: Walk, next_logprobs: NextLogprobs, first: Mapping[int, float] | None = None) -> LabelScores:
    """Drive a walk to its end; `first` answers its first request when the caller already scored it (batched)."""
    try:
        request = next(walk)
        request = walk.send(first if first is not None else next_logprobs(*request))
        while True:
            request = walk.send(next_logprobs(*request))
    except StopIteration as done:
        return done.value


async def walk_async(walk: Walk, next_logprobs: Callable[[list[int], list[int]], Awaitable[Mapping[int, float]]]
                     ) -> LabelScores:
    try:
        request = next(walk)
        while True:
            request = walk.send(await next_logprobs(*request))
    except StopIteration as done:
        return done.value
