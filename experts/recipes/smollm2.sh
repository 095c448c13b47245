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

# 2. the three experts (reward ±1, greedy rollouts, validation every 5 steps keeping the best z)
COMMON=(--steps 40 --batch-size 8 --lr 2e-3 --grad-clip 1e-3 --val-every 5 --val-size 32 --valid-size 32 --out "$OUT")
$T2 train math --task gsm8k --data "$DATA/math_train.jsonl" --label math --max-new-tokens 96 \
    --run-dir runs/math "${COMMON[@]}" --description "arithmetic word problems (GSM8K format)"
$T2 train code --task mbpp --data "$DATA/code_train.jsonl" --label code --max-new-tokens 128 \
    --run-dir runs/code "${COMMON[@]}" --description "small Python functions (MBPP format)"
$T2 train reasoning --task arc --data "$DATA/reasoning_train.jsonl" --label reasoning --max-new-tokens 48 \
    --run-dir runs/reasoning "${COMMON[@]}" --description "multiple-choice reasoning (ARC format)"

# 3. the classification expert (the dispatch prompt answered with each source's label)
$T2 train-classifier classifier --source "math:gsm8k:$DATA/math_train.jsonl" \
    --source "code:mbpp:$DATA/code_train.jsonl" --source "reasoning:arc:$DATA/reasoning_train.jsonl" \
    --max-new-tokens 24 --run-dir runs/classifier "${COMMON[@]}"

# 4. evaluation through the server (base vs experts vs strategies; held-out files and HumanEval)
$T2 serve --port 8765 --log-level warning & SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8765/health >/dev/null; do sleep 2; done
$T2 eval --url http://127.0.0.1:8765 --task "math:gsm8k:$DATA/math_test.jsonl" \
    --task "code:mbpp:$DATA/code_test.jsonl" --task "reasoning:arc:$DATA/reasoning_test.jsonl" \
    --task code:humaneval --limit 100 --out experts/recipes/eval-smollm2
