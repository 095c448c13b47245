"""`t2 train`, `t2 train-classifier`, `t2 fewshot` and `t2 eval`: make experts and profiles, and measure them.

Contract: one module-level function per command; `register(app)` adds them to the `t2` app (server/cli.py).
`train` / `train-classifier` make experts with SVF (REINFORCE or a supervised objective,
experts/train/reinforce.py): each loads the base model (float32, CPU or a GPU), its cached SVD factors and
the task data, trains with progress and a log, and writes `<out>/<name>.safetensors` (the best validation
z) plus the run folder (log.jsonl, curve.png, checkpoint, recipe.json with every setting, so a run is
reproducible and resumable: the same command resumes it). `fewshot` searches mixing weights with CEM on a
few shots and saves a profile expert; `eval` measures a running server (clients/evaluate.py). Errors are
one line, exit code 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from experts.errors import ExpertError


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _run(name: str, label: str, task, valid_size: int, model: Optional[Path], out: Path, run_dir: Optional[Path],
         attention: bool, device: str, description: str, valid_task=None, **cfg) -> None:
    """1. model + factors; 2. split the task; 3. train; 4. save the best z as an expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experts.svd import ATTENTION_TARGETS, MLP_TARGETS, load_factors
    from experts.train.reinforce import TrainConfig, Trainer
    from server.default_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_default_model

    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    # 1. model + factors
    cache = default_cache_dir()
    model_dir = model or ensure_default_model(cache)
    base_name = DEFAULT_MODEL_NAME if model is None else model_dir.name
    targets = MLP_TARGETS + (ATTENTION_TARGETS if attention else ())
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    factors, fp = load_factors(model_dir, cache / "factors" / model_dir.name, targets, device=dev)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    # 2. split
    # (or a validation task of its own: a split disjoint by template, not only by example)
    if valid_task is not None:
        valid = valid_task.subset(slice(0, valid_size), f"{task.name}-valid")
        train = task.subset(slice(0, None), f"{task.name}-train")
    elif len(task.examples) <= valid_size:
        _fail(ValueError(f"{len(task.examples)} examples: need more than --valid-size {valid_size}"))
    else:
        valid = task.subset(slice(0, valid_size), f"{task.name}-valid")
        train = task.subset(slice(valid_size, None), f"{task.name}-train")
    # 3. train
    run_dir = run_dir or Path("runs") / name
    config = TrainConfig(**cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(
        {"argv": sys.argv, "name": name, "label": label, "model": str(model_dir), "fingerprint": fp,
         "task": task.name, "examples": len(task.examples), "valid_size": valid_size,
         "valid": {"examples": len(valid.examples), "own_file": valid_task is not None},
         "targets": list(targets), "config": vars(config)}, indent=1))
    trainer = Trainer(lm, tok, factors, train, valid, config, run_dir, expert_name=name, label=label,
                      base_model=base_name, base_fingerprint=fp)
    trainer.fit()
    # 4. save
    path = trainer.save_expert(out / f"{name}.safetensors", description)
    base_acc = trainer.history[0].get("val_acc")
    typer.echo(f"wrote {path}: validation accuracy {base_acc:.3f} (base) → {trainer.best_acc:.3f} (best); "
               f"log {run_dir / 'log.jsonl'}, plot {run_dir / 'curve.png'}")


_COMMON = dict(  # options several commands share
    valid_size=typer.Option(32, help="Examples held out for validation (the first N)."),
    model=typer.Option(None, help="Base model folder (default: the embedded model)."),
    out=typer.Option(Path("."), help="Folder for <name>.safetensors."),
    run_dir=typer.Option(None, help="Run folder (log, plot, checkpoint). Default: runs/<name>."),
    attention=typer.Option(False, help="Also adapt the attention projections."),
    device=typer.Option("auto", help="auto | cpu | cuda"),
    steps=typer.Option(50), batch_size=typer.Option(8), lr=typer.Option(2e-3), kl_coef=typer.Option(0.0),
    grad_clip=typer.Option(1e-3), max_new_tokens=typer.Option(96), temperature=typer.Option(0.0),
    baseline=typer.Option(True, help="Subtract the batch mean reward (--no-baseline: the reference)."),
    val_every=typer.Option(10), val_size=typer.Option(64), seed=typer.Option(0),
)


def train(name: str = typer.Argument(..., help="Expert name."),
          task: str = typer.Option(..., help="gsm8k | math | arc | mbpp | humaneval"),
          data: Optional[Path] = typer.Option(None, help="JSONL file of that format (not for humaneval)."),
          valid_data: Optional[Path] = typer.Option(None, help="A JSONL file of the same format for validation "
                                                    "(its first --valid-size rows; all of --data then trains)."),
          label: str = typer.Option(..., help="math | code | reasoning | ..."),
          description: str = typer.Option(""),
          valid_size: int = _COMMON["valid_size"], model: Optional[Path] = _COMMON["model"],
          out: Path = _COMMON["out"], run_dir: Optional[Path] = _COMMON["run_dir"],
          attention: bool = _COMMON["attention"], device: str = _COMMON["device"],
          steps: int = _COMMON["steps"], batch_size: int = _COMMON["batch_size"], lr: float = _COMMON["lr"],
          kl_coef: float = _COMMON["kl_coef"], grad_clip: float = _COMMON["grad_clip"],
          max_new_tokens: int = _COMMON["max_new_tokens"], temperature: float = _COMMON["temperature"],
          baseline: bool = _COMMON["baseline"],
          val_every: int = _COMMON["val_every"], val_size: int = _COMMON["val_size"],
          seed: int = _COMMON["seed"],
          objective: str = typer.Option("reinforce", help="reinforce (the paper's: reward ±1 on greedy "
                                        "rollouts) | likelihood (supervised: the log-likelihood of the task's "
                                        "reference answers, no rollouts; gsm8k)")) -> None:
    """Train an SVF expert on a task with REINFORCE (reward ±1) or reference likelihood; optional KL penalty."""
    from experts.tasks import load_task
    try:
        if objective not in ("reinforce", "likelihood"):
            raise ValueError(f"--objective must be reinforce or likelihood, not {objective!r}")
        t = load_task(task, data)
        v = load_task(task, valid_data) if valid_data is not None else None
    except (ValueError, OSError) as e:
        _fail(e)
    try:
        _run(name, label, t, valid_size, model, out, run_dir, attention, device, description, valid_task=v,
             steps=steps, batch_size=batch_size, lr=lr, kl_coef=kl_coef, grad_clip=grad_clip,
             max_new_tokens=max_new_tokens, temperature=temperature, baseline=baseline, val_every=val_every,
             val_size=val_size, seed=seed, objective=objective)
    except ExpertError as e:
        _fail(e)


def fewshot(name: str = typer.Argument(..., help="Profile name (served as <base>:<name>)."),
            task: str = typer.Option(..., help="gsm8k | math | arc | mbpp | humaneval"),
            data: Optional[Path] = typer.Option(None, help="JSONL file of that format."),
            shots: int = typer.Option(10, help="Labelled examples to search on (N from --offset)."),
            offset: int = typer.Option(0, help="Index of the first shot (keep the shots out of what you "
                                       "evaluate on: `t2 eval` uses the first --limit examples)."),
            experts: Optional[Path] = typer.Option(None, help="Experts to mix (default: the embedded ones)."),
            per_matrix: bool = typer.Option(False, help="One weight per expert per matrix (the "
                                            "reference's per_layer) instead of one per expert."),
            with_base: bool = typer.Option(True, help="The base weights (z' = 1) are one more component of "
                                           "the mix, so the search can choose less adaptation, or none."),
            population: int = typer.Option(32), iterations: int = typer.Option(50),
            elite_ratio: float = typer.Option(0.2), init_std: float = typer.Option(0.5),
            seed: int = typer.Option(0), max_new_tokens: int = typer.Option(96),
            score: str = typer.Option("accuracy", help="accuracy: accuracy on the shots, ties broken by the "
                                      "log-likelihood of the reference answers; loglik: that log-likelihood "
                                      "alone (no generation; it moves when no mix solves a shot)."),
            model: Optional[Path] = _COMMON["model"], out: Path = _COMMON["out"],
            device: str = _COMMON["device"]) -> None:
    """Few-shot adaptation: CEM over mixing weights on N shots; the result is saved as a profile expert."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experts.expert import Expert
    from experts.svd import load_factors
    from experts.tasks import load_task
    from experts.train.cem import CEMConfig
    from experts.train.fewshot import BASE_COMPONENT, PROFILE_LABEL, fewshot_profile
    from server.default_model import default_cache_dir, default_experts_dir, ensure_default_model

    try:
        t = load_task(task, data)
        cache = default_cache_dir()
        model_dir = model or ensure_default_model(cache)
        folder = experts or default_experts_dir()
        pool = {e.name: e for e in map(Expert.load, sorted(Path(folder).glob("*.safetensors")))
                if e.label not in ("classifier", PROFILE_LABEL)}
        if not pool:
            raise ValueError(f"no experts to mix in {folder}")
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        factors, fp = load_factors(model_dir, cache / "factors" / model_dir.name, device=dev)
        for e in pool.values():
            e.check_against({n: f.rank for n, f in factors.items()}, fp)
        if with_base:       # covers no matrix, so it counts as z = 1 everywhere (experts/train/cem.py: mixed_z)
            pool[BASE_COMPONENT] = Expert(name=BASE_COMPONENT, z={}, label="base")
    except (ValueError, OSError, ExpertError) as e:
        _fail(e)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    cfg = CEMConfig(population=population, elite_ratio=elite_ratio, iterations=iterations, init_std=init_std,
                    seed=seed)
    shot_indices = range(offset, min(offset + shots, len(t)))
    profile, result = fewshot_profile(lm, tok, factors, pool, t.subset(shot_indices), name,
                                      per_matrix=per_matrix, config=cfg, max_new_tokens=max_new_tokens,
                                      score=score, shot_indices=shot_indices)
    path = profile.save(out / f"{name}.safetensors")
    typer.echo(f"wrote {path}: {score} on the shots {result.score[0]:.3f} after {result.evaluations} "
               f"evaluations; {profile.description}")


def eval_(url: str = typer.Option("http://127.0.0.1:8000", help="A running t2 server."),
          task: Optional[list[str]] = typer.Option(None, "--task", help="LABEL:FORMAT[:FILE], e.g. "
                                                   "math:gsm8k:test.jsonl, code:humaneval (repeat)"),
          limit: int = typer.Option(50, help="Examples per task and variant (0: only the timing phase)."),
          max_tokens: int = typer.Option(256), concurrency: int = typer.Option(8),
          timing_samples: int = typer.Option(4, help="Requests per task and strategy sent one at a time "
                                             "after the accuracy phase, for the cost of the two passes."),
          own_task: bool = typer.Option(False, help="Run each expert only on the tasks of its label and "
                                        "each profile only on its own task (base and strategies on all)."),
          time_budget: float = typer.Option(0, help="Minutes after which no new accuracy request is sent "
                                            "(0: none); requests go out task by task in the order given, "
                                            "example by example within a task, so the cells stay paired "
                                            "over the examples answered by then."),
          from_json: Optional[Path] = typer.Option(None, help="Redraw the report of an earlier eval.json "
                                                   "(no server needed)."),
          api_key: Optional[str] = typer.Option(None, envvar="T2_API_KEY"),
          out: Path = typer.Option(Path("eval"), help="Folder for eval.md / eval.json / eval.png.")) -> None:
    """Accuracy (95 % CI) of base, experts, profiles and dispatch strategies; routing; two-pass cost."""
    import asyncio

    from clients.evaluate import evaluate, load_cells, report
    from experts.tasks import load_task
    if from_json is not None:
        try:
            cells = load_cells(from_json)
        except (ValueError, OSError, KeyError, TypeError) as e:
            _fail(e)
        made_by = from_json.parent / "eval.md"       # keep the command of the run that measured the cells
        first = made_by.read_text().splitlines()[0] if made_by.is_file() else ""
        command = first.removeprefix("Made by: `").removesuffix("`") if first.startswith("Made by") else ""
        typer.echo(report(cells, out, command).read_text())
        return
    if not task:
        _fail(ValueError("give at least one --task (or --from-json)"))
    try:
        tasks = []
        for spec in task:
            label, fmt, *path = spec.split(":", 2)
            t = load_task(fmt, path[0] if path else None)
            tasks.append((t, label))
    except (ValueError, OSError) as e:
        _fail(e)
    cells = asyncio.run(evaluate(url, tasks, limit, max_tokens, concurrency, api_key, own_task=own_task,
                                 timing=timing_samples, time_budget=time_budget))
    md = report(cells, out, " ".join(["t2"] + sys.argv[1:]))
    typer.echo(md.read_text())


def train_classifier(name: str = typer.Argument("classifier", help="Expert name."),
                     source: list[str] = typer.Option(..., "--source", help="LABEL:FORMAT[:FILE], e.g. "
                                                      "math:gsm8k:train.jsonl (repeat; labels: code, math, "
                                                      "reasoning, other)"),
                     description: str = typer.Option("the dispatch classification expert"),
                     valid_size: int = _COMMON["valid_size"], model: Optional[Path] = _COMMON["model"],
                     out: Path = _COMMON["out"], run_dir: Optional[Path] = _COMMON["run_dir"],
                     attention: bool = _COMMON["attention"], device: str = _COMMON["device"],
                     steps: int = _COMMON["steps"], batch_size: int = _COMMON["batch_size"],
                     lr: float = _COMMON["lr"], kl_coef: float = _COMMON["kl_coef"],
                     grad_clip: float = _COMMON["grad_clip"], max_new_tokens: int = typer.Option(24),
                     temperature: float = _COMMON["temperature"], baseline: bool = _COMMON["baseline"],
                     val_every: int = _COMMON["val_every"],
                     val_size: int = _COMMON["val_size"], seed: int = _COMMON["seed"],
                     valid_source: Optional[list[str]] = typer.Option(
                         None, "--valid-source", help="LABEL:FORMAT[:FILE] for validation only (repeat); "
                         "default: the first --valid-size examples of the sources."),
                     objective: str = typer.Option("reinforce", help="reinforce (the paper's) | labels "
                                                   "(cross-entropy over the labels the server scores)")
                     ) -> None:
    """Train the classification expert: the dispatch prompt answered with each source's label."""
    from dataclasses import replace

    from experts.tasks import load_task
    from experts.train.classifier import classification_task

    def labelled(specs: list[str]) -> list:
        out = []
        for s in specs:
            label, fmt, *path = s.split(":", 2)
            out.append(replace(load_task(fmt, path[0] if path else None), label=label))
        return out

    try:
        if objective not in ("reinforce", "labels"):
            raise ValueError(f"--objective must be reinforce or labels, not {objective!r}")
        t = classification_task(labelled(source), seed=seed)
        v = classification_task(labelled(valid_source), seed=seed) if valid_source else None
    except (ValueError, OSError) as e:
        _fail(e)
    _run(name, "classifier", t, valid_size, model, out, run_dir, attention, device, description, valid_task=v,
         objective=objective,
         steps=steps, batch_size=batch_size, lr=lr, kl_coef=kl_coef, grad_clip=grad_clip,
         max_new_tokens=max_new_tokens, temperature=temperature, baseline=baseline, val_every=val_every,
         val_size=val_size,
         seed=seed)


def register(app: typer.Typer) -> None:
    """Add the training and evaluation commands to the `t2` app (server/cli.py)."""
    app.command()(train)
    app.command()(fewshot)
    app.command("eval")(eval_)
    app.command("train-classifier")(train_classifier)
