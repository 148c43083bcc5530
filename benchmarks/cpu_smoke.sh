#!/usr/bin/env bash
# CPU check of CI: a tiny `all` run of the benchmark tool (VGG A, batch 2, 32x32, fp32, no compile;
# about 20 s on 2 cores) and its schema check, so a broken tool fails; then the regression gate:
# how much faster the native kernels run than eager PyTorch on a fixed set of blocks, measured in
# this run (paired calls in one process), against the ratios in benchmarks/baselines/cpu-gate.json
# (vgg_kernels/bench/gate.py; about 40 s). Ratios, not times: another or a busy machine moves
# both sides of a ratio alike, a slower kernel only one. A regression must show in two runs in
# a row.
#
#   bash benchmarks/cpu_smoke.sh                    # CI: run, validate, gate
#   bash benchmarks/cpu_smoke.sh --update-baseline  # rewrite benchmarks/baselines/cpu-gate.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# One thread: with several, a busy neighbour on the shared cores stalls every intra-op barrier
# (seen here: 0.5 ms blocks taking 16-24 ms while another job ran).
GATE=(gate --threads 1 --repeats 15)

if [ "${1:-}" = "--update-baseline" ]; then
    "$PY" -m vgg_kernels.bench "${GATE[@]}" --write-baseline
    exit 0
fi
OUT=${OUT:-$(mktemp -d)}
"$PY" -m vgg_kernels.bench all --device cpu --config A --batch 2 --resolution 32 --dtype fp32 \
    --warmup 1 --repeats 3 --model-repeats 2 --no-compile --threads 1 --quiet \
    --out "$OUT/cpu-smoke.json"
"$PY" -m vgg_kernels.bench validate "$OUT/cpu-smoke.json"
for attempt in 1 2; do
    status=0
    "$PY" -m vgg_kernels.bench "${GATE[@]}" --out "$OUT/cpu-gate-$attempt.json" || status=$?
    if [ "$status" -ne 1 ]; then
        exit "$status"  # 0: no regression; 2: errors
    fi
    echo "cpu_smoke: regression in run $attempt of 2"
done
exit 1
