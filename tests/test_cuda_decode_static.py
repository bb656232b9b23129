"""Static checks of the weight-stationary CUDA decode step (csrc/cuda/decode.cu), without a GPU.

* The cost model (csrc/decode_cost.py) at Anole-7B shapes: every weight-reading launch spreads each
  modality's weights over at least as many blocks as an H100 has SMs, and no block reads more than
  1.1x an even share (total weight bytes / blocks).
* The model is the kernel's split: its workspace size (slices x batch x taps x rank partial sums, z,
  row flags) equals decode_workspace_floats of the compiled decode.cu on the SIMT harness's driver
  with 132 (and 8) emulated SMs.
* The compiled SASS (nvcc for sm_90a, cuobjdump -sass): the weight-reading kernels of the 16-byte
  path load every weight element of a pass with 16-byte loads (LDG.E.128 count = the vectors a lane
  holds per pass), all of them inside a loop, and no kernel of decode.cu touches local memory; the
  scalar path (rows that no 16-byte vector can read) has no 16-byte load, so the count can fail.

Cost: the model checks take milliseconds; the SASS check compiles decode.cu once for sm_90a (about
15 s of CPU); the workspace check reuses the harness driver of tests/test_simt.py (built there, else
here: about a minute).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


cost = _load("moss_decode_cost", CSRC / "decode_cost.py")

SMS = 132  # an H100 SXM
ANOLE = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (d_in, d_out) of Anole-7B's adapted linears
RANK, K = 256, 2


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("d_in,d_out", ANOLE)
@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["half", "fp32"])
def test_each_block_reads_an_even_share_of_the_weights(batch, d_in, d_out, image, elem_bytes):
    m = cost.decode_cost(batch, d_in, d_out, RANK, K, elem_bytes, SMS, image_rows=image)
    kk = K * K if image else 1
    assert m["down"].total_bytes == RANK * d_in * kk * elem_bytes
    assert m["up"].total_bytes == d_out * RANK * elem_bytes
    for launch in (m["down"], m["up"]):
        assert launch.blocks >= SMS, launch
        assert launch.block_bytes <= 1.1 * launch.total_bytes / launch.blocks, launch
    # every weight byte is read once: the blocks' shares cover the weights exactly once
    split = cost.down_split(RANK, d_in, kk, elem_bytes, SMS)
    assert split.slices * split.per >= split.chunks > (split.slices - 1) * split.per
    assert split.chunks * split.chunk == d_in * kk
    assert m["floor_s"] == pytest.approx(m["weight_bytes"] / 3.35e12)
    # up to 64 rows (k = 2) run over one load of the weights
    assert cost.group_rows(kk) >= batch and cost.group_rows(1) >= batch
    # at batch 1 the step is bound by the weight bytes, not by the FMA/shuffle issue
    if batch == 1:
        assert m["issue_s"] < 0.25 * m["floor_s"] and m["time_s"] <= 1.01 * m["floor_s"]


def test_small_ranks_and_widths_still_fill_the_gpu():
    """Fewer rank tiles take more d_in slices, but a slice never has fewer than 32 chunks (every lane
    of a pass busy; more slices would only add partial sums): rank 64 fills the SMs, rank 16 takes
    the 64 slices of 32 chunks d_in 4096 has, tiny d_in one slice."""
    s = cost.down_split(64, 4096, 4, 2, SMS)
    assert s.blocks >= SMS and s.per >= 32
    s = cost.down_split(16, 4096, 4, 2, SMS)
    assert (s.slices, s.per, s.blocks) == (64, 32, 64)
    assert cost.down_split(16, 64, 4, 2, SMS).slices == 1
    assert cost.down_split(0, 4096, 4, 2, SMS).blocks == 0


# ---------------------------------------------------------------------------- the model is the kernel's split
def _driver():
    if shutil.which("g++") is None:
        pytest.skip("the SIMT harness needs g++")
    build = _load("moss_simt_build", ROOT / "tests" / "simt" / "build.py")
    return build, build.build_driver("plain")


@pytest.mark.parametrize("sms", [8, SMS])
def test_model_split_is_the_compiled_split(sms):
    build, exe = _driver()
    cases = [("bf16", 2, 2, b, d_in, d_out, RANK, RANK) for b in (1, 8, 64) for d_in, d_out in ANOLE]
    cases += [("f32", 4, 2, 8, 4096, 4096, RANK, 0), ("f16", 2, 3, 5, 1000, 64, 40, 24),
              ("bf16", 2, 4, 3, 144, 70, 130, 0), ("f32", 4, 1, 7, 72, 100, 8, 8)]
    for dt, eb, k, batch, d_in, d_out, r, r_text in cases:
        proc = build.run(exe, "decode_plan", dt, str(k), str(batch), str(d_in), str(d_out), str(r), str(r_text),
                         env={"SIMT_SM_COUNT": str(sms)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got = int(re.search(r"workspace (\d+)", proc.stdout).group(1))
        want = cost.workspace_floats(batch, d_in, r, r_text, k, eb, sms)
        assert got == want, (dt, k, batch, d_in, r, r_text, sms)


# ---------------------------------------------------------------------------- SASS
def _nvcc():
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\()?\s*(0x[0-9a-f]+)")


def _kernels(listing: str) -> dict[str, list[tuple[int, str]]]:
    """Demangled kernel name -> [(address, instruction)] of a cuobjdump -sass listing (one arch)."""
    found: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in listing.splitlines():
        if m := _FUNC.match(line):
            current = m.group(1)
            found[current] = []
        elif current and (m := _INSN.match(line)):
            found[current].append((int(m.group(1), 16), m.group(2).strip()))
    names = list(found)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    pretty = [re.sub(r"\(anonymous namespace\)::|moss::cuda::|^void |\(.*$", "", d) for d in demangled[:len(names)]]
    return {p: found[n] for p, n in zip(pretty, names)}


def _in_loops(body: list[tuple[int, str]]) -> list[bool]:
    """Whether each instruction lies inside a backward branch's region (a loop)."""
    inside = [False] * len(body)
    index = {addr: i for i, (addr, _) in enumerate(body)}
    for i, (addr, text) in enumerate(body):
        m = _BRA.match(text)
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            for j in range(index[int(m.group(1), 16)], i + 1):
                inside[j] = True
    return inside


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC or put it on PATH)")
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt not found")
    find = _load("moss_sass_report", CSRC / "sass_report.py").find_cuobjdump
    tool = find()
    if tool is None:
        pytest.skip("cuobjdump not found (set CUOBJDUMP)")
    obj = tmp_path_factory.mktemp("decode_sass") / "decode.o"
    subprocess.run([nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
                    f"-I{CSRC}", "-c", str(CSRC / "cuda" / "decode.cu"), "-o", str(obj)], check=True,
                   capture_output=True, text=True, timeout=600)
    proc = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, check=True)
    return _kernels(proc.stdout)


DTYPES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def _vectors_per_pass(elem_bytes: int, kk: int) -> int:
    """16-byte loads a lane issues per pass of one warp_rows_dot: 2 rows x NJ chunks x C / V vectors."""
    c, _, nj = cost.chunking(elem_bytes, kk)
    return cost.ROWS_PER_WARP * nj * c // (16 // elem_bytes)


def _wide_loads(body):
    """(index, opcode) of the 16-byte global loads (LDG.E.128, LDG.E.128.CONSTANT, ...), predicated or not."""
    ops = [(i, re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]) for i, (_, text) in enumerate(body)]
    return [(i, op) for i, op in ops if op.startswith("LDG.") and ".128" in op]


def test_weight_loads_are_16_bytes_inside_the_main_loops(sass):
    kernels = [name for name in sass if name.startswith("decode_")]
    assert len(kernels) == 34, kernels  # down 3 dtypes x k 1..4 x 2 paths, up 3 x 2, reduce 4
    for name in kernels:
        body = sass[name]
        assert not any(re.search(r"\b(LDL|STL)\b", text) for _, text in body), f"{name}: local memory"
    for dtype, eb in DTYPES.items():
        for k in range(1, 5):
            for vec in (True, False):
                name = f"decode_down_kernel<{dtype}, {k}, {str(vec).lower()}>"
                body = sass[name]
                wide = _wide_loads(body)
                if not vec:
                    assert not wide, f"{name}: the scalar path has 16-byte loads"
                    continue
                # text tile (kk = 1) + image tile (kk = k * k): every weight vector of a pass
                assert len(wide) == _vectors_per_pass(eb, 1) + _vectors_per_pass(eb, k * k), (name, len(wide))
                inside = _in_loops(body)
                assert all(inside[i] for i, _ in wide), f"{name}: a 16-byte weight load outside the pass loop"
        for vec in (True, False):
            name = f"decode_up_kernel<{dtype}, {str(vec).lower()}>"
            wide = _wide_loads(sass[name])
            assert len(wide) == (_vectors_per_pass(eb, 1) if vec else 0), (name, len(wide))
            inside = _in_loops(sass[name])
            assert all(inside[i] for i, _ in wide), f"{name}: a 16-byte weight load outside the pass loop"
