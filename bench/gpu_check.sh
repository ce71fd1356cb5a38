#!/usr/bin/env bash
# The GPU check: one device call that installs genfuse and runs the checks in order of value
# inside a wall-time budget, writing its results under $OUT after every phase.
#
#   usage (on the GPU machine, from the repository root):
#     bash bench/gpu_check.sh                  # THE run (8 minutes): install; 1. correctness on CUDA
#                                              # (a sample of the kernel tests, bf16 included, and of the
#                                              # gpu-marked runtime tests); 2. the headline benchmarks;
#                                              # 3. the wider sweeps, as far as the time left allows
#     bash bench/gpu_check.sh tests            # the named phases, as before (no sampling): kernel tests on
#     bash bench/gpu_check.sh kernels [ARGS]   #   CUDA and every gpu-marked test; genfuse bench kernels;
#     bash bench/gpu_check.sh images [ARGS]    #   genfuse bench images; genfuse bench generate, one shape
#     bash bench/gpu_check.sh generate SHAPE   #   (smollm2-135m, llama-3.2-1b, llama-3-8b); all = tests,
#     bash bench/gpu_check.sh all              #   kernels, images
#     bash bench/gpu_check.sh engine [SHAPE]   # genfuse bench engine at SHAPE (default llama-3.2-1b) in bf16,
#                                              #   every part and mode, CUDA graphs on, then off
#     bash bench/gpu_check.sh tp [SHAPE]       # tensor-parallel decode at SHAPE (default llama-3-8b) in bf16
#                                              #   at N = 1, 2, 4 as far as the machine's GPUs go
#     GENFUSE_GPU_CHECK_DRY=1 bash bench/gpu_check.sh   # CPU: every phase skipped with a message, files written
#
# What comes back, flat in $OUT (default bench/results/local), each rewritten after every phase:
#   summary.md    the targets table (measured, target, ratio, pass / short / not run), correctness
#                 counts and failures, the phases (status, seconds, time slice), the sweeps
#   results.json  all of it: phase records, pytest summaries, every benchmark's JSON, the rows
#   gpu_check.log everything the phases printed
#   raw.tar.gz    the phases' own files (pytest logs, benchmark JSON), in case the merge itself broke
#
# Environment: GENFUSE_GPU_CHECK_BUDGET (seconds, default 480 for the run, none for named phases);
# GENFUSE_AUTOTUNE (default quick here: short autotune lists, kernels/_common.py; full for users);
# PYTHON (default python, else python3). Each phase runs under its own `timeout`, with a slice of
# what is left of the budget; a phase that would start with too little left is skipped, said so.
#
# The GPU image lacks gguf and diffusers: put their wheels in .whl/ (device README: "a Python
# package missing there") and carry .whl; they are installed into /tmp/site here.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/bench/results/local}
DRY=${GENFUSE_GPU_CHECK_DRY:-0}
[[ "$DRY" == 0 ]] && DRY=""
export PYTHONUNBUFFERED=1
export GENFUSE_AUTOTUNE=${GENFUSE_AUTOTUNE:-quick}
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
SUMMARY="$REPO/bench/gpu_summary.py"
START=$(date +%s)
RESERVE=10      # seconds kept for the last merge
FAILED=0

say() { echo "[gpu_check] $*" | tee -a "$LOG"; }
left() { echo $(( START + BUDGET - $(date +%s) )); }

merge() {
    "$PY" "$SUMMARY" merge "$WORK" "$OUT" --budget "$BUDGET" --start "$START" ${DRY:+--dry} >>"$LOG" 2>&1 \
        || say "the merge into results.json / summary.md failed (see above); raw.tar.gz has the phase files"
    tar -czf "$OUT/raw.tar.gz.tmp" -C "$WORK" . 2>>"$LOG" && mv -f "$OUT/raw.tar.gz.tmp" "$OUT/raw.tar.gz"
}

record() {  # PHASE STATUS RC SECONDS SLICE NOTE (RC empty: the phase did not run)
    "$PY" "$SUMMARY" record "$WORK" "$1" "$2" ${3:+--rc "$3"} --seconds "$4" --slice "$5" --note "$6" \
        >>"$LOG" 2>&1 \
        || say "could not record phase $1 ($2)"
}

# run_phase NAME CAP MIN -- COMMAND...: run COMMAND under `timeout` for at most CAP seconds (less
# when less of the budget is left), skip it when fewer than MIN seconds are left; record, merge.
run_phase() {
    local name=$1 cap=$2 min=$3
    shift 3
    [[ "${1:-}" == "--" ]] && shift
    local avail=$(( $(left) - RESERVE ))
    local slice=$(( cap < avail ? cap : avail ))
    if (( slice < min )); then
        local have=$(( avail > 0 ? avail : 0 ))
        say "$name: skipped, ${have} s of the ${BUDGET} s budget left (needs at least ${min} s)"
        record "$name" skipped "" 0 "$slice" "too little time: ${have} s left, needs ${min} s"
        merge
        return 0
    fi
    if [[ -n "$DRY" ]]; then
        say "$name: skipped (dry run, no CUDA); would run for up to ${slice} s: $*"
        record "$name" skipped "" 0 "$slice" "dry run: no CUDA"
        merge
        return 0
    fi
    say "$name: up to ${slice} s ($(left) s of the budget left): $*"
    local t0 rc status note=""
    t0=$(date +%s)
    # bash -c: the command may be one of the functions below (see export_for_phases)
    timeout -k 10 "$slice" bash -c '"$@"' bash "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=ok ;;
        # the budget at work, not a failure
        124|137) status="timed out"; note="stopped after its ${slice} s slice" ;;
        *) status=failed; note="exit status $rc"; FAILED=1 ;;
    esac
    say "$name: $status after ${took} s${note:+ ($note)}"
    record "$name" "$status" "$rc" "$took" "$slice" "$note"
    merge
}

install_genfuse() {
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$REPO"/.whl/*.whl || return 1
    fi
    "$PY" -m pip install -q --no-build-isolation --no-deps -e "$REPO" || return 1
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.total --format=csv \
        > "$WORK/nvidia_smi.csv" || true
    "$PY" -m genfuse info --json > "$WORK/info.json"
}

pytest_phase() {  # NAME SAMPLE PYTEST-ARGS...: pytest with the GPU check's plugin, logging to WORK/NAME.jsonl
    local name=$1 sample=$2
    shift 2
    "$PY" -m pytest -q --tb=short -p genfuse.bench.gpu_pytest --gpu-check-sample "$sample" \
        --gpu-check-log "$WORK/$name.jsonl" -p no:cacheprovider "$@"
}

export_for_phases() {  # the phases run in `bash -c` under timeout: the functions they call go along
    export PY REPO WORK
    export -f install_genfuse pytest_phase
}

gpu_tests=(tests/runtime tests/test_bench_images.py tests/test_bench_generate.py -m gpu)
# the kernel tests on CUDA; the fuzz test runs the interpreter on the CPU whatever the machine
kernel_tests=(tests/kernels tests/test_backend.py --ignore=tests/kernels/test_fuzz.py)

the_run() {
    # 1. correctness on CUDA: one case per test function (gpu-marked ones, i.e. bf16 and the large
    #    shapes, sampled apart from the rest), then the gpu-marked runtime tests, two per function.
    run_phase tests-kernels 100 30 -- pytest_phase tests-kernels 1 "${kernel_tests[@]}"
    run_phase tests-runtime 60 20 -- pytest_phase tests-runtime 2 "${gpu_tests[@]}"
    # 2. the headline benchmarks, the cases the targets are judged on.
    run_phase headline-kernels 110 30 -- "$PY" -m genfuse bench kernels --size headline \
        --json "$WORK/headline-kernels.json"
    run_phase headline-decode 90 40 -- "$PY" -m genfuse bench generate --only shapes --shapes llama-3.2-1b \
        --batches 1 --tokens 32 --repeats 2 --no-compile --json "$WORK/headline-decode.json"
    run_phase headline-dcgan 50 20 -- "$PY" -m genfuse bench images --only dcgan --batches 256 --no-compile \
        --json "$WORK/headline-dcgan.json"
    run_phase headline-engine 150 60 -- "$PY" -m genfuse bench engine --shape llama-3.2-1b --dtype bf16 \
        --modes engine,one_at_a_time --json "$WORK/headline-engine.json"
    # 3. whatever time is left: the wider sweeps, families without a headline first.
    run_phase sweep-vae 60 30 -- "$PY" -m genfuse bench images --only vae --no-compile \
        --json "$WORK/sweep-vae.json"
    local sweep=rotary,swiglu,group_norm,conv2d,conv_transpose2d,unified_attention
    sweep+=,attention,linear,decode_attention,norm
    run_phase sweep-kernels 600 30 -- "$PY" -m genfuse bench kernels --only "$sweep" \
        --json "$WORK/sweep-kernels.json"
    run_phase sweep-tests 600 30 -- pytest_phase sweep-tests 0 "${kernel_tests[@]}"
    run_phase sweep-images 600 60 -- "$PY" -m genfuse bench images --json "$WORK/sweep-images.json"
}

main() {
    local phase=${1:-run}
    [[ $# -gt 0 ]] && shift
    case "$phase" in
        run|tests|kernels|images|generate|engine|tp|all) ;;
        *) echo "gpu_check.sh: unknown phase $phase (none for the one run; tests, kernels, images," \
                "generate SHAPE, engine [SHAPE], tp [SHAPE], all)" >&2
           return 2 ;;
    esac
    if [[ "$phase" == generate && -z "${1:-}" ]]; then
        echo "gpu_check.sh: generate needs a shape (smollm2-135m, llama-3.2-1b, llama-3-8b)" >&2
        return 2
    fi
    BUDGET=${GENFUSE_GPU_CHECK_BUDGET:-480}  # the one run; the named phases have none unless set
    [[ "$phase" != run ]] && BUDGET=${GENFUSE_GPU_CHECK_BUDGET:-86400}
    mkdir -p "$OUT"
    if [[ -n "${GENFUSE_GPU_CHECK_WORK:-}" ]]; then
        WORK=$GENFUSE_GPU_CHECK_WORK
        mkdir -p "$WORK"
    else  # raw.tar.gz keeps its files; the folder goes
        WORK=$(mktemp -d "${TMPDIR:-/tmp}/genfuse-gpu-check.XXXXXX") || return 1
        trap 'rm -rf "$WORK"' EXIT
    fi
    LOG="$OUT/gpu_check.log"
    : > "$LOG"
    rm -f "$OUT/results.json" "$OUT/summary.md" "$OUT/raw.tar.gz"
    say "phase $phase, budget ${BUDGET} s, GENFUSE_AUTOTUNE=$GENFUSE_AUTOTUNE, out $OUT," \
        "work $WORK${DRY:+, DRY RUN}"
    cd "$REPO" || return 1
    export_for_phases
    if [[ -d /tmp/site ]] || compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    run_phase install 90 10 -- install_genfuse
    local bench=("$PY" -m genfuse bench) all=100000
    case "$phase" in
        run) the_run ;;
        tests)
            run_phase tests-all $all 30 -- pytest_phase tests-all 0 tests/kernels tests/test_backend.py
            run_phase tests-gpu $all 30 -- pytest_phase tests-gpu 0 "${gpu_tests[@]}" ;;
        kernels) run_phase sweep-kernels $all 30 -- "${bench[@]}" kernels --json "$WORK/sweep-kernels.json" "$@" ;;
        images) run_phase sweep-images $all 30 -- "${bench[@]}" images --json "$WORK/sweep-images.json" "$@" ;;
        generate) run_phase "generate-$1" $all 30 -- "${bench[@]}" generate --only shapes --shapes "$1" \
                      --json "$WORK/generate-$1.json" ;;
        engine)
            local shape=${1:-llama-3.2-1b} g
            for g in on off; do
                run_phase "engine-$shape-graphs-$g" $all 30 -- "${bench[@]}" engine --shape "$shape" --dtype bf16 \
                    --cuda-graphs "$g" --json "$WORK/engine-$shape-graphs-$g.json"
            done ;;
        tp)
            local shape=${1:-llama-3-8b} gpus worlds=1
            gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
            (( gpus >= 2 )) && worlds+=,2
            (( gpus >= 4 )) && worlds+=,4
            say "tp: ${gpus:-0} GPU(s) here, so N = $worlds"
            run_phase "tp-$shape" $all 30 -- "$PY" -m genfuse.bench.tp_bench --device cuda --shape "$shape" \
                --dtype bf16 --worlds "$worlds" --json "$WORK/tp-$shape.json" ;;
        all)
            run_phase tests-all $all 30 -- pytest_phase tests-all 0 tests/kernels tests/test_backend.py
            run_phase tests-gpu $all 30 -- pytest_phase tests-gpu 0 "${gpu_tests[@]}"
            run_phase sweep-kernels $all 30 -- "${bench[@]}" kernels --json "$WORK/sweep-kernels.json"
            run_phase sweep-images $all 30 -- "${bench[@]}" images --json "$WORK/sweep-images.json" ;;
    esac
    say "done in $(( $(date +%s) - START )) s; results in $OUT"
    cat "$OUT/summary.md" 2>/dev/null
    return $FAILED
}

# Sourcing the file (the tests do) defines the functions without running the check.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
    exit $?
fi
