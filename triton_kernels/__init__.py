"""Triton backend of moss_kernels (installed as ``moss_kernels.triton_kernels``).

Not written yet: importing it fails, so the ``triton`` backend is reported unavailable.
"""

raise ImportError("the Triton backend is not implemented yet")
