"""The CUDA kernels (csrc/cuda/*.cu) executed on the CPU by the SIMT harness (tests/simt), without
torch and without a GPU: odd shapes in fp32/fp16/bf16 against float64 loops, plain, under
ThreadSanitizer and under AddressSanitizer + UndefinedBehaviorSanitizer (any report fails), the
harness's own checks (divergent barriers, shuffle masks, wmma alignment and ldm, launch limits,
poisoned shared memory), its half/bf16 conversions against torch's bit for bit, and mutants of the
kernels that the harness or a sanitizer must catch.

The builds are cached (tests/simt/build.py); a cold run compiles three drivers and the mutants.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

SIMT = Path(__file__).resolve().parent / "simt"

if shutil.which("g++") is None:
    pytest.skip("the SIMT harness needs g++", allow_module_level=True)


def _load_build():
    spec = importlib.util.spec_from_file_location("moss_simt_build", SIMT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
_DRIVERS: dict = {}


def driver(mode: str) -> Path:
    if mode not in _DRIVERS:
        _DRIVERS[mode] = build.build_driver(mode)
    return _DRIVERS[mode]


def _sanitizer_works(flag: str) -> bool:
    proc = subprocess.run(["g++", f"-fsanitize={flag}", "-x", "c++", "-", "-o", "/dev/null"],
                          input="int main() { return 0; }", capture_output=True, text=True)
    return proc.returncode == 0


needs_tsan = pytest.mark.skipif(not _sanitizer_works("thread"), reason="g++ without ThreadSanitizer")
needs_asan = pytest.mark.skipif(not _sanitizer_works("address,undefined"), reason="g++ without ASan/UBSan")

# Every kernel entry point of csrc/include/moss_cuda.h the driver checks (moss_cuda.h's functions:
# gemm, fused_forward, shift_sum, state_update, fill_taps, decode_step).
# decode: 3 dtypes x k 1..4 x (d_in 45, d_in 144) + 3 at k = 4 with batch 40 + rank 600, out and ring each
DECODE_CHECKS = 56
# the rest: gemm 18 (every operand layout the dispatch passes, vector-aligned and not, mixed
# operand types), fused 18, shift / state / fill_taps 4
KERNEL_CHECKS = 40 + DECODE_CHECKS


def _passes(proc: subprocess.CompletedProcess, label: str) -> None:
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{label}: exit {proc.returncode}\n{report[-6000:]}"
    assert "FAIL" not in proc.stdout and "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, report


@pytest.mark.parametrize("mode", ["plain", pytest.param("tsan", marks=needs_tsan),
                                  pytest.param("asan", marks=needs_asan)])
def test_kernels_match_float64_loops(mode):
    """Every kernel on odd shapes (partial tiles and k slabs, gathered/scattered rows, masked taps,
    rank chunks, k = 1..4 decode) in all three dtypes; under the sanitizers any report fails."""
    proc = build.run(driver(mode), "kernels")
    _passes(proc, mode)
    assert sum(line.startswith("ok ") for line in proc.stdout.splitlines()) == KERNEL_CHECKS, proc.stdout


def test_decode_with_the_sms_of_an_h100():
    """The decode step's d_in split follows the SM count (132: more slices per rank tile than the
    default 8); the results still match the float64 loops."""
    proc = build.run(driver("plain"), "kernels", "decode", env={"SIMT_SM_COUNT": "132"})
    _passes(proc, "132 SMs")
    assert sum(line.startswith("ok ") for line in proc.stdout.splitlines()) == DECODE_CHECKS, proc.stdout


def test_offsets_past_2_31_elements():
    proc = build.run(driver("plain"), "huge")
    _passes(proc, "huge")
    assert "ok   gemm with offsets past 2^31" in proc.stdout


SELF_TESTS = ["divergent_barrier", "early_exit", "shfl_partial", "shfl_mask", "shfl_missing_lane", "shfl_down",
              "wmma_ok", "wmma_misaligned", "wmma_ldm", "wmma_partial_warp", "unwritten_shared", "smem_limit",
              "bad_config"]


@pytest.mark.parametrize("name", SELF_TESTS)
def test_harness_behaviour(name):
    """The harness reports misuse as a launch error naming the call site, and runs legal code."""
    proc = build.run(driver("plain"), "self", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


@needs_tsan
@pytest.mark.parametrize("name", ["block_race", "intra_block_race"])
def test_tsan_sees_races_between_and_within_blocks(name):
    """Blocks run concurrently on worker threads and the fibers of a block are ordered only by its
    barriers, so both kinds of race are reported."""
    proc = build.run(driver("tsan"), "self", name)
    assert proc.returncode == 66 and "ThreadSanitizer: data race" in proc.stderr, proc.stdout + proc.stderr
    assert f"{name}_kernel" in proc.stderr


def test_half_bf16_conversions_are_cudas(tmp_path):
    """float -> half / bf16 round to nearest even exactly as CUDA does (NaN -> 0x7fff), back exactly;
    checked against torch's conversions (also RNE) on every exponent with the mantissas at the
    rounding boundaries, subnormals included, plus a million random patterns."""
    path = tmp_path / "conv.bin"
    proc = build.run(driver("plain"), "convert", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = path.read_bytes()
    rec = struct.calcsize("<IHHII")
    assert len(raw) % rec == 0
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, rec)
    u = data[:, 0:4].contiguous().view(torch.int32).view(-1)
    h = data[:, 4:6].contiguous().view(torch.int16).view(-1)
    b = data[:, 6:8].contiguous().view(torch.int16).view(-1)
    h_back = data[:, 8:12].contiguous().view(torch.int32).view(-1)
    b_back = data[:, 12:16].contiguous().view(torch.int32).view(-1)
    f = u.view(torch.float32)
    nan = torch.isnan(f)
    want_h = torch.where(nan, torch.tensor(0x7FFF, dtype=torch.int16), f.to(torch.float16).view(torch.int16))
    want_b = torch.where(nan, torch.tensor(0x7FFF, dtype=torch.int16), f.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(h, want_h), f"{(h != want_h).sum()} half mismatches, e.g. {f[h != want_h][:4]}"
    assert torch.equal(b, want_b), f"{(b != want_b).sum()} bf16 mismatches"
    assert torch.equal(h_back, h.view(torch.float16).float().view(torch.int32))
    assert torch.equal(b_back, b.view(torch.bfloat16).float().view(torch.int32))
    assert nan.sum() > 1000 and (f.abs() < 6e-5).sum() > 1000  # NaNs and fp16 subnormals were covered


# ---------------------------------------------------------------------------------------- mutants
# (name, file under csrc/cuda, text, replacement, build mode, driver arguments, what must show)
MUTANTS = [
    ("gemm: no barrier between the tile loads and the MMAs", "tile_gemm.cuh",
     "everyone's\n    __syncthreads();\n", "everyone's\n", "plain", ("kernels", "gemm"), "FAIL"),
    ("gemm: no barrier before the next slab overwrites the tiles", "tile_gemm.cuh",
     "    __syncthreads();  // nobody reads slab s any more", "    // nobody reads slab s any more", "tsan",
     ("kernels", "gemm"), "ThreadSanitizer: data race"),
    ("cp.async: the MMAs read a slab whose copies were not waited for", "tile_gemm.cuh", "cp_async_wait<1>();",
     "cp_async_wait<2>();", "plain", ("kernels", "gemm"), "FAIL"),
    ("tile loads: off-by-one row bound", "tile_gemm.cuh", "if (KC && gmn < s.mn_ext) {",
     "if (KC && gmn <= s.mn_ext) {", "asan",
     ("kernels", "gemm"), "AddressSanitizer"),
    ("tile epilogue: 32-bit output offset", "tile_gemm.cuh", "const int64_t off = row * c.ld + gj;",
     "const int off = static_cast<int>(row * c.ld + gj);", "plain", ("huge",), None),
    ("shared rows: a padding that breaks 16-byte rows (cp.async, wmma ldm)", "tile_gemm.cuh",
     "constexpr int PAD = 8;", "constexpr int PAD = 4;",
     "plain", ("kernels", "gemm"), "is not 16-byte aligned"),
    ("tile loads: the tail past the matrix left unzeroed", "tile_gemm.cuh",
     "          cp_async16(stage.at(chunk_mn(q), chunk_k(q)), g, bytes);",
     "          if (bytes > 0) cp_async16(stage.at(chunk_mn(q), chunk_k(q)), g, bytes);", "plain",
     ("kernels", "gemm"), "FAIL"),
    ("fused forward: no shared-memory attribute", "fused_forward.cu", "if (!grant_smem<CT>(device, bytes)) {",
     "if (false && !grant_smem<CT>(device, bytes)) {", "plain", ("kernels", "fused"),
     "above the kernel's limit"),
    ("fused forward: no barrier after the source-row table", "fused_forward.cu",
     "        src_row[threadIdx.x] = src;\n      }\n      __syncthreads();\n",
     "        src_row[threadIdx.x] = src;\n      }\n", "tsan", ("kernels", "fused"), "ThreadSanitizer: data race"),
    ("fused forward: a barrier inside a branch", "fused_forward.cu",
     "        src_row[threadIdx.x] = src;\n      }\n      __syncthreads();\n",
     "        src_row[threadIdx.x] = src;\n        __syncthreads();\n      }\n", "plain", ("kernels", "fused"),
     "divergent __syncthreads"),
    ("decode: the ring update without the last d_in slice's sums", "decode.cu",
     "for (int64_t s = 0; s < p.image.slices; ++s)", "for (int64_t s = 0; s + 1 < p.image.slices; ++s)", "plain",
     ("kernels", "decode"), "FAIL"),
    ("decode: every lane holding a sum writes its shared slot", "decode.cu",
     "const bool owner = lane % (32 / NP) == 0 && mine < N;", "const bool owner = mine < N;", "tsan",
     ("kernels", "decode"), "ThreadSanitizer: data race"),
    ("decode: 16-byte loads of rows no vector can read", "decode.cu",
     "return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0",
     "return true || (reinterpret_cast<uintptr_t>(p) % 16 == 0", "asan", ("kernels", "decode"), "misaligned"),
    ("warp sums: a shuffle mask of half the warp", "decode.cu", "__shfl_xor_sync(0xffffffffu, send, OFF)",
     "__shfl_xor_sync(0x0000ffffu, send, OFF)", "plain", ("kernels", "decode"), "which is not in the mask"),
    ("shift: a state write past the slot's channels", "shift.cu", "out[row * r + c] = sum;",
     "out[row * r + c + 1] = sum;", "asan", ("kernels", "shift"), "AddressSanitizer"),
]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(mutant):
    name, file, old, new, mode, args, signature = mutant
    if not _sanitizer_works({"plain": "undefined", "tsan": "thread", "asan": "address,undefined"}[mode]):
        pytest.skip(f"g++ without the {mode} runtime")
    exe = build.build_driver(mode, mutant=(file, old, new))
    proc = build.run(exe, *args)
    report = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"mutant '{name}' was not caught:\n{report[-4000:]}"
    if signature is not None:
        assert signature in report, f"mutant '{name}' failed differently:\n{report[-4000:]}"
    else:  # the 32-bit offset lands on the wrong element or outside the mapping
        assert "FAIL" in proc.stdout or proc.returncode < 0, report[-4000:]


def test_kernels_declare_no_static_shared_memory():
    """The harness poisons dynamic shared memory before every block, and static ``__shared__`` only
    through an ELF section that g++ drops for a template's function-local statics (every kernel here
    is a template), so static shared memory would escape the poisoning silently: the kernels use
    MOSS_DYNAMIC_SHARED only."""
    import re

    csrc = SIMT.parent.parent / "csrc" / "cuda"
    found = []
    for path in sorted([*csrc.glob("*.cu"), *csrc.glob("*.cuh")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if re.search(r"\b__shared__\b", code) and "extern __shared__" not in code:
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, "static __shared__ in the kernels (use MOSS_DYNAMIC_SHARED):\n" + "\n".join(found)
