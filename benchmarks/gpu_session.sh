#!/usr/bin/env bash
# What to run when a session is lent a GPU (../.library/device: one command at most 10 minutes,
# 30 minutes of device time a session, no network there, its python3 already holds torch, triton,
# pytest, pybind11, ninja; nvcc and compute-sanitizer are installed). One stage per device call:
#
#   bash benchmarks/gpu_session.sh test      # build the extension with CUDA, then the whole suite
#   bash benchmarks/gpu_session.sh sanitize  # compute-sanitizer (memcheck, racecheck, synccheck) on
#                                            #   the native CUDA kernels, small shapes
#   bash benchmarks/gpu_session.sh bench     # the benchmark suite at real widths: native (fused and
#                                            #   split forward) vs triton vs reference vs eager
#
# Each stage installs the package first (offline: --no-deps, no build isolation; it compiles the
# CUDA kernels for the GPU at hand) and writes its logs and results under $OUT (the device tool's
# folder that comes back; ./gpu_out elsewhere), with the device, the commit and the date. Copy the
# results into benchmarks/results/cuda-<stage>/ and commit them. Nothing here needs a GPU to run:
# without one, the GPU tests skip and the benchmarks run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE="${1:-}"
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"  # the GPU at hand: a quicker build
export MAX_JOBS="${MAX_JOBS:-16}"

header() {
  {
    echo "stage: $STAGE"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  } | tee "$OUT/$STAGE-device.txt"
}

install() {
  local t0=$SECONDS
  "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT/$STAGE-install.log" 2>&1 ||
    { tail -40 "$OUT/$STAGE-install.log"; echo "install failed"; exit 1; }
  "$PY" -c "import moss_kernels as mk, moss_kernels.native as n; print(n.build_info()); print('cuda backends', mk.available_backends('cuda') if __import__('torch').cuda.is_available() else None)" |
    tee -a "$OUT/$STAGE-device.txt"
  echo "installed in $((SECONDS - t0)) s"
}

case "$STAGE" in
  test)
    header
    install
    # The whole suite; the slowest tests listed, so the next session can plan its calls.
    set +e
    timeout 480 "$PY" -m pytest tests -q -p no:cacheprovider -rs --durations=25 2>&1 | tee "$OUT/test.log"
    status=${PIPESTATUS[0]}
    set -e
    grep -E "passed|failed" "$OUT/test.log" | tail -1
    exit "$status"
    ;;
  sanitize)
    header
    install
    # Small shapes only (the large case and the long decode walks are slow under the tools): the
    # fused and split forward in every dtype, the largest fused panel, the backward, out= and a
    # decode walk; 21 tests.
    SANITIZE_TESTS="(forward_vs_truth and (2-64- or float16-2-512)) or (forward_backward_vs_truth and bfloat16-2) or (out_accumulates and bfloat16) or (decode_steps and mixed-torch.bfloat16-2)"
    status=0
    for tool in memcheck racecheck synccheck; do
      echo "== compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 17 --print-limit 20 \
        "$PY" -m pytest tests/test_native_cuda.py -q -x -p no:cacheprovider \
        -k "$SANITIZE_TESTS" >"$OUT/sanitize-$tool.log" 2>&1 || status=$?
      tail -5 "$OUT/sanitize-$tool.log"
    done
    exit "$status"
    ;;
  bench)
    header
    install
    # Every implementation, real widths, bf16, forward / forward+backward / decode / prefill; then
    # the native backend once more with each CUDA forward path forced (which is faster decides
    # "auto"'s crossover, and native-vs-triton per case decides the GPU default).
    timeout 330 "$PY" -m moss_kernels.bench --device cuda --no-compile --out "$OUT/cuda-full" \
      --ops forward fwd_bwd decode prefill 2>&1 | tail -60
    for path in fused split; do
      MOSS_KERNELS_CUDA_FORWARD=$path timeout 100 "$PY" -m moss_kernels.bench --device cuda --no-compile --no-check \
        --impls native --ops forward --out "$OUT/native-$path" --quiet 2>&1 | tail -25
    done
    # the device tool brings back at most 8 files: one archive of the three result folders
    tar czf "$OUT/bench-results.tgz" -C "$OUT" cuda-full native-fused native-split
    rm -rf "$OUT/cuda-full" "$OUT/native-fused" "$OUT/native-split"
    ;;
  *)
    echo "usage: $0 test|sanitize|bench" >&2
    exit 2
    ;;
esac
