#!/usr/bin/env bash
# (issue 12, the retraining record) bash experts/recipes/eval-smollm2-n200-kl.sh, from anywhere: loads only these two experts
# the KL-regularised math and code experts on the n=200 held-out sets (seed 3), through the vLLM engine
set -euo pipefail
cd "$(dirname "$0")/../.."
D=$(mktemp -d); cp experts/recipes/runs-smollm2/math-kl/math-kl.safetensors experts/recipes/runs-smollm2/code-kl/code-kl.safetensors "$D"/
OUT=experts/recipes/eval-smollm2-n200-kl
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1
.venv/bin/t2 serve --engine vllm --dtype float32 --port 8767 --max-batch 32 --experts "$D" --log-level warning & SERVER=$!
trap 'kill $SERVER; wait $SERVER' EXIT
until curl -sf localhost:8767/health >/dev/null; do sleep 5; done
.venv/bin/t2 eval --url http://127.0.0.1:8767 --task "math:gsm8k:experts/recipes/eval-smollm2-n200/data/math.jsonl" \
    --task "code:mbpp:experts/recipes/eval-smollm2-n200/data/code.jsonl" --limit 200 --max-tokens 160 \
    --concurrency 32 --own-task --timing-samples 0 --out "$OUT"
