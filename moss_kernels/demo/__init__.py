"""The end-to-end demo (``python -m moss_kernels.demo``) and the miniature Table 2 (``--compare``).

Needs ``scikit-learn`` (the digits), ``matplotlib`` (PNGs) and ``tqdm`` (progress bars).
"""

from .compare import run_compare
from .demo import run_demo
from .train import DemoSettings

__all__ = ["DemoSettings", "run_compare", "run_demo"]
