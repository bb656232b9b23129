"""The native backend: the compiled ``csrc/`` extension (CPU kernels, and CUDA kernels in a CUDA build).

On import this module finds the extension and registers the ``"native"`` backend:

1. ``moss_kernels._C``, built by ``pip install --no-build-isolation .`` (or ``-e .``), is used when it
   was built against the installed torch and, in a source checkout, from the current ``csrc/``;
2. otherwise ``csrc/`` is compiled with ninja (``torch.utils.cpp_extension.load``) into a cache
   directory keyed by the torch version, the Python version, CUDA or not and the sources' hash,
   so the build happens once per environment (a few minutes on two cores) and later imports load it.

CUDA kernels are built only where torch has CUDA and nvcc is found (``CUDA_HOME``); the archs come
from ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0+PTX;9.0a"``: sm_80, sm_90a and compute_80 PTX).

Environment:

* ``MOSS_KERNELS_NATIVE=0`` — do not load or build the extension (no ``"native"`` backend);
* ``MOSS_KERNELS_FORCE_BUILD=1`` — ignore ``_C`` and any cached build and compile again;
* ``MOSS_KERNELS_CACHE_DIR`` — where JIT builds go (default ``$XDG_CACHE_HOME/moss_kernels`` or
  ``~/.cache/moss_kernels``);
* ``MOSS_KERNELS_VERBOSE_BUILD=1`` — show the compiler's lines while building;
* ``MOSS_KERNELS_CUDA_FORWARD=auto|fused|split`` — the CUDA forward path at import (see
  ``cuda_forward_path``; for benchmarking one path across a whole run).

A JIT build says so on stderr before it starts (what, why, about how long, where, how to skip it)
and when it ends. Any failure raises ``ImportError`` with the cause in one line (e.g.
``/bin/sh: 1: c++: not found``) and the path of the full build log; ``moss_kernels.backends``
records it, warns once and falls back to the other backends, so ``import moss_kernels`` never
breaks. ``MOSS_KERNELS_NATIVE=0`` raises ``BackendDisabled``: recorded, never warned about.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .backends import Backend, BackendDisabled, register_backend
from .build_messages import build_notice, failure_cause
from . import native_deform

__all__ = ["NativeBackend", "build_info", "cuda_forward_path", "extension"]

_PKG = Path(__file__).resolve().parent
# A source checkout (editable install) has csrc/ beside the package; a wheel ships it as _csrc.
_CSRC_CANDIDATES = (_PKG.parent / "csrc", _PKG / "_csrc")


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "no", "off")


def _csrc() -> Optional[Path]:
    for path in _CSRC_CANDIDATES:
        if (path / "build_config.py").is_file() and (path / "binding.cpp").is_file():
            return path
    return None


def _build_config(csrc: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_moss_kernels_build_config", csrc / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def _prebuilt(csrc: Optional[Path], config: Optional[ModuleType]) -> tuple[Optional[ModuleType], str]:
    """``moss_kernels._C`` if it fits this environment, else ``(None, why not)``."""
    try:
        from . import _C
    except ImportError as e:
        return None, f"no prebuilt moss_kernels._C ({e})"
    if _C.torch_version != _torch_version():
        return None, f"moss_kernels._C was built against torch {_C.torch_version}, this is {_torch_version()}"
    if config is not None and _C.source_hash != config.source_hash(csrc):
        return None, "moss_kernels._C was built from other csrc/ sources"
    if _want_cuda() and not _C.with_cuda():
        return None, "moss_kernels._C has no CUDA kernels but torch and nvcc have CUDA"
    return _C, ""


def _cache_root() -> Path:
    if os.environ.get("MOSS_KERNELS_CACHE_DIR"):
        return Path(os.environ["MOSS_KERNELS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moss_kernels"


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Serialise builds of one cache directory across processes with a lock the kernel releases when
    its holder dies. torch's own ``lock`` file is not released by a killed build (a test timeout, a
    Ctrl-C) and makes every later import wait forever; under this lock any such file is stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    with open(build_dir / "moss_build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jit_build(csrc: Path, config: ModuleType, force: bool, why: str) -> ModuleType:
    from torch.utils.cpp_extension import load, verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError as e:
        raise ImportError(f"cannot build the native extension: ninja is missing ({e}); pip install ninja") from None
    with_cuda = _want_cuda()
    digest = config.source_hash(csrc)
    tag = (f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{'cu' + str(torch.version.cuda) if with_cuda else 'cpu'}-{digest}").replace("+", "_")
    build_dir = _cache_root() / tag
    if force and build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = config.cpu_sources(csrc) + (config.cuda_sources(csrc) if with_cuda else [])
    name = f"moss_kernels_native_{digest}"
    fresh = not any(build_dir.glob(f"{name}*.so"))  # else ninja only checks and loads the cached one
    if fresh:
        print(build_notice(why, build_dir, len(sources), with_cuda), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        with _build_lock(build_dir):
            ext = load(
                name=name,
                sources=sources,
                extra_cflags=config.cxx_flags(with_cuda, digest),
                extra_cuda_cflags=config.nvcc_flags(digest) if with_cuda else None,
                extra_ldflags=config.ld_flags(),
                extra_include_paths=[str(csrc)],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=_flag("MOSS_KERNELS_VERBOSE_BUILD", "0"),
            )
    except Exception as e:
        log = build_dir / "build-failure.log"
        log.write_text(f"{type(e).__name__}: {e}\n")
        raise ImportError(f"building the native extension failed: {failure_cause(str(e))} "
                          f"(full log: {log})") from e
    if fresh:
        print(f"moss_kernels: native extension built in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return ext


def _load() -> tuple[ModuleType, str]:
    if not _flag("MOSS_KERNELS_NATIVE", "1"):
        raise BackendDisabled("the native backend is disabled (MOSS_KERNELS_NATIVE=0)")
    csrc = _csrc()
    config = _build_config(csrc) if csrc is not None else None
    force = _flag("MOSS_KERNELS_FORCE_BUILD", "0")
    why = "MOSS_KERNELS_FORCE_BUILD=1"
    if not force:
        ext, why = _prebuilt(csrc, config)
        if ext is not None:
            return ext, "prebuilt moss_kernels._C"
    if csrc is None:
        raise ImportError(f"{why}, and no csrc/ sources to build from; reinstall with "
                          "`pip install --no-build-isolation .`")
    return _jit_build(csrc, config, force, why), f"JIT build ({why})"


extension, _origin = _load()

if os.environ.get("MOSS_KERNELS_CUDA_FORWARD"):  # the CUDA forward path for a whole run (benchmarks)
    try:
        extension.set_cuda_forward_path(os.environ["MOSS_KERNELS_CUDA_FORWARD"])
    except ValueError as e:
        raise ValueError(f"environment variable MOSS_KERNELS_CUDA_FORWARD: {e}") from None


def build_info() -> dict:
    """Where the extension came from and what it contains."""
    return {"origin": _origin, "file": getattr(extension, "__file__", None), "torch_version": extension.torch_version,
            "source_hash": extension.source_hash, "with_cuda": extension.with_cuda()}


@contextlib.contextmanager
def cuda_forward_path(name: str, ext: Optional[ModuleType] = None):
    """Run the CUDA forward through path ``name`` inside the block, then restore the previous one.

    ``"auto"`` (the default): the one-pass fused kernel where it applies and the batch has at least
    one 64-row tile per SM, else the split path;
    ``"fused"``: the fused kernel, or an error where it cannot run (a pending state, a rank it cannot
    hold); ``"split"``: down-GEMM, shifts, up-GEMM. Process-wide (not per thread): for tests and
    benchmarks. Any other name raises ``ValueError`` naming the argument ``'path'``. ``ext``: another
    build of the same sources (the tests' SIMT harness build), default this backend's extension.
    """
    ext = extension if ext is None else ext
    previous = ext.cuda_forward_path()
    ext.set_cuda_forward_path(name)
    try:
        yield
    finally:
        ext.set_cuda_forward_path(previous)


def _x_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with a unit column stride (any row stride)."""
    return x if x.dim() == 2 and (x.shape[1] <= 1 or x.stride(1) == 1) else x.contiguous()


class NativeBackend(Backend):
    """The compiled kernels; arguments and results exactly those of ``reference.forward``,
    ``reference.backward`` and ``reference.decode_step``. float32/float16/bfloat16 with float32
    accumulation (float64 stays with the reference backend). ``ext``: the compiled module, default
    this package's; the tests pass the SIMT harness build of the same sources, so the glue below is
    what they run too."""

    name = "native"

    def __init__(self, ext: Optional[ModuleType] = None):
        self.ext = extension if ext is None else ext

    def is_available(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cpu":
            return True
        return device.type == "cuda" and self.ext.with_cuda() and torch.cuda.is_available()

    def supports(self, device: torch.device, dtype: torch.dtype, kernel_size: int) -> bool:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        return torch.device(device).type == "cpu" or kernel_size <= self.ext.max_cuda_kernel_size()

    def forward(self, x, out, text_rows, image_rows, conv_sources, text_a, text_b, image_weight, image_b, scale,
                pending=None, state_index=None):
        si = state_index if state_index is not None else (None,) * 5
        return self.ext.forward(_x_rows(x), out, text_rows, image_rows, conv_sources, text_a, text_b, image_weight,
                                image_b, float(scale), pending, *si)

    def backward(self, grad_out, x, text_rows, image_rows, conv_targets, text_a, text_b, image_weight, image_b,
                 text_h, image_z, scale, needs_x=True):
        return self.ext.backward(_x_rows(grad_out), _x_rows(x), text_rows, image_rows, conv_targets, text_a, text_b,
                                 image_weight, image_b, text_h, image_z, float(scale), bool(needs_x))

    def decode_step(self, x, out, text_a, text_b, image_weight, image_b, scale, pending, image_pos, height, width):
        self.ext.decode_step(_x_rows(x), out, text_a, text_b, image_weight, image_b, float(scale), pending,
                             image_pos, height, width)

    # Deformable attention (contract: deform_reference.py): CPU kernels, every float dtype.
    deform_forward = staticmethod(native_deform.ms_deform_forward)
    deform_backward = staticmethod(native_deform.ms_deform_backward)
    mmfs_forward = staticmethod(native_deform.mmfs_forward)
    mmfs_backward = staticmethod(native_deform.mmfs_backward)

    def supports_deform(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and hasattr(extension, "mmfs_forward")


register_backend(NativeBackend())
