#!/usr/bin/env bash
# The GPU check, in phases that each fit one device call (10 minutes); results land in $OUT.
#   usage (on the GPU machine, from the repository root):
#     bash bench/gpu_check.sh tests              # install, kernel tests on CUDA (bf16 too), every gpu-marked test
#     bash bench/gpu_check.sh kernels [ARGS]     # genfuse bench kernels
#     bash bench/gpu_check.sh images             # genfuse bench images (DCGAN faces, SD 1.5 VAE)
#     bash bench/gpu_check.sh generate SHAPE     # genfuse bench generate, one shape (smollm2-135m, llama-3.2-1b, llama-3-8b)
#     bash bench/gpu_check.sh all                # tests, kernels, images (not generate: too long for one call)
# The GPU image lacks gguf and diffusers: put their wheels in .whl/ (device README: "a Python
# package missing there") and carry .whl; they are installed into /tmp/site here.
set -uo pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
phase=${1:-all}
shift || true

if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.total --format=csv > "$OUT/nvidia_smi.csv"
python -m genfuse info --json > "$OUT/info.json"

run_tests() {
    # Every kernel test runs on CUDA there (bf16 cases carry the gpu marker and run too); then
    # the gpu-marked runtime tests: CUDA-graph decode, the VAE at SD 1.5 size, bench plumbing.
    python -m pytest tests/kernels tests/test_backend.py -q 2>&1 | tee "$OUT/pytest_kernels.log" | tail -30
    python -m pytest tests/runtime tests/test_bench_images.py tests/test_bench_generate.py -m gpu -q 2>&1 \
        | tee "$OUT/pytest_runtime_gpu.log" | tail -30
}
case "$phase" in
    tests) run_tests ;;
    kernels) python -m genfuse bench kernels --json "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/kernels.txt" ;;
    images) python -m genfuse bench images --json "$OUT/images.json" "$@" 2>&1 | tee "$OUT/images.txt" ;;
    generate) python -m genfuse bench generate --only shapes --shapes "${1:?name a shape}" --json "$OUT/generate-$1.json" 2>&1 \
                  | tee "$OUT/generate-$1.txt" ;;
    all)
        run_tests
        python -m genfuse bench kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
        python -m genfuse bench images --json "$OUT/images.json" 2>&1 | tee "$OUT/images.txt"
        ;;
    *) echo "gpu_check.sh: unknown phase $phase (tests, kernels, images, generate SHAPE, all)" >&2; exit 2 ;;
esac
