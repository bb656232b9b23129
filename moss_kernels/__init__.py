"""moss_kernels: fused kernels for MoSS (Modality-Specialized Synergizers) adapters.

Text tokens get a linear LoRA, image tokens a causal ``k x k`` convolutional LoRA over their grid.
The public names are those of the README's "Using it" section; the submodules (``model``,
``reference``, ``backends``, ``bench``, ``demo``, ...) load on first attribute access
(``mk.model.hf.MossCache``), so importing the package imports neither ``torch._dynamo`` nor
``transformers`` nor the native extension.
"""

from .backends import available_backends
from .conv_lora import conv_lora, moss_lora, moss_lora_step
from .deform_attn import mmfs_attn, ms_deform_attn
from .layers import MossLinear
from .layout import ImageLayout, ImageSpan
from .mmfs import MMFS
from .state import ConvLoRAState
from .model import (MossConfig, disable_moss, from_peft_lora, inject_moss, load_moss, merge_text_adapter,
                    moss_layout, moss_summary, save_moss)

__all__ = [
    "MMFS",
    "ConvLoRAState",
    "ImageLayout",
    "ImageSpan",
    "MossConfig",
    "MossLinear",
    "available_backends",
    "conv_lora",
    "disable_moss",
    "from_peft_lora",
    "inject_moss",
    "load_moss",
    "merge_text_adapter",
    "mmfs_attn",
    "moss_layout",
    "moss_lora",
    "moss_lora_step",
    "moss_summary",
    "ms_deform_attn",
    "save_moss",
]
__version__ = "0.1.0"

_LAZY_SUBMODULES = ("bench", "demo", "native", "testing", "triton_kernels")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
