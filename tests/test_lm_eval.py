"""lm-evaluation-harness against the running server: its `local-completions` model on a local task file.

The harness scores each choice of a multiple-choice question by the log-likelihood of the choice after the
question, from /v1/completions with echo=true, max_tokens=1, logprobs=1 and token-id prompts. The check: it
runs, and every log-likelihood it got, and so its accuracy, is what the model gives when scored directly
with transformers (the same token split as the harness: context, then the continuation's tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extras: pip install -e '.[test]'")

HERE = Path(__file__).parent / "lm_eval"
TASK = "t2_easy_mc"


def task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    (d / f"{TASK}.yaml").write_text((HERE / f"{TASK}.yaml").read_text().replace(
        "DATA_FILE", str((HERE / "easy_mc.jsonl").resolve())))
    return d


def run_harness(url: str, model: str, tokenizer: Path, tasks: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    return simple_evaluate(
        model="local-completions",
        model_args=f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tokenizer},num_concurrent=1,max_retries=1,tokenized_requests=True",
        tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def direct_loglikelihoods(model_dir: Path, docs: list[dict]) -> list[list[float]]:
    """Σ log p(continuation tokens | context) per choice, as the harness splits them (`_encode_pair`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for d in docs:
        row = []
        for choice in d["choices"]:
            context, cont = d["question"], " " + choice          # the task's target_delimiter is " "
            whole = tok(context + cont, add_special_tokens=False)["input_ids"]
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(lm(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            row.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        out.append(row)
    return out


def test_lm_eval_local_completions_scores_as_the_model_does(live, tiny_model_dir, tmp_path):
    docs = [json.loads(line) for line in (HERE / "easy_mc.jsonl").read_text().splitlines()]
    res = run_harness(live.url, "tiny-llama", tiny_model_dir, task_dir(tmp_path))
    want = direct_loglikelihoods(tiny_model_dir, docs)
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for s, w in zip(samples, want):
        got = [r[0] for r in s["filtered_resps"]]
        assert got == pytest.approx(w, abs=1e-3)
    implied = sum(max(range(len(w)), key=w.__getitem__) == d["answer"] for w, d in zip(want, docs)) / len(docs)
    assert res["results"][TASK]["acc,none"] == pytest.approx(implied)
