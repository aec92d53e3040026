#!/usr/bin/env bash
# The GPU check, in one go, whenever a GPU machine is available (about 3-5 minutes on one
# H200; each step has its own time limit so that one slow step cannot eat the rest):
#   1. the CUDA tests (pytest -m cuda: optimisers, objective + gradient, a whole
#      reconstruction against the CPU, and 2 NCCL ranks when there are 2 GPUs);
#   2. the likelihood + gradient per minibatch (benchmarks/likelihood.py) at the paper's
#      synthetic setting and with shifts;
#   3. the pruned against the exhaustive pose search (benchmarks/pose_search.py);
#   4. with 2 or more GPUs only: throughput with 1 and 2 NCCL ranks
#      (benchmarks/distributed.py).
# Usage, from anywhere:  bash benchmarks/gpu_check.sh   (PYTHON=... to choose the interpreter)
# It prints every figure; a failing step is reported and the others still run; the exit
# status is that of the CUDA tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

step() {  # step SECONDS TITLE COMMAND...: run with a time limit, report a failure
    local limit=$1 title=$2
    shift 2
    echo
    echo "== $title"
    local start=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    echo "-- $title: exit $code after $((SECONDS - start)) s"
    return $code
}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'GPUs', torch.cuda.device_count()); sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no GPU: nothing to check" >&2
    exit 1
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

step 240 "CUDA tests" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/
tests=$?
step 90 "likelihood + gradient, box 128, 10% Nyquist, no shifts (paper synthetic)" \
    "$PY" benchmarks/likelihood.py --device cuda --box 128 --max-freq 0.10 --batch-size 100
step 90 "likelihood + gradient, box 128, 16% Nyquist, shifts within 4 px" \
    "$PY" benchmarks/likelihood.py --device cuda --box 128 --max-freq 0.16 --shift-radius 4 \
    --batch-size 100
step 120 "pose search, box 64, 25% and 50% Nyquist" \
    "$PY" benchmarks/pose_search.py --device cuda --box 64 --max-freq 0.25,0.5 --n-images 64
if [ "$GPUS" -ge 2 ]; then
    step 240 "data parallel: 1 and 2 NCCL ranks" \
        "$PY" benchmarks/distributed.py --device cuda --box 128 --n-particles 4000 \
        --batch-size 100 --epochs 2 --processes 1,2
else
    echo
    echo "== data parallel: skipped (one GPU; the NCCL test and benchmark need 2)"
fi
exit $tests
