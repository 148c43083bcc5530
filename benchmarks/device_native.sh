#!/usr/bin/env bash
# The native backend on a lent GPU: build vgg_kernels._C for this card, then its GPU tests.
#
#   bash benchmarks/device_native.sh [build|test|all]      (default: all; about 2-3 minutes)
#
# benchmarks/device_check.sh calls `device_native.sh build` (its own GPU step then runs every
# `-m gpu` test, these included). The GPU machine has no network: the build uses the installed
# torch, setuptools and (if present) ninja, never a registry.
#   build  pip install --no-build-isolation --no-deps --no-index -e . (ninja, MAX_JOBS jobs);
#          if pip cannot, `setup.py build_ext --inplace`; then checks that the ops load and
#          reports the compiled archs. Leave it unbuilt and native.py JIT-builds on first use.
#   test   the gpu tests of tests/test_native.py through benchmarks/gpu_tests.py (GPU_TEST_SHARDS
#          processes, 4; JUnit in $OUT, default /tmp/vgg_kernels_gpu)
# Knobs: VGG_KERNELS_CUDA_ARCHS (default: TORCH_CUDA_ARCH_LIST, else 9.0a), MAX_JOBS (16),
# PYTHON (python3).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
export VGG_KERNELS_CUDA_ARCHS=${VGG_KERNELS_CUDA_ARCHS:-${TORCH_CUDA_ARCH_LIST:-9.0a}}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$VGG_KERNELS_CUDA_ARCHS}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODE=${1:-all}

build() {
    local began=$SECONDS
    echo "device_native: building vgg_kernels._C for $VGG_KERNELS_CUDA_ARCHS with MAX_JOBS=$MAX_JOBS"
    $PY -c "import ninja" 2>/dev/null || echo "device_native: ninja is not installed; the build runs one file at a time"
    if ! timeout 220 $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
        echo "device_native: pip install failed; trying setup.py build_ext --inplace"
        timeout 220 $PY setup.py build_ext --inplace || return 1
    fi
    echo "device_native: build took $((SECONDS - began))s"
    $PY - <<'EOF'
import torch
import vgg_kernels._C  # noqa: F401
from vgg_kernels.backends import native

print("vgg_kernels._C:", torch.ops.vgg_kernels.build_info())
if torch.cuda.is_available():
    reason = native.BACKEND.unavailable_reason(torch.device("cuda"), torch.bfloat16,
                                               "conv_bn_relu_infer")
    print("native on", torch.cuda.get_device_name(), ":", reason or "available")
EOF
}

run_tests() {  # in parallel processes that survive a faulting kernel (benchmarks/gpu_tests.py)
    timeout 240 $PY benchmarks/gpu_tests.py --shards "${GPU_TEST_SHARDS:-4}" \
        --junitxml "${OUT:-/tmp/vgg_kernels_gpu}/native-gpu-tests.xml" tests/test_native.py
}

case "$MODE" in
    build) build ;;
    test) run_tests ;;
    all) build && run_tests ;;
    *) echo "usage: $0 [build|test|all]" >&2; exit 2 ;;
esac
