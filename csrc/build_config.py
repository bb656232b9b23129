"""How the native extension is built: sources, flags, CUDA archs and the source hash.

One place for ``setup.py`` (ahead-of-time build of ``moss_kernels._C``) and ``moss_kernels.native``
(JIT build with ninja at first use). Loaded by file path, so it imports nothing from the package
and nothing from torch.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"  # sm_80 and sm_90a cubins, compute_80 PTX for later GPUs


def cpu_sources(root: Path = HERE) -> list[str]:
    return [str(root / "binding.cpp"), *sorted(str(p) for p in (root / "cpu").glob("*.cpp"))]


def cuda_sources(root: Path = HERE) -> list[str]:
    return [str(root / "cuda_dispatch.cpp"), *sorted(str(p) for p in (root / "cuda").glob("*.cu"))]


def source_hash(root: Path = HERE) -> str:
    """sha256 over every source and header under ``root`` (paths and contents), 16 hex digits."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".cpp", ".h", ".cu", ".cuh", ".py"):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cxx_flags(with_cuda: bool, digest: str) -> list[str]:
    # The hash goes in as a bare token (ninja and the shell would strip quotes); binding.cpp
    # stringifies it.
    flags = ["-O3", "-fopenmp", f"-DMOSS_SOURCE_HASH={digest}"]
    if with_cuda:
        flags.append("-DMOSS_WITH_CUDA")
    return flags


def ld_flags() -> list[str]:
    return ["-fopenmp"]


def arch_flags(arch_list: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags from ``TORCH_CUDA_ARCH_LIST`` syntax (``"8.0;9.0a+PTX"``, spaces or
    semicolons); default ``DEFAULT_ARCH_LIST``. ``+PTX`` also embeds that arch's PTX."""
    if arch_list is None:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    flags = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[: -len("+PTX")] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not m:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {item!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_flags(digest: str, arch_list: str | None = None) -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DMOSS_WITH_CUDA", f"-DMOSS_SOURCE_HASH={digest}",
            *arch_flags(arch_list)]
