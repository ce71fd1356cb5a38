#!/usr/bin/env bash
# Build genfuse._C with AddressSanitizer + UndefinedBehaviorSanitizer in a temporary copy of the
# tree and run the block-manager tests (exact-id unit tests and the hypothesis twin machine), the
# quantized matmul's kernel tests and the bindings' hostile-argument tests (list items whose
# __index__ clears, grows or refills the list being converted, raises, or returns garbage; run in
# child interpreters that inherit the sanitizer, so a bad read aborts that case) against it. The tree this script lives in is not touched: other processes may be importing
# genfuse from it. Any sanitizer report aborts the run, so the exit status is the verdict.
#
#   bash csrc/asan_check.sh                          # from the repository root
#   GENFUSE_BM_EXAMPLES=2000 bash csrc/asan_check.sh -x   # more hypothesis examples; pytest args
#
# Needs gcc (libasan, libubsan) and the project's Python environment (python on PATH, or
# PYTHON=/path/to/python); the copy is deleted on exit unless KEEP=1.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gf-asan.XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT

# 1. The copy: sources only, no built extension, no caches.
src="$work/src"
mkdir -p "$src"
for p in setup.py pyproject.toml README.md csrc genfuse kernels runtime bench tests; do
    [[ -e "$repo/$p" ]] && cp -r "$repo/$p" "$src/"
done
[[ -e "$src/README.md" ]] || touch "$src/README.md"   # pyproject names it
find "$src" \( -name '*.so' -o -name __pycache__ -o -name .hypothesis \) -prune -exec rm -rf {} +

# 2. The sanitized build. -fno-sanitize-recover makes every UBSan finding fatal; -O1 keeps the
#    stack traces readable.
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
(cd "$src" && CFLAGS="$san" CXXFLAGS="$san" LDFLAGS="-fsanitize=address,undefined" \
    "$py" setup.py -q build_ext --inplace >"$work/build.log" 2>&1) || { cat "$work/build.log"; exit 1; }

# 2b. The integer-dot kernel alone, every path the CPU has, as a sanitized executable (leaks on).
g++ -std=c++17 $san -ffp-contract=off -I"$src/csrc" "$src/csrc/tests/qdot_sanitize.cpp" "$src/csrc/qdot.cpp" \
    "$src/csrc/quant_matmul.cpp" "$src/csrc/kquant.cpp" "$src/csrc/threads.cpp" -o "$work/qdot_sanitize" -lpthread >"$work/qdot_build.log" 2>&1 \
    || { cat "$work/qdot_build.log"; exit 1; }
ASAN_OPTIONS="abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" "$work/qdot_sanitize"

# 3. Lay the copy out as the installed package (genfuse.kernels, genfuse.runtime, genfuse.bench
#    live at the top of the repository) so every genfuse module comes from the copy, ahead of
#    the editable install of the shared tree.
for sub in kernels runtime bench; do ln -s "../$sub" "$src/genfuse/$sub"; done

export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"   # CPython keeps its arenas
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"

# 4. Prove the sanitized extension is the one imported, then run the tests from the copy.
cd "$src"
so="$("$py" -c 'import genfuse._C as c, genfuse.runtime.block_manager as b; print(c.__file__); print(b.__file__)')"
echo "$so"
[[ "$(head -1 <<<"$so")" == "$src"/* && "$(tail -1 <<<"$so")" == "$src"/* ]] \
    || { echo "asan_check: genfuse was not imported from the sanitized copy" >&2; exit 1; }
grep -q __asan_report <<<"$(nm -D "$(head -1 <<<"$so")")" || { echo "asan_check: the extension is not instrumented" >&2; exit 1; }
# The quantized matmuls' kernel tests too, every CPU path of the integer-dot one (not the two that
# load the SmolLM2 model: slow here).
"$py" -m pytest tests/runtime/test_block_manager.py tests/runtime/test_quant.py tests/runtime/test_quant_qdot.py tests/runtime/test_kquant.py tests/runtime/test_bindings_hardening.py \
    -k "not smollm and not keep_quantized" -q -p no:cacheprovider "$@"
