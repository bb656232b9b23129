"""moss_kernels: fused kernels for MoSS (Modality-Specialized Synergizers) adapters.

Text tokens get a linear LoRA, image tokens a causal ``k x k`` convolutional LoRA over their grid.
The public names are those of the contract (``shared/SPEC.md`` §3).
"""

from .backends import available_backends
from .conv_lora import conv_lora, moss_lora, moss_lora_step
from .layers import MossLinear
from .layout import ImageLayout, ImageSpan
from .state import ConvLoRAState
from .model import MossConfig, inject_moss, load_moss, moss_layout, moss_summary, save_moss

__all__ = [
    "ConvLoRAState",
    "ImageLayout",
    "ImageSpan",
    "MossConfig",
    "MossLinear",
    "available_backends",
    "conv_lora",
    "inject_moss",
    "load_moss",
    "moss_layout",
    "moss_lora",
    "moss_lora_step",
    "moss_summary",
    "save_moss",
]
__version__ = "0.1.0"
