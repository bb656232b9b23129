"""Build script.

``pip install --no-build-isolation .`` (or ``-e .``): the native extension is compiled against the
torch already installed (an isolated build environment would pull its own torch and break the
ABI, hence no torch in ``[build-system]``). ``triton_kernels/`` installs as
``moss_kernels.triton_kernels``.

The native extension ``moss_kernels._C`` (``csrc/``) is built here only when torch is importable
(so never inside an isolated build, which would pull its own torch); its CUDA kernels only when
torch has CUDA and nvcc is found, for ``TORCH_CUDA_ARCH_LIST`` (default sm_80, sm_90a and compute_80
PTX). Otherwise — or when the installed torch later changes — ``moss_kernels.native`` compiles
``csrc/`` with ninja at first use and caches it (``csrc/`` ships as ``moss_kernels._csrc`` for that).
``MOSS_KERNELS_NATIVE=0`` skips the extension here and at run time.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def native_extension():
    """``(ext_modules, cmdclass)`` for ``moss_kernels._C``, or nothing when it cannot be built here."""
    if os.environ.get("MOSS_KERNELS_NATIVE", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # isolated build or no torch yet: JIT at first use instead
        return [], {}
    spec = importlib.util.spec_from_file_location("moss_build_config", HERE / "csrc" / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    csrc = HERE / "csrc"
    digest = config.source_hash(csrc)
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    sources = config.cpu_sources(csrc) + (config.cuda_sources(csrc) if with_cuda else [])
    args = {"cxx": config.cxx_flags(with_cuda, digest)}
    if with_cuda:
        args["nvcc"] = config.nvcc_flags(digest)
    ext = (CUDAExtension if with_cuda else CppExtension)(
        "moss_kernels._C",
        [os.path.relpath(s, HERE) for s in sources],
        include_dirs=[str(csrc)],
        extra_compile_args=args,
        extra_link_args=config.ld_flags(),
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(
    name="moss_kernels",
    version="0.1.0",
    description="Fused CUDA and Triton kernels for MoSS (Modality-Specialized Synergizers) adapters",
    python_requires=">=3.9",
    packages=["moss_kernels", "moss_kernels.model", "moss_kernels.bench", "moss_kernels.demo",
              "moss_kernels.triton_kernels", "moss_kernels._csrc"],
    package_dir={"moss_kernels": "moss_kernels", "moss_kernels.triton_kernels": "triton_kernels",
                 "moss_kernels._csrc": "csrc"},
    package_data={"moss_kernels._csrc": ["*.cpp", "*.h", "*.py", "*.sh", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu",
                                         "cuda/*.cuh", "include/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "hf": ["transformers>=5.0", "safetensors"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "triton", "pybind11", "ninja", "transformers>=5.0", "safetensors",
                 "scikit-learn", "matplotlib", "tqdm"],
    },
)
