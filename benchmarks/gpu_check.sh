#!/usr/bin/env bash
# Every GPU check in one call of under 9 minutes: the GPU tests, then the engine's targets on the Llama-3.2-1B
# and Llama-3-8B shapes (benchmarks/bench_gpu_targets.py), results as JSON + markdown in $OUT.
#
#   bash benchmarks/gpu_check.sh             on the GPU machine (its python3 holds CUDA PyTorch and Triton)
#   bash benchmarks/gpu_check.sh --dry-run   the same steps on this CPU: the tests collected, the tiny shape
#
# The GPU machine cannot download: what it lacks travels with the repository. Prepare once, here:
#   mkdir -p .gpu-data/ref-llama-16m && cp ../shared/data/ref-llama-16m/{config.json,tokenizer*.json} \
#       .gpu-data/ref-llama-16m/                         # the random models use ref-llama-16m's tokenizer
# then run it with the device tool: command `bash benchmarks/gpu_check.sh`, carry [".gpu-data"], timeout 600.
# Each step has its own time limit, so one that hangs cannot take the others' time; the exit status is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=".:benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -d .gpu-data ]] && export MIAOTUI_DATA="$PWD/.gpu-data"
if [[ -d .whl ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=0
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [[ $rc == 0 ]] || failed=$((failed + 1))
}

if [[ "${1:-}" == "--dry-run" ]]; then
    # the GPU step's test files, collected only: the suite runs them (the kernels in Triton's interpreter)
    step 120 tests "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_triton_kernels.py \
        tests/test_engine_device.py
    step 300 targets-tiny "$PY" benchmarks/bench_gpu_targets.py --device cpu --shapes tiny --repeats 1 \
        --new-tokens 8 --prompt-len 16 --batch 4 --out "$OUT" --name tiny
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    step 150 tests "$PY" -m pytest -q -p no:cacheprovider -x tests/test_triton_kernels.py tests/test_engine_device.py
    step 120 targets-1b "$PY" benchmarks/bench_gpu_targets.py --device cuda --shapes 1b --out "$OUT" --name 1b
    step 210 targets-8b "$PY" benchmarks/bench_gpu_targets.py --device cuda --shapes 8b --out "$OUT" --name 8b
fi
echo "gpu_check: $failed step(s) failed; results in $OUT"
exit $failed
