"""Rollouts: a model's answers and log-probabilities under given weights, for training, few-shot search, eval.

Contract:
- `patched_weights(base, factors, z)` gives W' = W + Δ(z) per matrix (differentiable in z; fp32 delta cast
  to the weight dtype) — the formula of experts.patch, for code that needs W' as values, not in place.
- `Rollouts.prompts(examples, task)` are the chat-formatted prompts, ending with the task's `answer_prefix`.
- `Rollouts.generate(prompts, weights)` answers chat-formatted prompts (left-padded batch, greedy unless a
  temperature is set) with `weights` written into the model for the call and the base restored after, even
  on error. `token_logprobs(enc, completion_ids, weights)` recomputes the completion's log-probs with the
  weights passed through `torch.func.functional_call`, so gradients flow into whatever the weights were
  computed from. `accuracy(task, weights)` and `answer_loglik(task, examples, weights)` build on those;
  `encode_answers(prompts, answers)` lays out given answers (references) for `token_logprobs`.
- Tasks are duck-typed like experts.tasks.base.Task: `.examples`, `.messages(example)`, `.reward(text, example)`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.func import functional_call

from experts.patch import svf_delta
from experts.svd import Factors


def patched_weights(base: Mapping[str, torch.Tensor], factors: Mapping[str, Factors],
                    z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for n, zn in z.items():
        f, W = factors[n], base[n]
        out[n] = (W.to(torch.float32) + svf_delta(f.U, f.s, f.Vh, zn.to(f.s.device))).to(W.dtype)   # [m, n]
    return out


class Rollouts:
    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 96, temperature: float = 0.0,
                 batch_size: int = 8):
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"

    def prompts(self, examples: Sequence[Any], task: Any) -> list[str]:
        prefix = getattr(task, "answer_prefix", "")
        return [self.tok.apply_chat_template(task.messages(e), add_generation_prompt=True, tokenize=False) + prefix
                for e in examples]

    @torch.no_grad()
    def generate(self, prompts: list[str], weights: Mapping[str, torch.Tensor] | None) -> tuple[Any, list[str]]:
        """((encoding, completion ids [B, new]), texts) under `weights` (None: base)."""
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        params = dict(self.model.named_parameters())
        saved = {n: params[n].data.clone() for n in (weights or {})}
        try:
            for n, w in (weights or {}).items():
                params[n].data.copy_(w)
            kw = dict(do_sample=self.temperature > 0, max_new_tokens=self.max_new_tokens,
                      pad_token_id=self.tok.pad_token_id)
            if self.temperature > 0:
                kw["temperature"] = self.temperature
            out = self.model.generate(**enc, **kw)
        finally:
            for n, w in saved.items():
                params[n].data.copy_(w)
        completion_ids = out[:, enc["input_ids"].shape[1]:]
        return (enc, completion_ids), self.tok.batch_decode(completion_ids, skip_special_tokens=True)

    def token_logprobs(self, enc: Any, completion_ids: torch.Tensor, weights: Mapping[str, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of each completion token [B, new], log-softmax [B, new, vocab], mask [B, new])."""
        ids = torch.cat([enc["input_ids"], completion_ids], 1)                    # [B, T]
        pad = self.tok.pad_token_id
        # the completion runs up to and including its first pad/eos token; later tokens are padding
        live = (completion_ids != pad).long().cumprod(1)                           # [B, new]
        first_stop = torch.zeros_like(live)
        first_stop[:, 0] = 1 - live[:, 0]
        first_stop[:, 1:] = (live[:, :-1] - live[:, 1:]).clamp_min(0)
        comp_mask = live + first_stop
        mask = torch.cat([enc["attention_mask"], comp_mask], 1)                    # [B, T]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
        out = functional_call(self.model, dict(weights), args=(), kwargs=kwargs) if weights else self.model(**kwargs)
        n_new = completion_ids.shape[1]
        logp_all = torch.log_softmax(out.logits[:, -n_new - 1:-1].float(), -1)     # [B, new, vocab]
        logp = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)       # [B, new]
        return logp, logp_all, comp_mask.float()

    def accuracy(self, task: Any, weights: Mapping[str, torch.Tensor] | None, limit: int | None = None) -> float:
        examples = task.examples[:limit] if limit else task.examples
        correct = 0
        for i in range(0, len(examples), self.batch_size):
            chunk = examples[i:i + self.batch_size]
            _, texts = self.generate(self.prompts(chunk, task), weights)
            correct += sum(task.reward(t, e) > 0 for t, e in zip(texts, chunk))
        return correct / max(1, len(examples))

    def choice_tokens(self, prompt: str, choices: Sequence[str], suffix: str = "}") -> list[int]:
        """The first token of each choice as it continues `prompt` (tokenized together with `prompt` and
        `suffix`, as the server scores labels); the choices must differ in that token."""
        full = [self.tok(prompt + c + suffix, add_special_tokens=False)["input_ids"] for c in choices]
        common = 0
        while all(len(f) > common + 1 and f[common] == full[0][common] for f in full):
            common += 1
        first = [f[common] for f in full]
        if len(set(first)) != len(first):
            raise ValueError(f"choices {list(choices)} share their first token after the prompt")
        return first

    def choice_logprobs(self, prompts: list[str], choice_ids: Sequence[int],
                        weights: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """Log-softmax over `choice_ids` of the next-token logits after each prompt [B, C], with the weights
        passed through `functional_call` (differentiable in whatever they were computed from). The prompts'
        common token prefix (for the classifier: the system prompt and the start of the user turn, most of
        each prompt) runs once and its KV cache is shared by the batch; gradients flow through it too."""
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n_pre = 0
        while all(len(x) > n_pre + 1 and x[n_pre] == ids[0][n_pre] for x in ids):
            n_pre += 1

        def call(**kw: Any) -> Any:
            return functional_call(self.model, dict(weights), args=(), kwargs=kw) if weights else self.model(**kw)

        dev = self.model.device
        b, width = len(ids), max(len(x) for x in ids) - n_pre
        cache = None
        if n_pre:
            cache = call(input_ids=torch.tensor([ids[0][:n_pre]], device=dev), use_cache=True).past_key_values
            cache.batch_repeat_interleave(b)
        suffix = torch.full((b, width), self.tok.pad_token_id, dtype=torch.long)          # right-padded
        mask = torch.zeros((b, n_pre + width), dtype=torch.long)
        for i, x in enumerate(ids):
            suffix[i, :len(x) - n_pre] = torch.tensor(x[n_pre:])
            mask[i, :len(x)] = 1
        positions = (n_pre + torch.arange(width)).expand(b, width)
        out = call(input_ids=suffix.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                   past_key_values=cache, use_cache=cache is not None)
        last = torch.tensor([len(x) - n_pre - 1 for x in ids], device=dev)
        logits = out.logits[torch.arange(b, device=dev), last][:, list(choice_ids)].float()   # [B, C]
        return torch.log_softmax(logits, -1)

    def encode_answers(self, prompts: list[str], answers: Sequence[str], end: bool = False) -> tuple[Any, torch.Tensor]:
        """(left-padded prompt encoding, right-padded answer ids [B, L]) for `token_logprobs`; the pad tokens
        after an answer are masked out by its first-stop rule. `end` appends the end-of-turn token to each
        answer, so that stopping after it is part of what is scored (and trained)."""
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        eos = self.tok.eos_token if end else ""
        ans = self.tok([a + eos for a in answers], return_tensors="pt", padding=True, add_special_tokens=False,
                       padding_side="right")
        ids = ans["input_ids"].to(self.model.device)
        ids = torch.where(ans["attention_mask"].to(ids.device) > 0, ids, torch.full_like(ids, self.tok.pad_token_id))
        return enc, ids

    @torch.no_grad()
    def answer_loglik(self, task: Any, examples: Sequence[Any], weights: Mapping[str, torch.Tensor] | None,
                      answers: Sequence[str]) -> float:
        """Mean per-token log-likelihood of the reference `answers` after each example's prompt."""
        enc, ids = self.encode_answers(self.prompts(examples, task), answers)
        logp, _, m = self.token_logprobs(enc, ids, weights)
        return float((logp * m).sum() / m.sum().clamp_min(1))
