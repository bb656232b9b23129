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


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


USE_CONV = """
    import warnings, torch, moss_kernels as mk
    warnings.simplefilter("always")
    lay = mk.ImageLayout.from_spans(1, 4, [(0, 0, 2, 2)])
    print(mk.conv_lora(torch.randn(1, 4, 3), lay, torch.randn(2, 3, 2, 2), torch.randn(5, 2)).shape)
    print("PROBLEM", mk.backends.backend_problems().get("native"))
"""


def test_build_notice_then_a_one_line_cause_and_the_log(tmp_path):
    # A forced build with a compiler that does not exist fails in about a second, without
    # compiling: the notice comes first, then the fallback warning names the cause and the log.
    run = _python(USE_CONV, MOSS_KERNELS_FORCE_BUILD="1", MOSS_KERNELS_CACHE_DIR=str(tmp_path),
                  CXX="moss-no-such-compiler")
    assert run.returncode == 0, run.stderr
    notice = [line for line in run.stderr.splitlines() if line.startswith("moss_kernels: compiling")]
    assert len(notice) == 1, run.stderr
    assert "MOSS_KERNELS_FORCE_BUILD=1" in notice[0] and "min" in notice[0] and str(tmp_path) in notice[0]
    assert "MOSS_KERNELS_NATIVE=0 skips it" in notice[0] and "MOSS_KERNELS_VERBOSE_BUILD=1" in notice[0]
    warning = [line for line in run.stderr.splitlines() if "native backend is unavailable" in line]
    assert len(warning) == 1, run.stderr
    assert "moss-no-such-compiler: not found" in warning[0]
    log = warning[0].split("(full log: ")[1].split(")")[0]
    assert log.startswith(str(tmp_path)) and log.endswith("build-failure.log")
    with open(log) as f:
        assert "moss-no-such-compiler" in f.read()  # the whole ninja output, not the cause alone
    assert "torch.Size([1, 4, 5])" in run.stdout


def test_failure_cause_picks_the_telling_line():
    from moss_kernels.build_messages import failure_cause

    ninja = ("[1/5] c++ -MMD -MF binding.o.d -O3 -c binding.cpp -o binding.o\nFAILED: forward.o\n"
             "c++ -MMD -MF forward.o.d -O3 -c forward.cpp -o forward.o\n")
    assert failure_cause(ninja + "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.\n") \
        == "/bin/sh: 1: c++: not found"
    assert failure_cause(ninja + "forward.cpp:3:10: fatal error: rows.h: No such file or directory\n") \
        == "forward.cpp:3:10: fatal error: rows.h: No such file or directory"
    assert failure_cause(ninja + "forward.cpp:9:1: error: expected ';' before '}' token\n") \
        == "forward.cpp:9:1: error: expected ';' before '}' token"
    assert failure_cause(ninja + "ninja: build stopped: subcommand failed.\n") \
        == "compiling forward.o failed without a message from the compiler"


def test_native_disabled_by_the_user_is_not_warned_about():
    run = _python(USE_CONV, MOSS_KERNELS_NATIVE="0")
    assert run.returncode == 0, run.stderr
    assert "unavailable" not in run.stderr and "falling back" not in run.stderr, run.stderr
    assert "PROBLEM BackendDisabled: the native backend is disabled (MOSS_KERNELS_NATIVE=0)" in run.stdout


def test_import_is_light_and_submodules_load_on_access():
    run = _python("""
        import sys, moss_kernels as mk
        heavy = [m for m in ("torch._dynamo", "transformers", "moss_kernels.native", "triton") if m in sys.modules]
        print("HEAVY", heavy)
        print("DECODER", mk.model.decoder.MossDecoder.__name__)
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("HF skipped")
        else:
            print("HF", mk.model.hf.MossCache.__name__, mk.model.hf.lm_logits.__name__)
        try:
            mk.model.nothing_here
        except AttributeError as e:
            print("MISSING", e)
    """)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "HEAVY []" in out and "DECODER MossDecoder" in out
    assert "HF MossCache lm_logits" in out or "HF skipped" in out
    assert "MISSING module 'moss_kernels.model' has no attribute 'nothing_here'" in out


def test_resolve_is_marked_as_torch_marks_a_constant_result():
    # backends.resolve sets the attribute by hand to keep torch._dynamo out of the import; it must be
    # exactly what torch's decorator sets, or torch.compile(fullgraph=True) would trace into it.
    import torch._dynamo

    from moss_kernels import backends

    def probe():
        return None

    torch._dynamo.assume_constant_result(probe)
    assert vars(probe) and all(getattr(backends.resolve, k, object()) == v for k, v in vars(probe).items())


def test_compile_fullgraph_as_the_first_use_of_the_backends():
    # The first resolve happens inside tracing: without the constant-result mark, dynamo traces
    # the lazy backend loading and the fullgraph compile fails.
    run = _python("""
        import torch, moss_kernels as mk
        lay = mk.ImageLayout.from_spans(1, 8, [(0, 2, 2, 2)])
        ad = [torch.randn(4, 16), torch.randn(16, 4), torch.randn(4, 16, 2, 2), torch.randn(16, 4)]
        f = torch.compile(lambda x: mk.moss_lora(x, lay, *ad, 0.5), fullgraph=True, backend="aot_eager")
        x = torch.randn(1, 8, 16)
        print("DIFF", float((f(x) - mk.moss_lora(x, lay, *ad, 0.5)).abs().max()))
    """)
    assert run.returncode == 0, run.stderr
    assert "DIFF 0.0" in run.stdout
