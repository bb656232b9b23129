#!/usr/bin/env bash
# Compile-checks the CUDA kernels without a GPU:
#   1. every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a, -Xptxas -v; prints ptxas's report per
#      kernel (registers, shared memory, stack) and FAILS on any warning, any stack frame (local
#      memory) or any spill;
#   2. instructions per matrix op in the SASS of the GEMM and the fused forward (sass_report.py,
#      when cuobjdump is found: $CUOBJDUMP, PATH, or the copy Triton bundles), one line per kernel
#      and arch ("sass FILE ARCH ..."), checked by tests/test_cuda_compile.py against a baseline;
#   3. (when Python with torch is found) the torch side, cuda_dispatch.cpp and binding.cpp's CUDA
#      path, with the host compiler in syntax-only mode against torch's headers (a CPU build of
#      torch lacks one generated header; an empty stand-in is supplied).
# Usage: csrc/check_cuda.sh            (env: NVCC, PYTHON, CXX; exit status 0 = clean)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
PYTHON="${PYTHON:-python}"
CXX="${CXX:-c++}"
ARCHS=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0

[ -x "$NVCC" ] || { echo "check_cuda: nvcc not found (set NVCC)"; exit 2; }
echo "check_cuda: $("$NVCC" --version | tail -1)"
printf '%-16s %-8s %5s %7s %6s %7s  %s\n' file arch regs smem stack spills kernel

for cu in "$HERE"/cuda/*.cu; do
  name="$(basename "$cu")"
  log="$TMP/$name.log"
  if ! "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas -v "${ARCHS[@]}" -I"$HERE" \
      -c "$cu" -o "$TMP/$name.o" >"$log" 2>&1; then
    cat "$log"
    echo "check_cuda: FAIL: $name does not compile"
    status=1
    continue
  fi
  if grep -qi "warning" "$log"; then
    grep -i "warning" "$log"
    echo "check_cuda: FAIL: $name compiles with warnings"
    status=1
  fi
  # ptxas -v prints, per kernel and arch: "Compiling entry function 'X' for 'sm_NN'", then
  # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R registers, ... M bytes smem".
  if ! awk -v file="$name" '
    function demangle(s,   cmd, out) {
      cmd = "c++filt \"" s "\" 2>/dev/null"; out = s
      if ((cmd | getline out) <= 0) out = s
      close(cmd); return out
    }
    /Compiling entry function/ {
      match($0, /function .[^'"'"']+/); fn = substr($0, RSTART + 10, RLENGTH - 10)
      match($0, /for .sm_[0-9a-z]+/); arch = substr($0, RSTART + 5, RLENGTH - 5)
      stack = spills = regs = smem = 0; next
    }
    /bytes stack frame/ {
      stack = $1; spills = $5 + $9
      if ($1 > 0 || $5 > 0 || $9 > 0) bad = 1
      next
    }
    /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
      if ($0 ~ /[1-9][0-9]* bytes lmem/) bad = 1
      k = demangle(fn); gsub(/\(anonymous namespace\)::/, "", k); sub(/^void /, "", k); sub(/\(.*/, "", k)
      gsub(/moss::cuda::/, "", k); gsub(/moss::/, "", k)
      printf "%-16s %-8s %5s %7s %6s %7s  %s\n", file, arch, regs, smem, stack, spills, k
      n++
    }
    END { if (n == 0) { print "check_cuda: no ptxas report for " file; exit 1 } exit bad }
  ' "$log"; then
    echo "check_cuda: FAIL: $name uses local memory (stack frame or spills)"
    status=1
  fi
done

if [ -z "${CUOBJDUMP:-}" ]; then
  CUOBJDUMP="$(command -v cuobjdump || true)"
  [ -n "$CUOBJDUMP" ] || CUOBJDUMP="$("$PYTHON" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null || true)"
fi
if [ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ]; then
  for obj in "$TMP/gemm.cu.o" "$TMP/fused_forward.cu.o"; do
    [ -f "$obj" ] || continue
    if ! "${PYTHON3:-python3}" "$HERE/sass_report.py" --cuobjdump "$CUOBJDUMP" "$obj"; then
      echo "check_cuda: FAIL: sass_report.py on $(basename "$obj")"
      status=1
    fi
  done
else
  echo "check_cuda: no cuobjdump (set CUOBJDUMP); skipped the SASS report"
fi

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  mapfile -t INC < <("$PYTHON" -c "import torch.utils.cpp_extension as c; print('\n'.join('-I' + p for p in c.include_paths()))")
  PYINC="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
  CUDA_INC=""
  for dir in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [ -n "$dir" ] && [ -f "$dir/include/cuda_runtime.h" ]; then CUDA_INC="$dir/include"; break; fi
  done
  mkdir -p "$TMP/stub/c10/cuda/impl"
  echo "#pragma once" >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for src in cuda_dispatch.cpp binding.cpp; do
    if ! "$CXX" -std=c++20 -Wall -fsyntax-only -DMOSS_WITH_CUDA -DTORCH_EXTENSION_NAME=moss_check \
        -I"$CUDA_INC" "${INC[@]}" -I"$PYINC" -I"$TMP/stub" -I"$HERE" "$HERE/$src" 2>"$TMP/$src.log"; then
      cat "$TMP/$src.log"
      echo "check_cuda: FAIL: $src (CUDA build) does not compile"
      status=1
    else
      echo "check_cuda: $src compiles with MOSS_WITH_CUDA"
    fi
  done
else
  echo "check_cuda: no Python with torch; skipped the host side"
fi

[ "$status" -eq 0 ] && echo "check_cuda: OK (no spills, no local memory)"
exit "$status"
