"""SVF training: REINFORCE (or a supervised objective) over the z-vectors only, with a KL penalty to the base.

Contract:
- `SVFPolicy` holds one raw parameter p per adapted matrix ([rank], fp32; init 0.1 + 0.01·N(0,1) as the
  reference) and gives z = sigmoid(p) and the patched weights W'(p) = W + Δ(z) (experts.patch.svf_delta),
  differentiable in p. Nothing else of the model is trained.
- `Trainer.step()` is one update (numbered in the code): 1. draw a batch; 2. roll out under the current z
  (greedy by default, as the reference: temperature 0, one completion per prompt); 3. reward each completion
  (+1 / −1); with `baseline` the batch mean reward is subtracted (advantage A = r − mean r), else A = r as in
  the reference; 4. recompute the completion's log-probs with W'(p) through
  `torch.func.functional_call`, so gradients flow from dW' back into p; loss = −mean(A · mean log π'(y|x))
  + kl_coef · mean KL(π' ‖ π) per token; 5. clip the gradient norm, AdamW step.
- `objective="likelihood"` replaces steps 2-4 by supervised next-token likelihood of the task's reference
  answers (`_likelihood_step`); `objective="labels"` by cross-entropy over a choice task's labels
  (`_label_step`). Both keep the KL option (likelihood) or not (labels), the clipping and the selection.
- Every `val_every` steps the validation accuracy is measured (greedy) and the best z so far is kept;
  `save_expert` writes it as a regular expert file. A checkpoint (p, optimizer, step, best, log) is written
  to the run folder each validation and a run resumes from it. The log is a JSONL file plus a PNG plot.
- Tasks are duck-typed like experts.tasks.base.Task: `.examples`, `.messages(example)`, `.reward(text,
  example)`.

Deviations from the reference (documented for users): batch size and max new tokens default smaller (a CPU
budget: 8 and 96 vs 256 and 512), AdamW without a schedule, and the KL term is computed on the rollout
tokens only (the reference's default KL coefficient is 0, which is ours too). The mean-reward baseline is on
by default: without it, a batch where every answer is wrong (common early on a hard task) pushes down the
log-probability of everything the model says, and on SmolLM2 math (base 19 %) that collapsed the policy to
0 % in 10 steps at lr 1e-2 (runs/math-collapsed-nobaseline in the recipe's history). With it, a batch with
one reward value gives no update. `baseline=False` is the reference's estimator.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from experts.expert import Expert
from experts.svd import Factors
from experts.train.rollout import Rollouts, patched_weights

log = logging.getLogger("t2.train")


@dataclass
class TrainConfig:
    steps: int = 50
    batch_size: int = 8
    lr: float = 2e-3
    kl_coef: float = 0.0
    grad_clip: float = 1e-3
    max_new_tokens: int = 96
    temperature: float = 0.0           # 0 = greedy rollouts (the reference)
    baseline: bool = True              # subtract the batch mean reward (the reference: False)
    val_every: int = 10
    val_size: int = 64
    init_mean: float = 0.1
    init_std: float = 0.01
    seed: int = 0
    objective: str = "reinforce"       # or "labels" (a choice task's labels) or "likelihood" (references)


class SVFPolicy(torch.nn.Module):
    """Trainable p per matrix; z = sigmoid(p); W'(p) = W + U·diag(s ⊙ (c·z − 1))·Vᵀ."""

    def __init__(self, base: Mapping[str, torch.Tensor], factors: Mapping[str, Factors], init_mean: float = 0.1,
                 init_std: float = 0.01, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = list(factors)
        self.base = {n: base[n] for n in self.names}                     # live weights, never trained
        self.factors = dict(factors)
        self.p = torch.nn.ParameterList(
            [torch.nn.Parameter(init_mean + init_std * torch.randn(factors[n].rank, generator=g))
             for n in self.names])                                        # [rank] each, fp32

    def z(self) -> dict[str, torch.Tensor]:
        return {n: torch.sigmoid(p.detach()) for n, p in zip(self.names, self.p)}

    def patched(self) -> dict[str, torch.Tensor]:
        """W'(p) per matrix, differentiable in p (fp32 delta, added to the weights in their dtype)."""
        return patched_weights(self.base, self.factors, {n: torch.sigmoid(p) for n, p in zip(self.names, self.p)})


class Trainer:
    def __init__(self, model: Any, tokenizer: Any, factors: Mapping[str, Factors], train: Any, valid: Any,
                 config: TrainConfig, run_dir: Path, *, expert_name: str, label: str, base_model: str = "",
                 base_fingerprint: str = ""):
        self.model, self.tok, self.cfg = model.eval(), tokenizer, config
        for prm in self.model.parameters():
            prm.requires_grad_(False)
        self.train, self.valid, self.run_dir = train, valid, Path(run_dir)
        self.meta = dict(name=expert_name, label=label, base_model=base_model, base_fingerprint=base_fingerprint)
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.policy = SVFPolicy({n: params[n].data for n in factors}, {n: f.to(device) for n, f in factors.items()},
                                config.init_mean, config.init_std, config.seed).to(device)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=config.lr)
        self.rng = random.Random(config.seed)
        self.step_no, self.best_acc, self.best_z, self.history = 0, -1.0, self.policy.z(), []
        self.rollouts = Rollouts(model, tokenizer, config.max_new_tokens, config.temperature, config.batch_size)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._resume()

    # -- one update ------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        # 1. batch
        batch = self.rng.sample(self.train.examples, min(self.cfg.batch_size, len(self.train.examples)))
        if self.cfg.objective == "labels":
            return self._label_step(batch, t0)
        if self.cfg.objective == "likelihood":
            return self._likelihood_step(batch, t0)
        # 2. rollouts under the current z
        patched = {n: w.detach() for n, w in self.policy.patched().items()}
        (enc, comp), texts = self.rollouts.generate(self.rollouts.prompts(batch, self.train), patched)
        # 3. rewards
        r = torch.tensor([self.train.reward(t, e) for t, e in zip(texts, batch)], device=comp.device)   # [B]
        # 4. loss with gradients through W'(p)
        logp, logp_all, m = self.rollouts.token_logprobs(enc, comp, self.policy.patched())
        seq_logp = (logp * m).sum(1) / m.sum(1).clamp_min(1)                       # [B]
        advantage = r - r.mean() if self.cfg.baseline else r                        # [B]
        loss = -(advantage * seq_logp).mean()
        kl = torch.zeros((), device=comp.device)
        if self.cfg.kl_coef > 0:
            with torch.no_grad():
                _, base_all, _ = self.rollouts.token_logprobs(enc, comp, None)
            kl_tok = (logp_all.exp() * (logp_all - base_all)).sum(-1)            # [B, new]
            kl = (kl_tok * m).sum() / m.sum().clamp_min(1)
            loss = loss + self.cfg.kl_coef * kl
        # 5. update
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step_no += 1
        row = {"step": self.step_no, "loss": float(loss.detach()), "reward": float(r.mean()),
               "train_acc": float((r > 0).float().mean()), "kl": float(kl.detach()), "grad_norm": float(gnorm),
               "seconds": round(time.perf_counter() - t0, 2)}
        return row

    def _likelihood_step(self, batch: list[Any], t0: float) -> dict[str, float]:
        """The supervised alternative for a task with reference answers (`task.reference_text`: GSM8K's
        worked solution ending in "The answer is N."): loss = −mean log π'(y*|x) over the reference's tokens
        and the end-of-turn token after it, + kl_coef · mean KL(π' ‖ π) on those positions, with gradients
        through W'(p) as in REINFORCE; no rollouts, so a step costs one forward and backward. `reward` in
        the log is the mean per-token log-likelihood of the references, before the update."""
        enc, ids = self.rollouts.encode_answers(self.rollouts.prompts(batch, self.train),
                                                [self.train.reference_text(e) for e in batch], end=True)
        logp, logp_all, m = self.rollouts.token_logprobs(enc, ids, self.policy.patched())   # [B, L] each
        loglik = (logp * m).sum() / m.sum().clamp_min(1)
        loss = -loglik
        kl = torch.zeros((), device=ids.device)
        if self.cfg.kl_coef > 0:
            with torch.no_grad():
                _, base_all, _ = self.rollouts.token_logprobs(enc, ids, None)
            kl = ((logp_all.exp() * (logp_all - base_all)).sum(-1) * m).sum() / m.sum().clamp_min(1)
            loss = loss + self.cfg.kl_coef * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step_no += 1
        return {"step": self.step_no, "loss": float(loss.detach()), "reward": float(loglik.detach()),
                "kl": float(kl.detach()), "grad_norm": float(gnorm), "seconds": round(time.perf_counter() - t0, 2)}

    def _label_step(self, batch: list[Any], t0: float) -> dict[str, float]:
        """The supervised alternative for a choice task (one with `.choices`, the labels, and each example's
        `.answer` one of them; the classifier task): the server decides by the likelihood of each label after
        the prompt, so train that decision directly: loss = cross-entropy of the true label's first token
        among the labels' first tokens (the tokens after them, e.g. "ing}" of "reasoning}", are all but
        certain once the first is chosen), with gradients through W'(p) as in REINFORCE; no rollouts.
        `reward` in the log is the batch accuracy of that choice, before the update."""
        choices = list(self.train.choices)
        first = self.rollouts.choice_tokens(self.rollouts.prompts(batch[:1], self.train)[0], choices)
        logp = self.rollouts.choice_logprobs(self.rollouts.prompts(batch, self.train), first,
                                             self.policy.patched())                              # [B, C]
        target = torch.tensor([choices.index(e.answer) for e in batch], device=logp.device)      # [B]
        loss = torch.nn.functional.nll_loss(logp, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step_no += 1
        acc = float((logp.argmax(-1) == target).float().mean())
        return {"step": self.step_no, "loss": float(loss.detach()), "reward": acc, "train_acc": acc, "kl": 0.0,
                "grad_norm": float(gnorm), "seconds": round(time.perf_counter() - t0, 2)}

    def accuracy(self, task: Any, z: Mapping[str, torch.Tensor] | None = None, limit: int | None = None) -> float:
        """Greedy accuracy on `task` under z (None: the current policy)."""
        weights = self.policy.patched() if z is None else patched_weights(self.policy.base, self.policy.factors, z)
        weights = {n: w.detach() for n, w in weights.items()}
        if self.cfg.objective == "labels":          # the choice among the labels, as the server makes it
            examples = task.examples[:limit or self.cfg.val_size]
            choices = list(task.choices)
            first = self.rollouts.choice_tokens(self.rollouts.prompts(examples[:1], task)[0], choices)
            right = 0
            with torch.no_grad():
                for i in range(0, len(examples), self.cfg.batch_size):
                    chunk = examples[i:i + self.cfg.batch_size]
                    pick = self.rollouts.choice_logprobs(self.rollouts.prompts(chunk, task), first, weights).argmax(-1)
                    right += sum(choices[int(k)] == e.answer for k, e in zip(pick, chunk))
            return right / max(1, len(examples))
        return self.rollouts.accuracy(task, weights, limit or self.cfg.val_size)

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, progress: bool = True) -> list[dict[str, float]]:
        """Train until `steps`; validate every `val_every` steps (and at step 0), keep the best z."""
        if self.step_no == 0 and not self.history:
            base_acc = self.accuracy(self.valid)
            self._record({"step": 0, "val_acc": base_acc})
            self.best_acc, self.best_z = base_acc, self.policy.z()
        bar = tqdm(total=self.cfg.steps, initial=self.step_no, desc=f"train {self.meta['name']}", disable=not progress)
        while self.step_no < self.cfg.steps:
            row = self.step()
            if self.step_no % self.cfg.val_every == 0 or self.step_no == self.cfg.steps:
                row["val_acc"] = self.accuracy(self.valid)
                if row["val_acc"] > self.best_acc:
                    self.best_acc, self.best_z = row["val_acc"], self.policy.z()
                self._record(row)
                self._checkpoint()
            else:
                self._record(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:+.2f}", val=f"{self.best_acc:.2f}")
        bar.close()
        self.plot()
        return self.history

    def save_expert(self, path: Path, description: str = "") -> Path:
        e = Expert(name=self.meta["name"], z={n: t.cpu() for n, t in self.best_z.items()}, label=self.meta["label"],
                   description=description or f"SVF/{self.cfg.objective}, best validation accuracy {self.best_acc:.3f}",
                   base_model=self.meta["base_model"], base_fingerprint=self.meta["base_fingerprint"])
        return e.save(path)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _record(self, row: dict[str, float]) -> None:
        self.history.append(row)
        with open(self.run_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("%s", row)

    def _checkpoint(self) -> None:
        state = {f"p.{n}": p.detach().cpu() for n, p in zip(self.policy.names, self.policy.p)}
        state.update({f"best.{n}": z.cpu() for n, z in self.best_z.items()})
        save_file(state, str(self.run_dir / "checkpoint.safetensors"),
                  metadata={"step": str(self.step_no), "best_acc": str(self.best_acc),
                            "config": json.dumps(asdict(self.cfg))})
        torch.save(self.opt.state_dict(), self.run_dir / "optimizer.pt")

    def _resume(self) -> None:
        ckpt = self.run_dir / "checkpoint.safetensors"
        if not ckpt.exists():
            return
        from safetensors import safe_open
        with safe_open(str(ckpt), framework="pt") as fh:
            meta = fh.metadata()
        state = load_file(str(ckpt))
        with torch.no_grad():
            for n, p in zip(self.policy.names, self.policy.p):
                p.copy_(state[f"p.{n}"])
        self.best_z = {n: state[f"best.{n}"] for n in self.policy.names}
        self.step_no, self.best_acc = int(meta["step"]), float(meta["best_acc"])
        opt = self.run_dir / "optimizer.pt"
        if opt.exists():
            self.opt.load_state_dict(torch.load(opt, weights_only=True))
        logf = self.run_dir / "log.jsonl"
        if logf.exists():
            self.history = [json.loads(line) for line in logf.read_text().splitlines() if line.strip()]
            self.history = [h for h in self.history if h["step"] <= self.step_no]
            logf.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        log.info("resumed %s at step %d (best validation accuracy %.3f)", self.run_dir, self.step_no, self.best_acc)

    def plot(self) -> Path | None:
        """reward and validation accuracy per step → run_dir/curve.png (skipped without matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [h["step"] for h in self.history if "reward" in h]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        reward = "train log-likelihood (per token)" if self.cfg.objective == "likelihood" else "train reward"
        ax.plot(steps, [h["reward"] for h in self.history if "reward" in h], label=reward, alpha=0.6)
        val = [(h["step"], h["val_acc"]) for h in self.history if "val_acc" in h]
        if val:
            ax.plot(*zip(*val), "o-", label="validation accuracy")
        ax.set_xlabel("step")
        method = {"labels": "label cross-entropy", "likelihood": "reference likelihood"}.get(self.cfg.objective,
                                                                                         "REINFORCE")
        ax.set_title(f"SVF {method}: {self.meta['name']}")
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / "curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
