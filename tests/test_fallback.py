"""The package imports and works where Triton or the compiled extension is missing."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["triton"] = None                 # as if Triton were not installed
    sys.modules["moss_kernels.native"] = None    # as if the extension could not be built
    import moss_kernels.conv_lora
    import moss_kernels as mk
    import torch
    print("backends", mk.available_backends("cpu"))
    print("problems", sorted(mk.backends.backend_problems()))
    lay = mk.ImageLayout.from_spans(1, 6, [(0, 1, 2, 2)])
    x, w, b = torch.randn(1, 6, 3), torch.randn(2, 3, 2, 2), torch.randn(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = mk.conv_lora(x, lay, w, b)
    said = [str(c.message) for c in caught if "backend is unavailable" in str(c.message)]
    print("warnings", len(said), said[0] if said else "")
    print("finite", bool(torch.isfinite(out).all()))
    """
)


def test_import_and_fallback_without_triton_or_extension():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert lines["backends"] == "['reference']"
    assert lines["problems"] == "['native', 'triton']"
    count, message = lines["warnings"].split(" ", 1)
    assert count == "1" and "native backend is unavailable" in message and "falling back" in message
    assert lines["finite"] == "True"
