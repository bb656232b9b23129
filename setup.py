"""Build script.

``pip install --no-build-isolation .`` (or ``-e .``): the native extension is compiled against the
torch already installed (an isolated build environment would pull its own torch and break the
ABI, hence no torch in ``[build-system]``). ``triton_kernels/`` installs as
``moss_kernels.triton_kernels``.
"""

from setuptools import setup

setup(
    name="moss_kernels",
    version="0.1.0",
    description="Fused CUDA and Triton kernels for MoSS (Modality-Specialized Synergizers) adapters",
    python_requires=">=3.9",
    packages=["moss_kernels", "moss_kernels.triton_kernels"],
    package_dir={"moss_kernels": "moss_kernels", "moss_kernels.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "triton", "pybind11", "ninja"],
    },
)
