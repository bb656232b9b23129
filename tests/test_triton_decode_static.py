"""The Triton decode step checked without a GPU: its launch plan and cost model (plain ints), and its
kernels compiled for sm_90 with Triton's own ptxas (``triton_kernels.resources``), read from the
TTGIR and the SASS: the weight loads are 16 bytes wide, nothing spills.

Compiling needs real (not interpreted) kernels, so those checks run in a subprocess with
``TRITON_INTERPRET`` unset, as ``test_triton.py``'s resource check does.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton decode kernels need the triton package")

from moss_kernels.triton_kernels import decode as DEC

ANOLE = dict(d_in=4096, rank=256, k=2)  # Anole-7B / Chameleon-7B: hidden 4096, MLP 11008; the paper's r, k
H100_SMS = 132


@pytest.mark.parametrize("d_out", [4096, 11008])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_cost_model_spreads_each_weight_byte_once_over_at_least_every_sm(d_out, batch):
    """Every launch has at least one program per SM, each program's weight block is at most 1.1x the
    average (total / programs), and the blocks tile each weight exactly (every byte read once)."""
    cost = DEC.cost_model(ANOLE["d_in"], d_out, ANOLE["rank"], ANOLE["k"], batch, H100_SMS)
    for launch in ("text_shrink", "image_shrink", "expand"):
        c = cost[launch]
        assert c["programs"] >= H100_SMS, (launch, c)
        assert c["max_program_bytes"] <= 1.1 * c["mean_program_bytes"], (launch, c)
        assert c["covered_bytes"] == c["total_bytes"], (launch, c)
        assert c["passes"] == (1 if batch <= DEC.GPU_MAX_BLOCK_B else 2)
    r, d, kk = ANOLE["rank"], ANOLE["d_in"], ANOLE["k"] ** 2
    assert cost["weight_bytes"] == 2 * (r * d + r * d * kk + 2 * d_out * r)  # A_t, K, B_t, B_i in bf16
    assert cost["weight_bytes"] <= cost["floor_bytes"] <= 1.2 * cost["weight_bytes"]
    assert cost["floor_us"] == pytest.approx(cost["floor_bytes"] / 3.35e12 * 1e6)


@pytest.mark.parametrize("shape", [(19, 5, 1), (4096, 256, 4), (4096, 256, 1), (11008, 256, 4), (40, 260, 9),
                                   (4096, 64, 4)])
@pytest.mark.parametrize("sms", [1, 7, 132])
def test_plan_tiles_d_in_in_aligned_slices(shape, sms):
    d_in, rank, kk = shape
    p = DEC.plan(rank, d_in, kk, sms, DEC.GPU_GRAIN)
    assert p.slice_i % DEC.GPU_GRAIN == 0  # every program's loads start 16-byte aligned
    assert (p.ni - 1) * p.slice_i < d_in <= p.ni * p.slice_i  # no empty slice, nothing left over
    assert p.nc * p.block_c >= rank > (p.nc - 1) * p.block_c
    assert p.block_c * p.kkp <= DEC.SHRINK_COLS or p.block_c == 1
    assert p.programs >= min(sms, p.nc * -(-d_in // DEC.GPU_GRAIN))  # as many as SMs, where d_in allows


_PROBE = """
import json, sys
from moss_kernels.triton_kernels import resources
for batch in (1, 64):
    for row in resources.decode_load_report(90, batch=batch, kernels=("decode_shrink_kernel", "decode_expand_kernel")):
        print(json.dumps(row))
"""


@pytest.fixture(scope="module")
def hopper_decode():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=900)
    if run.returncode and ("ptxas" in run.stderr or "cuobjdump" in run.stderr) and "No such file" in run.stderr:
        pytest.skip(f"Triton's CUDA toolchain is not installed: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_hopper_decode_weight_loads_are_16_bytes_and_nothing_spills(hopper_decode):
    """bf16 inputs at Anole-7B block sizes, batch 1 (mma.sync tile) and 64 (wgmma tile): the main loop's
    weight loads (``wt``: conv weight / text A; ``b``: B_t / B_i) are pipelined 16-byte copies, and the
    SASS holds no global load narrower than 16 bytes other than the int64 position reads."""
    assert {(r["kernel"], r["batch"]) for r in hopper_decode} == {
        (k, b) for k in ("decode_shrink_kernel", "decode_expand_kernel") for b in (1, 64)}
    for r in hopper_decode:
        where = f"{r['kernel']} batch {r['batch']}"
        assert r["stack"] == 0, f"{where} spills: {r}"
        weights = [c for c in r["copies"] if c["name"] in ("wt", "b")]
        assert weights, f"{where}: no pipelined weight load found in {r['copies']}"
        for c in r["copies"]:
            assert c["bytes"] == 16, f"{where}: {c['name']} copied {c['bytes']} bytes at a time"
        sass = r["sass_loads"]
        assert any(op.startswith(("LDGSTS", "LDG")) and op.endswith(".128") for op in sass), sass
        narrow = {op: n for op, n in sass.items() if op.startswith("LDGSTS") and not op.endswith(".128")}
        assert not narrow, f"{where}: narrow async copies {narrow}"
        assert not any(op.startswith("LDG.") and ("16" in op.split(".")[-1] or op.endswith(".U8")) for op in sass), sass
        # What is left unpipelined: the int64 positions and the out tile's read-modify-write, no weight.
        plain = {(p["name"], p["dtype"]) for p in r["plain"]}
        assert plain <= {("pos", "i64"), ("o", "bf16")}, f"{where}: unpipelined loads {plain}"
