#!/usr/bin/env bash
# The GPU machine's versions, tried on this CPU machine: a second virtualenv with the device image's
# torch and torchvision (torch 2.11, torchvision 0.26; no Horovod, as there), then the GPU check's
# test files (the strict device pass of make test) and its smoke run (make gpu-check SMOKE=1) in it.
#
#   bash launch/device_versions.sh [VENV]     (default .venv-device; make device-versions)
#
# About 3 GB of torch's CUDA wheels come from the registry, so this is not part of make test. The
# device image's Python is 3.12; Debian 12 and the registry offer this machine 3.11 only, so that part
# of the image is not copied. DEVICE_TORCH_SPEC names other versions.
set -euo pipefail
VENV=${1:-.venv-device}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_SPEC=${DEVICE_TORCH_SPEC:-"torch==2.11.0 torchvision==0.26.0"}
OUT=${OUT:-$ROOT/runs/device-versions}
mkdir -p "$OUT"
# The lock without what torch pins for itself (its CUDA wheels, triton, sympy): the rest stays locked.
constraints="$OUT/constraints.txt"
grep -v -E '^(torch|torchvision|triton|sympy|mpmath|nvidia-(cublas|cuda|cufft|cufile|curand|cusolver|cusparse|nvjitlink|nvtx|nccl|nvshmem|cudnn|cusparselt)|cuda-)' \
  "$ROOT/launch/constraints.txt" >"$constraints"
TORCH_SPEC=$TORCH_SPEC DALI_BA_CONSTRAINTS=$constraints DALI_BA_WITHOUT_HOROVOD=1 bash "$ROOT/launch/install.sh" "$VENV"
PY=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")/bin/python
"$PY" -c 'import sys, torch, torchvision; print(f"[device-versions] Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")' | tee "$OUT/versions.txt"
cd "$ROOT"
status=0
# Deselected as the GPU check's tests step deselects them on the device, which has neither Horovod nor
# Open MPI: the launches under horovodrun and mpirun (benchmarks/gpu_check/steps_tests.py).
without="not horovodrun and not more_ranks_than_samples and not make_demo and not mpirun and not signal_to_one_rank"
PATH="$(dirname "$PY"):$PATH" "$PY" -m pytest -q -rs --strict-device -m strict_device -k "$without" tests 2>&1 | tee "$OUT/tests.txt" || status=1
"$PY" -m benchmarks.gpu_check --out "$OUT/gpu-check" --smoke 2>&1 | tee "$OUT/gpu-check.txt" || status=1
echo "[device-versions] $([ $status = 0 ] && echo ok || echo FAILED): logs in $OUT"
exit $status
