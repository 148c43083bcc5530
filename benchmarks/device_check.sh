#!/usr/bin/env bash
# One bounded pass over a lent GPU: environment, build, GPU tests, benchmarks, one summary.
#
#   OUT=/some/dir VGG_KERNELS_COMMIT=<sha> bash benchmarks/device_check.sh [--quick]
#       [--part all|tests|bench]
#
# --quick leaves out the per-config Triton sweep. --part splits the pass over two device calls
# that each stay inside one call's time limit: `tests` (build, GPU tests), then `bench` (build,
# which is a no-op on a warm machine, and the benchmarks).
#
# Every step runs under `timeout` (LIMIT_BUILD, LIMIT_TESTS, LIMIT_NATIVE_PREFLIGHT,
# LIMIT_TRITON_PREFLIGHT, LIMIT_MEMORY, LIMIT_PERCEPTUAL, LIMIT_LAYERS_TRAIN, LIMIT_MODEL,
# LIMIT_LAYERS, LIMIT_NATIVE_AUTO, LIMIT_FIRST_ALT, LIMIT_NATIVE_WGMMA, LIMIT_NATIVE_HALO,
# LIMIT_NATIVE_HALO_T seconds override the defaults) and logs to $OUT/log.txt; a failing step
# does not stop the next. STEP_BUDGET bounds the whole pass (seconds since the script started;
# default 510 with --part bench, so that the pass and its summary fit one 600 s device call;
# none otherwise): a step's limit is cut to what is left of it, and a step with under 20 s left
# does not start (recorded as exit 124, as a timeout).
# $OUT/device_check.json records each step's status and time; the benchmark steps write their
# own JSON next to it. The last lines printed are the summary table.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
QUICK=0
PART=all
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --part) PART=${2:-all}; shift ;;
        *) echo "device_check.sh: unknown argument $1 (expected --quick, --part all|tests|bench)" >&2
           exit 2 ;;
    esac
    shift
done
case "$PART" in all|tests|bench) ;; *) echo "device_check.sh: --part must be all, tests or bench" >&2; exit 2 ;; esac
export VGG_KERNELS_COMMIT=${VGG_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export VGG_KERNELS_CUDA_ARCHS=${VGG_KERNELS_CUDA_ARCHS:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=()
if [ "$PART" = bench ]; then STEP_BUDGET=${STEP_BUDGET:-510}; else STEP_BUDGET=${STEP_BUDGET:-0}; fi

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ "$STEP_BUDGET" -gt 0 ]; then
        local left=$((STEP_BUDGET - SECONDS))
        if [ "$left" -lt 20 ]; then
            LAST_RC=124
            STEPS+=("$name 124 0")
            echo "=== $name: not started, ${left}s left of STEP_BUDGET=${STEP_BUDGET}s" >>"$LOG"
            echo "[$(date +%H:%M:%S)] $name: not started (STEP_BUDGET ${STEP_BUDGET}s spent)"
            return
        fi
        [ "$limit" -gt "$left" ] && limit=$left
    fi
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local began=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    LAST_RC=$rc
    local took=$((SECONDS - began))
    STEPS+=("$name $rc $took")
    echo "=== $name: exit $rc after ${took}s" >>"$LOG"
    echo "[$(date +%H:%M:%S)] $name: exit $rc after ${took}s"
}

# 1. environment
{
    echo "commit $VGG_KERNELS_COMMIT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name())"
    nvcc --version 2>&1 | tail -n 1
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" >>"$LOG"

# 2. build the C++/CUDA extension for this card only
if [ -f benchmarks/device_native.sh ]; then
    step build "${LIMIT_BUILD:-240}" bash benchmarks/device_native.sh build
fi

# 3. GPU tests: every backend against cuDNN, in GPU_TEST_SHARDS (8) parallel pytest processes
# from benchmarks/gpu_tests.py (the time goes into compiling and autotuning kernels, which is CPU
# work, one core per process on a 16-core machine; each process holds a CUDA context and at most
# a few hundred MB of test tensors, and autotuning keys include the batch, so nothing tuned under
# this contention is reused by the benchmarks' batch-64 runs). A kernel that faults (an illegal address leaves the process's CUDA context unusable) or
# kills its process costs its own test only: the shard goes on in a fresh process.
if [ "$PART" != bench ]; then
    step gpu-tests "${LIMIT_TESTS:-360}" $PY benchmarks/gpu_tests.py \
        --shards "${GPU_TEST_SHARDS:-8}" --junitxml "$OUT/gpu-tests.xml" tests
fi

# 4. benchmarks, most needed first (the step limits add up to far more than one 600 s call, so
# a call cut short loses the least): after the preflights, fuse() on lpips and a UNet, the
# training and perceptual-loss suites (memory of a training step, perceptual loss, each block's forward + backward), then the
# whole model (inference and the autocast training step; torch.compile in
# max-autotune-no-cudagraphs mode), then every VGG16 block's inference (batch 64, 224x224, bf16)
# against cuDNN eager and torch.compile (default mode per block: max-autotune per block alone
# outlasts the lease), then the opt-in and alternative kernels (at c0bb73a on an H200 the
# inference layers and model steps took 67 and 108 s). The new steps are kept short: fewer
# repeats, and a --time-limit that skips the torch.compile cases that would start late.
BENCH=(--config D --batch 64 --resolution 224 --dtype bf16)
if [ "$PART" != tests ]; then
# A faulting kernel leaves its process's CUDA context unusable, so a fault in a kernel that has
# not run on hardware before would cost every timing of the same run. So the backends' default
# kernels first run once on every block (batch 4) in processes of their own: where the native
# backend does not time every block cleanly, the two main benchmarks leave it out; where Triton
# does not, they run it without tensor descriptors (VGG_KERNELS_TRITON_TMA=0).
preflight_ok() {  # preflight_ok FILE BACKEND: the backend timed every block, nothing skipped
    $PY - "$1" "$2" <<'EOF'
import json, sys
try:
    suite = json.load(open(sys.argv[1]))["suites"]["layers"]
except (OSError, ValueError, KeyError):
    sys.exit(1)
cases = [case for case in suite["cases"] if case["backend"] == sys.argv[2]]
sys.exit(0 if len(cases) == len(suite["layers"]) and not suite["skipped"] else 1)
EOF
}
PREFLIGHT=(--config D --batch 4 --resolution 224 --dtype bf16 --no-compile --warmup 1 --repeats 2)
NATIVE=native,
step native-preflight "${LIMIT_NATIVE_PREFLIGHT:-60}" $PY -m vgg_kernels.bench layers \
    "${PREFLIGHT[@]}" --backends native --out "$OUT/native-preflight.json"
# (a preflight cut short by its time limit, exit 124, proves nothing either way)
if [ "$LAST_RC" != 124 ] && ! preflight_ok "$OUT/native-preflight.json" native; then
    NATIVE=
    echo "native-preflight: not every block ran cleanly; bench-layers and bench-model leave" \
        "the native backend out" | tee -a "$LOG"
fi
# (compiles every candidate Triton config of every block, which bench-layers then finds cached)
step triton-preflight "${LIMIT_TRITON_PREFLIGHT:-150}" $PY -m vgg_kernels.bench layers \
    "${PREFLIGHT[@]}" --backends triton --out "$OUT/triton-preflight.json"
if [ "$LAST_RC" != 124 ] && ! preflight_ok "$OUT/triton-preflight.json" triton; then
    export VGG_KERNELS_TRITON_TMA=0
    echo "triton-preflight: not every block ran cleanly; the benchmarks run Triton with" \
        "VGG_KERNELS_TRITON_TMA=0" | tee -a "$LOG"
fi
# vgg_kernels.fuse on users' models, newest first: lpips.LPIPS(net='vgg') distance + input
# gradient (batch 32, 256x256, bf16; needs the lpips and torchvision packages, else the step
# fails with the reason), then the common UNet's autocast training step (batch 16, 256x256)
step bench-lpips "${LIMIT_LPIPS:-90}" $PY -m vgg_kernels.bench lpips \
    --batch 32 --resolution 256 --dtype bf16 --warmup 2 --repeats 10 \
    --backends "triton,${NATIVE}eager,compile" --compile-mode max-autotune-no-cudagraphs \
    --time-limit $(( ${LIMIT_LPIPS:-90} - 50 )) --out "$OUT/lpips.json"
step bench-unet "${LIMIT_UNET:-90}" $PY -m vgg_kernels.bench unet \
    --batch 16 --resolution 256 --dtype bf16 --warmup 2 --repeats 10 \
    --backends "triton,${NATIVE}eager,compile" --compile-mode max-autotune-no-cudagraphs \
    --time-limit $(( ${LIMIT_UNET:-90} - 50 )) --out "$OUT/unet.json"
# bytes saved for the backward by one VGG16-BN training step (batch 64, 224x224, bf16) and the
# CUDA peak growth, fused against eager; nothing timed, no compile
step bench-memory "${LIMIT_MEMORY:-60}" $PY -m vgg_kernels.bench memory "${BENCH[@]}" \
    --backends "triton,${NATIVE}eager" --out "$OUT/memory.json"
# perceptual loss: frozen VGG16 (no BN) to relu4_3 + input gradient, batch 32, 256x256, bf16
# (compile last, skipped when it would start after the time limit)
step bench-perceptual "${LIMIT_PERCEPTUAL:-120}" $PY -m vgg_kernels.bench perceptual \
    --batch 32 --resolution 256 --dtype bf16 --warmup 2 --repeats 10 \
    --backends "triton,${NATIVE}eager,compile" --compile-mode max-autotune-no-cudagraphs \
    --time-limit $(( ${LIMIT_PERCEPTUAL:-120} - 70 )) --out "$OUT/perceptual.json"
# each VGG16-BN block's training forward + backward (bf16 blocks) against the cuDNN eager modules
# in train mode; compile (default mode) while the time limit allows
step bench-layers-train "${LIMIT_LAYERS_TRAIN:-120}" $PY -m vgg_kernels.bench layers \
    --mode train "${BENCH[@]}" --warmup 2 --repeats 10 \
    --backends "triton,${NATIVE}eager,compile" --compile-mode default \
    --time-limit $(( ${LIMIT_LAYERS_TRAIN:-120} - 60 )) --out "$OUT/layers-train.json"
step bench-model "${LIMIT_MODEL:-200}" $PY -m vgg_kernels.bench model "${BENCH[@]}" \
    --backends "triton,${NATIVE}eager,compile" --compile-mode max-autotune-no-cudagraphs \
    --time-limit $(( ${LIMIT_MODEL:-200} - 80 )) --out "$OUT/model.json"
step bench-layers "${LIMIT_LAYERS:-180}" $PY -m vgg_kernels.bench layers "${BENCH[@]}" \
    --backends "triton,${NATIVE}eager,compile" --compile-mode default \
    --time-limit $(( ${LIMIT_LAYERS:-180} - 60 )) --out "$OUT/layers.json"
# the native backend choosing its fastest kernel per block (timed on the first call per shape)
step bench-native-auto "${LIMIT_NATIVE_AUTO:-100}" env VGG_KERNELS_NATIVE_WGMMA=auto \
    $PY -m vgg_kernels.bench layers "${BENCH[@]}" --backends native,eager \
    --time-limit $(( ${LIMIT_NATIVE_AUTO:-100} - 30 )) --out "$OUT/layers-native-auto.json"
# the first block on the alternatives to what bench-layers timed: Triton on its unpadded 3
# channels (row segments on the pointer path, not the padded descriptor path), native on the
# WMMA kernel (not the short-reduction kernel)
step bench-first-alt "${LIMIT_FIRST_ALT:-50}" env VGG_KERNELS_TRITON_PAD_CHANNELS=0 \
    VGG_KERNELS_NATIVE_NARROW=0 $PY -m vgg_kernels.bench layers "${BENCH[@]}" \
    --backends triton,native,eager --no-compile --layers conv1_1 \
    --out "$OUT/layers-first-alt.json"
# the native backend's Hopper (wgmma) inference kernel, switched on, against cuDNN eager
step bench-native-wgmma "${LIMIT_NATIVE_WGMMA:-80}" env VGG_KERNELS_NATIVE_WGMMA=1 \
    $PY -m vgg_kernels.bench layers "${BENCH[@]}" --backends native,eager \
    --time-limit $(( ${LIMIT_NATIVE_WGMMA:-80} - 30 )) --out "$OUT/layers-native-wgmma.json"
# the native Hopper kernel that copies each input halo once per 64 channels (3x3 layers with C a
# multiple of 64; conv1_1 stays on the other wgmma kernel)
step bench-native-halo "${LIMIT_NATIVE_HALO:-80}" env VGG_KERNELS_NATIVE_WGMMA=halo \
    $PY -m vgg_kernels.bench layers "${BENCH[@]}" --backends native,eager \
    --time-limit $(( ${LIMIT_NATIVE_HALO:-80} - 30 )) --out "$OUT/layers-native-halo.json"
# the same with the pixels as the MMA's N operand (64 output channels per CTA), on the blocks it
# is for: 64 and 128 output channels, where the other orientation's m64n64 / m64n128 MMAs are
# short of shared-memory bandwidth
step bench-native-halo-t "${LIMIT_NATIVE_HALO_T:-50}" env VGG_KERNELS_NATIVE_WGMMA=halo-t \
    $PY -m vgg_kernels.bench layers "${BENCH[@]}" --backends native,eager \
    --layers conv1_2,conv2_1,conv2_2 --out "$OUT/layers-native-halo-t.json"
if [ $QUICK -eq 0 ]; then
    step tune-triton 240 $PY benchmarks/tune_triton.py --candidates --out "$OUT/tune_triton.json"
fi
fi

# 5. summary: one result file with the suites of the main steps, then the table
MERGE_FILES=()
for suite in layers layers-train model perceptual memory lpips unet; do
    [ -f "$OUT/$suite.json" ] && MERGE_FILES+=("$OUT/$suite.json")
done
if [ ${#MERGE_FILES[@]} -gt 0 ]; then
    $PY -m vgg_kernels.bench merge "$OUT/results.json" "${MERGE_FILES[@]}" >>"$LOG" 2>&1
fi
$PY - "$OUT" "${STEPS[@]}" <<'EOF'
import json, os, sys
out, steps = sys.argv[1], [s.split() for s in sys.argv[2:]]
summary = {"commit": os.environ.get("VGG_KERNELS_COMMIT"),
           "environment": open(os.path.join(out, "environment.txt")).read().splitlines(),
           "steps": [{"name": n, "exit": int(rc), "seconds": int(t)} for n, rc, t in steps]}
json.dump(summary, open(os.path.join(out, "device_check.json"), "w"), indent=1)
print("\nstep            exit  seconds")
for s in summary["steps"]:
    print(f"{s['name']:<15} {s['exit']:>4}  {s['seconds']:>7}")
EOF
grep -E "^(FAILED|ERROR) " "$LOG" | cut -c1-160 | head -n 25
grep -E "passed|failed|error" "$LOG" | grep -E "^=*.*(passed|failed)" | tail -n 3
for suite in lpips unet memory perceptual layers-train model layers layers-native-auto \
        layers-first-alt layers-native-wgmma layers-native-halo layers-native-halo-t; do
    if [ -f "$OUT/$suite.json" ]; then
        $PY -m vgg_kernels.bench show "$OUT/$suite.json" 2>/dev/null
    fi
done
# the performance bars these files meet or miss (vgg_kernels/bench/bars.py)
BAR_FILES=()
for suite in lpips unet memory perceptual layers-train model layers layers-native-auto \
        layers-native-wgmma layers-native-halo; do
    [ -f "$OUT/$suite.json" ] && BAR_FILES+=("$OUT/$suite.json")
done
if [ ${#BAR_FILES[@]} -gt 0 ]; then
    $PY -m vgg_kernels.bench bars "${BAR_FILES[@]}" | tee "$OUT/bars.txt"
fi
# exit status: 0 when every step did
for s in "${STEPS[@]}"; do
    set -- $s
    [ "$2" = 0 ] || exit 1
done
exit 0
