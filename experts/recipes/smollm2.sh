#!/usr/bin/env bash
# The recipe of the expert set shipped for SmolLM2-135M-Instruct (experts/data/SmolLM2-135M-Instruct/):
# generated training data (GSM8K / MBPP / ARC formats, seeded), one SVF expert per family with REINFORCE,
# the classification expert, then `t2 eval` against a server that loads them. Each step is one command;
# each `t2 train` resumes from its run folder if interrupted. Sized for a 2-core CPU (about 30 min an expert
# on an idle machine); on a GPU raise --batch-size and --max-new-tokens.
#
#   bash experts/recipes/smollm2.sh            (from the repository root, with the venv of the README)
set -euo pipefail
cd "$(dirname "$0")/../.."
T2=${T2:-.venv/bin/t2}
PY=${PY:-.venv/bin/python}
DATA=runs/data
OUT=experts/data/SmolLM2-135M-Instruct
mkdir -p "$DATA" "$OUT"

# 1. data: train and held-out test files per family (different seeds)
$PY - <<'PYEOF'
from experts.tasks.generate import write
for kind, name in (("arithmetic", "math"), ("programs", "code"), ("choice", "reasoning")):
    write(kind, f"runs/data/{name}_train.jsonl", 400, seed=1)
    write(kind, f"runs/data/{name}_test.jsonl", 100, seed=2)
PYEOF

# 2. the three experts and the classification expert (reward ±1 with the batch-mean baseline, greedy rollouts,
#    validation every 8 steps keeping the best z). Two runs at a time, one thread each (small batches do not
#    scale across the 2 cores). lr 5e-3 instead of the reference's 2e-3: 24 steps of batch 8 here against
#    hundreds of steps of batch 256 there. The code expert was trained first, before the baseline existed,
#    with the reference's estimator at lr 1e-2 for 30 steps; its line says so. The same settings without
#    the baseline collapsed math to 0 % (see the README).
COMMON=(--steps 24 --batch-size 8 --lr 5e-3 --grad-clip 1e-3 --val-every 8 --val-size 32 --valid-size 32 --out "$OUT")
train() { local name=$1; shift; mkdir -p "runs/$name"; OMP_NUM_THREADS=1 "$@" --run-dir "runs/$name" "${COMMON[@]}" \
    "${EXTRA[@]}" >"runs/$name/train.out" 2>&1 & }
EXTRA=()
train math $T2 train math --task gsm8k --data "$DATA/math_train.jsonl" --label math --max-new-tokens 96 \
    --description "arithmetic word problems (GSM8K format)"
EXTRA=(--no-baseline --lr 1e-2 --steps 30 --val-every 10)
train code $T2 train code --task mbpp --data "$DATA/code_train.jsonl" --label code --max-new-tokens 128 \
    --description "small Python functions (MBPP format)"
EXTRA=()
wait
train reasoning $T2 train reasoning --task arc --data "$DATA/reasoning_train.jsonl" --label reasoning \
    --max-new-tokens 48 --description "multiple-choice reasoning (ARC format)"
wait
# 2b. (issue 12) math and code again, as shipped now: at n = 200 on the held-out generator's templates the runs
#     above were below the base (math 6.5 vs 9.5, code 40.5 vs 48.0, p = 0.004). KL 0.1 to the base, lr 5e-3,
#     mean baseline, 16 steps, validation every 4; math selected on 32 rows of the held-out generator's seed 4
#     that are not in its seed-3 test set (the code generator of heldout.py has ~200 distinct tasks, all but 4
#     in the test set, so code is still selected on its own generator's rows).
$PY - <<'PYEOF'
import json
from experts.tasks.base import write_jsonl
from experts.tasks.generate.heldout import heldout_rows
test = {json.loads(l)["question"] for l in open("experts/recipes/eval-smollm2-n200/data/math.jsonl")}
rows, seen = [], set()
for r in heldout_rows("arithmetic", 2000, seed=4):
    if r["question"] not in test and r["question"] not in seen:
        seen.add(r["question"]); rows.append(r)
write_jsonl("runs/data/math_select.jsonl", rows[:32])
PYEOF
COMMON=(--steps 16 --batch-size 8 --lr 5e-3 --kl-coef 0.1 --grad-clip 1e-3 --val-every 4 --val-size 32 --valid-size 32
        --out runs/kl-out --device cpu)
OMP_NUM_THREADS=1 $T2 train math-kl --task gsm8k --data "$DATA/math_train.jsonl" --valid-data runs/data/math_select.jsonl \
    --label math --max-new-tokens 96 --run-dir runs/math-kl "${COMMON[@]}" \
    --description "arithmetic word problems (GSM8K format), KL 0.1, selected on the held-out generator (seed 4, no test row)" \
    >runs/math-kl.out 2>&1 &
OMP_NUM_THREADS=1 $T2 train code-kl --task mbpp --data "$DATA/code_train.jsonl" --label code --max-new-tokens 128 \
    --run-dir runs/code-kl "${COMMON[@]}" --description "small Python functions (MBPP format), KL 0.1, mean baseline, lr 5e-3" \
    >runs/code-kl.out 2>&1 &
wait     # code-kl shipped as $OUT/code.safetensors (the file's stem is the expert's name)
# 2c. (issue 12) math by supervised likelihood instead of REINFORCE (shipped as $OUT/math.safetensors; math-kl
#     kept in runs-smollm2/math-kl/): the next-token likelihood of the training generator's worked solutions
#     ("4 + 7 = 11\nThe answer is 11.", the instruction's form), levels 1-3 (all four operations, one and two
#     steps; 400 rows each, seed 1), no rollouts, so 96 steps fit in 13 min; selected on the same 32 seed-4
#     rows as 2b (21.9 → 71.9 % at step 16, against 25.0 % for math-kl). Decided after math-kl's test result
#     (+3.0, p = 0.35), with its settings fixed before its own test run. Its test at n = 200: 9.5 → 47.5 %,
#     p = 1.9e-15 (eval-smollm2-n200/; math-kl's run kept in eval-smollm2-n200-v2/).
$PY - <<'PYEOF'
import random
from experts.tasks.base import write_jsonl
from experts.tasks.generate import generate
train = [r for level in (1, 2, 3) for r in generate("arithmetic", 400, seed=1, level=level)]
random.Random(1).shuffle(train)
write_jsonl("runs/data/math_sft_train.jsonl", train)
PYEOF
$T2 train math-sft --task gsm8k --data "$DATA/math_sft_train.jsonl" --valid-data runs/data/math_select.jsonl \
    --label math --objective likelihood --steps 96 --batch-size 8 --lr 5e-3 --grad-clip 1e-3 --val-every 16 \
    --val-size 32 --valid-size 32 --max-new-tokens 96 --device cpu --run-dir runs/math-sft --out runs/sft-out \
    --description "arithmetic word problems (GSM8K format): likelihood of worked solutions (training generator, levels 1-3), selected on the held-out generator (seed 4, no test row)" \
    >runs/math-sft.out 2>&1
cp runs/sft-out/math-sft.safetensors "$OUT/math.safetensors"     # the stem is the expert's name: math
# 3. the classification expert (runs-smollm2/classifier-labels): the dispatch prompt answered with each
#    source's label, on every label including `other`: the routing templates (experts/tasks/generate/routing.py,
#    train split seed 1, validation on the templates held out of it, seed 2) plus 100 rows of each generator
#    above; cross-entropy over the four labels the first pass scores (--objective labels) instead of
#    REINFORCE. It was run with --steps 40 and stopped after the step-16 validation for time; the committed
#    recipe.json is the resume with --steps 16 that saved it. (The previous classifier: REINFORCE, 24 steps,
#    only the GSM8K / MBPP / ARC sources, --max-new-tokens 4; runs-smollm2/classifier.)
$PY - <<'PYEOF'
from experts.tasks.base import write_jsonl
from experts.tasks.generate import write
from experts.tasks.generate.routing import routing_rows
rows = routing_rows(1600, 1, "train")
for label, keep in (("code", 300), ("math", 300), ("reasoning", 300), ("other", 400)):   # 400 per label in all
    write_jsonl(f"runs/data/routing_train/{label}.jsonl",
                [{"prompt": r["prompt"], "template": r["template"]} for r in rows if r["label"] == label][:keep])
valid = routing_rows(400, 2, "valid")
for label in ("code", "math", "reasoning", "other"):
    write_jsonl(f"runs/data/routing_valid/{label}.jsonl",
                [{"prompt": r["prompt"], "template": r["template"]} for r in valid if r["label"] == label])
for kind, name in (("arithmetic", "math"), ("programs", "code"), ("choice", "reasoning")):
    write(kind, f"runs/data/clf_{name}.jsonl", 100, seed=1)
PYEOF
R=$DATA/routing_train V=$DATA/routing_valid
mkdir -p runs/classifier-labels
OMP_NUM_THREADS=1 $T2 train-classifier classifier --objective labels \
    --source "code:prompts:$R/code.jsonl" --source "code:mbpp:$DATA/clf_code.jsonl" \
    --source "math:prompts:$R/math.jsonl" --source "math:gsm8k:$DATA/clf_math.jsonl" \
    --source "reasoning:prompts:$R/reasoning.jsonl" --source "reasoning:arc:$DATA/clf_reasoning.jsonl" \
    --source "other:prompts:$R/other.jsonl" \
    --valid-source "code:prompts:$V/code.jsonl" --valid-source "math:prompts:$V/math.jsonl" \
    --valid-source "reasoning:prompts:$V/reasoning.jsonl" --valid-source "other:prompts:$V/other.jsonl" \
    --steps 16 --batch-size 8 --lr 2e-2 --grad-clip 1e-3 --val-every 8 --val-size 40 --valid-size 40 \
    --description "the dispatch classification expert (label cross-entropy, routing templates + GSM8K/MBPP/ARC formats)" \
    --run-dir runs/classifier-labels --out "$OUT" >runs/classifier-labels/train.out 2>&1
tail -n 1 runs/{math,code,reasoning,classifier-labels}/train.out

# 4. few-shot adaptation for a task no expert was trained on (HumanEval): CEM over the weights of the three
#    experts and of the base weights (--with-base, the default) on the last 16 problems, scored by the
#    log-likelihood of their reference solutions (no generation: a score that moves where no mix solves a
#    shot); saved as a profile that records its shots, which `t2 eval` leaves out of its score.
#    8 × 4 = 32 evaluations (30-40 s each here) against the paper's population 32 for up to 50 iterations.
#    (The previous profile: accuracy on 8 shots, 6 × 2, no mix solved any: runs-smollm2/humaneval-fewshot/.)
$T2 fewshot humaneval-fewshot --task humaneval --shots 16 --offset 148 --population 8 --iterations 4 \
    --score loglik --out "$OUT" 2>&1 | tee runs/fewshot.out | tail -n 1

# 5. evaluation through the server, which loads the experts above by default: each expert on the tasks of its
#    family (Table 1), base / prompt / classifier / the profile on every task (Table 2: HumanEval is the
#    held-out task), routing accuracy; then the time of the two passes with one request at a time (Table 3).
#    (The committed accuracy run predates --timing-samples, so its eval.md names the command without it.)
$T2 serve --port 8765 --log-level warning & SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8765/health >/dev/null; do sleep 2; done
TASKS=(--task "math:gsm8k:$DATA/math_test.jsonl" --task "code:mbpp:$DATA/code_test.jsonl"
       --task "reasoning:arc:$DATA/reasoning_test.jsonl" --task code:humaneval)
$T2 eval --url http://127.0.0.1:8765 "${TASKS[@]}" --limit 40 --max-tokens 160 --concurrency 16 --own-task \
    --timing-samples 0 --out experts/recipes/eval-smollm2
$T2 eval --url http://127.0.0.1:8765 "${TASKS[@]}" --limit 0 --timing-samples 5 --max-tokens 160 \
    --out experts/recipes/eval-smollm2-timing
# 6. routing on the held-out routing set (tests/data/routing/heldout.jsonl, never trained on): per-label
#    accuracy and confusion matrices of `prompt` and `classifier` through the same server
$PY -m clients.routing --url http://127.0.0.1:8765 --out experts/recipes/routing-smollm2/after
# 7. the same set on 200 held-out examples per family (other templates than the training data) and all of
#    HumanEval, through the vLLM engine, with McNemar tests against base and the mixed (pooled) table:
#    experts/recipes/eval-smollm2-n200/ (it starts its own server; stop the one above first on a small machine)
bash experts/recipes/eval-smollm2-n200.sh
