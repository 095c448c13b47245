"""Sampling one token from one row of logits: greedy, temperature, nucleus (top_p), seeded generators.

Contract: `sample(logits [vocab], params, generator)` returns a token id; greedy (temperature < 1e-5, as in
vLLM) takes the argmax and never touches the generator; `new_generator(seed, device)` is seeded when a seed is
given (reproducible per request), else random. Engines that sample themselves (hf.py) use only these.
"""

from __future__ import annotations

import torch


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params, gen: torch.Generator) -> int:
    """One token from a row of logits [vocab]: greedy at temperature 0, else temperature + nucleus."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > params.top_p      # drop tokens once mass before them > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
