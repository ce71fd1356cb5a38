#!/usr/bin/env bash
# The whole GPU check in one device call: install genfuse, run the GPU tests (every kernel
# test runs on CUDA there, bf16 included), then the kernel benchmark; results land in $OUT.
#   usage (on the GPU machine, from the repository root):  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.total --format=csv | tee "$OUT/nvidia_smi.csv"
python -m genfuse info --json > "$OUT/info.json"
# Kernel tests on CUDA (bf16 cases carry the gpu marker and run here too).
python -m pytest tests/kernels tests/test_backend.py -q -x 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
python -m genfuse bench kernels --json "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/kernels.txt"
