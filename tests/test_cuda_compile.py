"""The CUDA kernels compile cleanly (no GPU needed): csrc/check_cuda.sh runs nvcc for sm_80 and
sm_90a with ptxas's resource report and fails on any spill or local memory; it also compiles the
torch side of the CUDA build. Plus the arch-list parsing the JIT and setup.py builds share."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc():
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _build_config():
    spec = importlib.util.spec_from_file_location("moss_build_config", CSRC / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set NVCC or put it on PATH)")
def test_kernels_compile_without_spills():
    env = dict(os.environ, NVCC=_nvcc())
    proc = subprocess.run(["bash", str(CSRC / "check_cuda.sh")], capture_output=True, text=True, env=env,
                          timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    rows = [line.split() for line in report.splitlines() if line.split()[:1] and line.split()[0].endswith(".cu")]
    kernels = {(row[0], row[1], " ".join(row[6:])) for row in rows}
    for arch in ("sm_80", "sm_90a"):
        # the GEMM and the fused forward in all three compute types, the decode step for k = 1..4 x
        # three dtypes
        assert sum(1 for f, a, _ in kernels if f == "gemm.cu" and a == arch) == 3, report
        assert sum(1 for f, a, _ in kernels if f == "fused_forward.cu" and a == arch) == 3, report
        assert sum(1 for f, a, _ in kernels if f == "decode.cu" and a == arch) == 12, report
        assert sum(1 for f, a, _ in kernels if f == "shift.cu" and a == arch) == 3, report
    assert all(row[4] == "0" and row[5] == "0" for row in rows), report  # stack, spills


def test_arch_flags_default_and_env():
    config = _build_config()
    default = config.arch_flags(config.DEFAULT_ARCH_LIST)
    assert "-gencode=arch=compute_80,code=sm_80" in default
    assert "-gencode=arch=compute_90a,code=sm_90a" in default
    assert "-gencode=arch=compute_80,code=compute_80" in default  # PTX for later GPUs
    assert config.arch_flags("8.6 9.0+PTX") == [
        "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="sm_eighty"):
        config.arch_flags("sm_eighty")


def test_source_hash_tracks_sources(tmp_path):
    config = _build_config()
    (tmp_path / "a.cpp").write_text("int a;")
    first = config.source_hash(tmp_path)
    (tmp_path / "a.cpp").write_text("int b;")
    assert config.source_hash(tmp_path) != first
