"""The test-only torch extension of the SIMT harness: csrc/binding.cpp, csrc/cuda_dispatch.cpp (the
CUDA build's launch sequences, unchanged) and csrc/cuda/*.cu compiled as C++ against the harness,
with ``MOSS_SIMT`` so that CPU tensors take the CUDA path. Registered as the backend
``"simt_cuda"`` only inside tests (``registered()``), never offered to users as a compute backend.

The build is cached under ``~/.cache/moss_kernels/simt`` (``$MOSS_SIMT_CACHE``), one directory per
torch and Python version, rebuilt incrementally by ninja when csrc/ or tests/simt/ change.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional
from collections.abc import Iterator

import torch

SIMT = Path(__file__).resolve().parent
ROOT = SIMT.parent.parent
CSRC = ROOT / "csrc"
BACKEND = "simt_cuda"

_EXT: Optional[ModuleType] = None
_LIB: Optional[ctypes.CDLL] = None


def _build_module():
    spec = importlib.util.spec_from_file_location("moss_simt_build", SIMT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moss_simt_build_config", CSRC / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension() -> ModuleType:
    """The harness build of the native extension (built on first use, a few minutes on two cores)."""
    global _EXT, _LIB
    if _EXT is not None:
        return _EXT
    from torch.utils.cpp_extension import load

    config = _build_config()
    # One build directory per torch and Python: ninja recompiles only what changed (torch's loader
    # tracks the sources, flags and headers and bumps the module's version when they change).
    tag = f"ext-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "_")
    build_dir = _build_module().cache_dir() / tag
    (build_dir / "wrap").mkdir(parents=True, exist_ok=True)
    # torch compiles .cu files with nvcc: each kernel file goes in through a C++ file that includes it.
    wrappers = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        w = build_dir / "wrap" / f"simt_{cu.stem}.cpp"
        text = f'// generated: the SIMT harness compiles {cu.name} as C++\n#include "{cu}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    sources = [*config.cpu_sources(CSRC), str(CSRC / "cuda_dispatch.cpp"), *wrappers, str(SIMT / "simt.cpp")]
    _EXT = load(
        name="moss_simt",
        sources=sources,
        extra_cflags=["-O2", "-fopenmp", "-Wno-unknown-pragmas", "-DMOSS_WITH_CUDA", "-DMOSS_SIMT",
                      "-DMOSS_SOURCE_HASH=simt"],  # a constant: a changing flag would rebuild every file
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(SIMT / "include"), str(CSRC)],
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=os.environ.get("MOSS_KERNELS_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    _LIB = ctypes.CDLL(_EXT.__file__)
    _LIB.simt_launches.restype = ctypes.c_long
    _LIB.simt_launches.argtypes = [ctypes.c_char_p]
    _LIB.simt_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return _EXT


def launches(prefix: str = "") -> int:
    """Kernel launches so far whose kernel (as written at its launch site) starts with `prefix`."""
    extension()
    return int(_LIB.simt_launches(prefix.encode()))


def configure(sm_count: int = 0, smem_optin: int = 0, workers: int = 0) -> None:
    """The emulated device (0 keeps the default: 8 SMs, 232448 bytes of opt-in shared memory, 2
    worker threads running blocks concurrently)."""
    extension()
    _LIB.simt_configure(sm_count, smem_optin, workers)


def backend():
    """A ``Backend`` running the harness extension on CPU tensors: the native backend's own glue
    (``NativeBackend``) over the harness build, which stands for a CUDA device."""
    from moss_kernels.native import NativeBackend

    class SimtBackend(NativeBackend):
        name = BACKEND

        def is_available(self, device: torch.device) -> bool:
            return torch.device(device).type == "cpu"

        def supports(self, device: torch.device, dtype: torch.dtype, kernel_size: int) -> bool:
            floating = dtype in (torch.float32, torch.float16, torch.bfloat16)
            return floating and kernel_size <= self.ext.max_cuda_kernel_size()

        def supports_deform(self, device: torch.device, dtype: torch.dtype) -> bool:
            return False  # the deformable kernels are CPU-only: nothing of the harness to test there

    return SimtBackend(extension())


@contextlib.contextmanager
def registered() -> Iterator[ModuleType]:
    """Registers the ``"simt_cuda"`` backend for the block (tests only) and removes it afterwards."""
    from moss_kernels import backends

    backends.register_backend(backend())
    try:
        yield extension()
    finally:
        backends._BACKENDS.pop(BACKEND, None)


def forward_path(name: str):
    """The harness extension's CUDA forward path for the block (its own process-wide switch)."""
    from moss_kernels.native import cuda_forward_path

    return cuda_forward_path(name, extension())
