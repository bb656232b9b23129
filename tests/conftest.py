"""Test-session setup shared by every test file."""

import os

import torch

# Triton decides at import time whether it interprets: without a GPU, every Triton kernel in the
# suite runs under the CPU interpreter, so the switch must be on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
