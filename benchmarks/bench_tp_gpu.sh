#!/usr/bin/env bash
# GPU: vLLM tensor parallelism TP=1 vs TP=2 (issue 11) with vLLM's own `bench serve` (random 64-token prompts,
# 128 output tokens, --ignore-eos, seed 1) at 8 and 32 clients, one run, ratios printed at the end.
# Needs the CUDA vllm and, for TP=2, two GPUs (otherwise only TP=1 runs). Uses --tensor-parallel-size
# (ServerConfig, issue 11 part 1).
#
#   MODEL=/models/<HF folder> bash benchmarks/bench_tp_gpu.sh [N]     # default: the embedded SmolLM2
set -u
N=${1:-128}; PY=${T2_VENV:-.venv}/bin/python; OUT=${OUT:-$(mktemp -d)}; PORT=${PORT:-18890}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-$PWD}
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$GPUS" -ge 1 ] || { echo "no GPU (nvidia-smi -L lists none)"; exit 1; }
cat > "$OUT/bench.py" <<'PY'
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))
PY
if [ -n "${MODEL:-}" ]; then SERVE=(--model "$MODEL"); TOK=$MODEL; ID=$(basename "$MODEL")
else SERVE=(); TOK=${TOK:-$HOME/.cache/t2/models/SmolLM2-135M-Instruct}; ID=SmolLM2-135M-Instruct; fi
SP=
stop() { [ -n "$SP" ] && kill -TERM "$SP" 2>/dev/null && { timeout 120 tail --pid="$SP" -f /dev/null; kill -KILL "$SP" 2>/dev/null; }; SP=; }
trap stop EXIT
for tp in 1 2; do
  [ "$tp" -le "$GPUS" ] || { echo "TP=$tp: only $GPUS GPU(s), skipped"; continue; }
  $PY -m server.cli serve --engine vllm --port $PORT --tensor-parallel-size $tp "${SERVE[@]}" > "$OUT/tp$tp.server.log" 2>&1 & SP=$!
  ok=
  for _ in $(seq 1 1200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' localhost:$PORT/health)" = 200 ] && { ok=1; break; }
    kill -0 $SP 2>/dev/null || break; sleep 1
  done
  [ -n "$ok" ] || { echo "TP=$tp: server did not start (see $OUT/tp$tp.server.log)"; stop; continue; }
  for c in 8 32; do
    $PY "$OUT/bench.py" --backend openai-chat --endpoint /v1/chat/completions --base-url http://127.0.0.1:$PORT \
      --model "$ID" --tokenizer "$TOK" --dataset-name random --random-input-len 64 --random-output-len 128 \
      --num-prompts $N --max-concurrency $c --ignore-eos --seed 1 --save-result --result-dir "$OUT" \
      --result-filename "tp$tp-c$c.json" > "$OUT/tp$tp-c$c.log" 2>&1
    $PY -c "import json; d=json.load(open('$OUT/tp$tp-c$c.json')); print(f\"TP=$tp c=$c: {d['completed']} ok, {d['output_throughput']:.1f} tok/s, TTFT p50 {d['median_ttft_ms']:.0f} ms, TPOT p50 {d['median_tpot_ms']:.1f} ms\")"
  done
  stop
done
$PY - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for c in (8, 32):
    a, b = out / f"tp1-c{c}.json", out / f"tp2-c{c}.json"
    if a.exists() and b.exists():
        a, b = json.loads(a.read_text()), json.loads(b.read_text())
        print(f"c={c}: TP=2 vs TP=1 throughput x{b['output_throughput'] / a['output_throughput']:.2f}, "
              f"TPOT p50 x{b['median_tpot_ms'] / a['median_tpot_ms']:.2f}")
PY
