"""Sampling one token from one row of logits, and the log-probabilities engines report for it.

Contract:
- `sample(logits [vocab], params, generator)` returns a token id; greedy (temperature < 1e-5, as in vLLM)
  takes the argmax and never touches the generator; `new_generator(seed, device)` is seeded when a seed is
  given (reproducible per request), else random. `params.logit_bias` is added to the logits first (as vLLM
  and OpenAI: a bias of -100 bans a token, +100 forces it in practice).
- `token_logprob(logits, token, k)` / `prompt_logprobs(logits [T, vocab], ids, k)` are the raw model's
  log-probabilities (log-softmax of the logits as the model gives them: before logit_bias, temperature and
  top_p), which is vLLM's default `logprobs_mode="raw_logprobs"`, so both engines report the same thing.
- `from_ranked(step, token, k)` converts an engine's own per-position {token id: (logprob, rank)} record (vLLM's
  `Logprob` objects: anything with `.logprob` and `.rank`) to the same TokenLogprob.
Engines that sample themselves (hf.py) use only these.
"""

from __future__ import annotations

import torch

from server.engines.base import TokenLogprob


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def biased(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """logits [vocab] + logit_bias (a copy; the raw logits stay for the log-probabilities)."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
    vals = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, vals)


def sample(logits: torch.Tensor, params, gen: torch.Generator) -> int:
    """One token from a row of logits [vocab]: greedy at temperature 0, else temperature + nucleus."""
    logits = biased(logits, getattr(params, "logit_bias", ()))
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > params.top_p      # drop tokens once mass before them > top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _of(logp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """From a row of log-probabilities [vocab]: the token's and the top k."""
    top = ()
    if k > 0:
        vals, ids = logp.topk(k)
        top = tuple(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(int(token), float(logp[token]), top)


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The raw log p of `token` under logits [vocab], and the top k alternatives."""
    return _of(torch.log_softmax(logits.float(), -1), token, k)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> tuple[TokenLogprob | None, ...]:
    """Per prompt token: log p(ids[t] | ids[:t]) from the logits of positions [T, vocab]; None for the first."""
    logp = torch.log_softmax(logits.float(), -1)                  # [T, vocab]
    return (None,) + tuple(_of(logp[t - 1], ids[t], k) for t in range(1, len(ids)))


def from_ranked(step, token: int, k: int) -> TokenLogprob | None:
    """{token id: obj with .logprob, .rank} for one position → TokenLogprob (None for an empty position)."""
    if not step:
        return None
    own = step.get(token)
    ranked = sorted(((t, x) for t, x in step.items() if x.rank is not None and x.rank <= k), key=lambda e: e[1].rank)
    return TokenLogprob(int(token), float(own.logprob) if own is not None else float("-inf"),
                        tuple((int(t), float(x.logprob)) for t, x in ranked))
