#!/usr/bin/env bash
# Step 7 of the SmolLM2 recipe: the shipped expert set measured on test sets big enough to tell a gain from
# noise (issue 12): 200 examples per family from the held-out generator (experts/tasks/generate/heldout.py:
# other templates than the training generators, seed 3; the files are committed in
# experts/recipes/eval-smollm2-n200/data/ and rebuilt identically here) and all 164 HumanEval problems,
# through the vLLM engine. Variants: base, each expert on its own family (HumanEval counts as code), the
# `prompt` and `classifier` strategies on every task, the few-shot profile on HumanEval. Writes eval.json
# (per-example results), eval.md (intervals, McNemar p against base, the mixed table) and eval.png.
# Redraw without a server: t2 eval --from-json experts/recipes/eval-smollm2-n200/eval.json --out experts/recipes/eval-smollm2-n200
#
#   bash experts/recipes/eval-smollm2-n200.sh      (from the repository root; BUDGET=minutes bounds the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
T2=${T2:-.venv/bin/t2}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8766}
OUT=experts/recipes/eval-smollm2-n200
$PY - <<'PYEOF'
from experts.tasks.base import write_jsonl
from experts.tasks.generate.heldout import heldout_rows
for kind, name in (("arithmetic", "math"), ("programs", "code"), ("choice", "reasoning")):
    write_jsonl(f"experts/recipes/eval-smollm2-n200/data/{name}.jsonl", heldout_rows(kind, 200, seed=3))
PYEOF
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
$T2 serve --engine vllm --dtype float32 --port "$PORT" --max-batch 32 --log-level warning & SERVER=$!
trap 'kill $SERVER; wait $SERVER' EXIT
until curl -sf "localhost:$PORT/health" >/dev/null; do sleep 5; done
$T2 eval --url "http://127.0.0.1:$PORT" --task "math:gsm8k:$OUT/data/math.jsonl" \
    --task "code:mbpp:$OUT/data/code.jsonl" --task "reasoning:arc:$OUT/data/reasoning.jsonl" --task code:humaneval \
    --limit 200 --max-tokens 160 --concurrency 32 --own-task --timing-samples 0 --time-budget "${BUDGET:-0}" --out "$OUT"
