"""Resource report without a GPU: compile every kernel's autotune configs for a CUDA target and print
the registers, stack (spills) and shared memory ``ptxas`` assigns.

    python -m moss_kernels.triton_kernels.resources [--arch 90 80] [--rank 256] [--quick]

Shapes are specialised as for aligned layers (dimensions and strides divisible by 16, unit inner
strides, bf16 inputs), the case the speed targets are about. Needs Triton's bundled ``cuobjdump``; no
driver. Run it with ``TRITON_INTERPRET`` unset (interpreter kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import JITFunction

from ._common import INTERPRETED

# Inner strides that are 1 for contiguous rows (Triton specialises a stride of 1 to a constant).
_UNIT = {"stride_xk", "stride_wk", "stride_on", "stride_br", "stride_la", "stride_rb", "stride_mn", "stride_pr",
         "stride_tak", "stride_tbr", "stride_ibr"}
_SCALARS = {"alpha", "alpha_in", "alpha_out", "scale"}
_INT64_PTRS = {"rows_ptr", "src_ptr", "add_idx_ptr", "h_idx_ptr", "tgt_ptr", "lidx_ptr", "ridx_ptr", "pos_ptr",
               "height_ptr", "width_ptr"}
_FP32_PTRS = {"h_ptr", "add_ptr", "pend_ptr", "wst_ptr", "wsi_ptr"}
# Grid and ring counts (program counts, slices, ring slots): no divisibility assumed.
_UNALIGNED = {"M", "batch", "NT_TILES", "NC_T", "NT_PROGS", "NC_I", "NI_T", "NI_I", "capacity"}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(kernel, consts: dict, config: triton.Config, arch: int, fp32_ptrs=()):
    """Compile ``kernel`` (autotuned or plain ``triton.jit``) with ``consts`` + ``config`` for ``sm_<arch>``.

    Pointers and integers are marked 16-divisible as Triton marks them at launch for aligned layers,
    except the counts in ``_UNALIGNED`` (which need not be multiples of 16)."""
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # a JITFunction, or an Autotuner over one
    consts = {**{u: 1 for u in _UNIT if u in fn.arg_names}, **consts, **config.kwargs}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            fp32 = name in _FP32_PTRS or name in fp32_ptrs
            sig[name] = "*i64" if name in _INT64_PTRS else "*fp32" if fp32 else "*bf16"
        else:
            sig[name] = "fp32" if name in _SCALARS else "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if sig[n] not in ("constexpr", "fp32") and n not in _UNALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _cubin_tool(compiled, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([_cuobjdump(), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_fields(compiled) -> dict:
    """``{"REG": ..., "STACK": ..., "SHARED": ...}`` from ``cuobjdump --dump-resource-usage``."""
    usage = next((line for line in _cubin_tool(compiled, "--dump-resource-usage").splitlines() if "REG:" in line), "")
    return dict(part.split(":") for part in usage.split() if ":" in part)


def sass(compiled) -> str:
    """The compiled kernel's SASS (``cuobjdump --dump-sass``)."""
    return _cubin_tool(compiled, "--dump-sass")


def compile_report(kernel, consts: dict, config: triton.Config, arch: int, fp32_ptrs=()) -> str:
    """Compile as ``compile_kernel``; one line: registers, stack (spills), shared memory."""
    compiled = compile_kernel(kernel, consts, config, arch, fp32_ptrs)
    fields = resource_fields(compiled)
    return (f"regs {fields.get('REG', '?'):>3}  stack {fields.get('STACK', '?'):>5}  "
            f"shared {compiled.metadata.shared // 1024:>3} KB")


def _cases(rank: int):
    fwd = importlib.import_module(f"{__package__}.forward")
    bwd = importlib.import_module(f"{__package__}.backward")
    bf = tl.bfloat16
    block_r = fwd.pow2(rank)
    fuse = block_r <= fwd.FUSE_MAX_R
    rank_consts = dict(TAPS=4, INDIRECT=True, ADD=False, STORE_H=True, STORE_IDX=False, FUSE=fuse, DOT=bf,
                       DOT_OUT=bf, BLOCK_R=block_r if fuse else fwd.SPLIT_BLOCK_R)
    configs = fwd._rank_prune(fwd.rank_kernel.configs, {}, BLOCK_R=rank_consts["BLOCK_R"])
    for c in configs:
        yield f"rank_kernel image k=2 {'fused' if fuse else 'split'}", fwd.rank_kernel, rank_consts, c, ()
    for c in fwd.expand_kernel.configs:
        yield "expand_kernel dx (4 taps)", fwd.expand_kernel, dict(TAPS=4, GATHER=True, ACCUMULATE=False, DOT=bf), c, ()
    for c in bwd.tn_kernel.configs:
        yield "tn_kernel dK", bwd.tn_kernel, dict(L_IDX=True, R_IDX=True, DOT=bf, stride_ct=1), c, ("l_ptr",)
    yield from decode_cases(rank, batch=64)


def decode_cases(rank: int = 256, batch: int = 64, k: int = 2, d_out: int = 4096, sms: int = 132):
    """The three decode launches as ``decode_step`` configures them for bf16 inputs, ``batch`` rows and a
    ``k x k`` kernel (``rank`` and ``d_in`` are runtime values: only the block sizes depend on them)."""
    dec = importlib.import_module(f"{__package__}.decode")
    bf = tl.bfloat16
    kk = k * k
    pt, pi = dec.plan(rank, 4096, 1, sms), dec.plan(rank, 4096, kk, sms)
    flags = dict(HAS_TEXT=True, HAS_IMAGE=True)
    block_b = min(dec.MAX_BLOCK_B, dec.pow2(batch))
    yield "decode_shrink_kernel", dec.decode_shrink_kernel, dict(
        **flags, KK=kk, KKP=pi.kkp, DOT_T=bf, DOT_I=bf, BLOCK_B=block_b, BLOCK_CT=pt.block_c, BLOCK_CI=pi.block_c,
        BLOCK_I=dec.BLOCK_I), triton.Config({}, num_warps=dec.SHRINK_WARPS, num_stages=dec.SHRINK_STAGES), ()
    yield "decode_ring_kernel", dec.decode_ring_kernel, dict(
        **flags, KS=k, KKP=pi.kkp, BLOCK_B=dec.RING_BLOCK_B, BLOCK_R=dec.ring_block_r(pi.kkp)), triton.Config(
        {}, num_warps=dec.RING_WARPS), ()
    yield "decode_expand_kernel", dec.decode_expand_kernel, dict(
        **flags, DOT_TB=bf, DOT_IB=bf, BLOCK_B=block_b, BLOCK_R=dec.EXPAND_BLOCK_R,
        BLOCK_N=dec.expand_block_n(d_out, sms)), triton.Config(
        {}, num_warps=dec.EXPAND_WARPS, num_stages=dec.EXPAND_STAGES), ()


_ASYNC_COPY = re.compile(r"%([A-Za-z_]\w*?)(?:_\d+)? = ttg\.async_copy_global_to_local .*?\{contiguity = (\d+) : i32\}"
                         r" : tensor<[\dx]+x!tt\.ptr<(\w+)>")
_PLAIN_LOAD = re.compile(r"%([A-Za-z_]\w*?)(?:_\d+)? = tt\.load .*?: tensor<[\dx]+x!tt\.ptr<(\w+)>")
_SASS_LOAD = re.compile(r"\b(?:LDGSTS|LDG)\.[A-Z0-9_.]+")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i64": 8, "i32": 4}


def decode_load_report(arch: int = 90, batch: int = 64, rank: int = 256, kernels=None):
    """Per decode kernel (``decode_cases``): registers, stack, every pipelined global->shared copy of
    the TTGIR (``name``: the Python variable loaded, ``bytes``: per thread per copy, from the
    contiguity Triton proved), the loads left unpipelined (``plain``: name and element type) and the
    SASS global-load opcodes with their counts."""
    for label, kernel, consts, config, fp32_ptrs in decode_cases(rank, batch=batch):
        if kernels is not None and label not in kernels:
            continue
        compiled = compile_kernel(kernel, consts, config, arch, fp32_ptrs)
        fields = resource_fields(compiled)
        copies = [dict(name=m.group(1), bytes=int(m.group(2)) * _BYTES[m.group(3)])
                  for m in _ASYNC_COPY.finditer(compiled.asm["ttgir"])]
        plain = [dict(name=m.group(1), dtype=m.group(2)) for m in _PLAIN_LOAD.finditer(compiled.asm["ttgir"])]
        loads = {}
        for op in _SASS_LOAD.findall(sass(compiled)):
            loads[op] = loads.get(op, 0) + 1
        yield dict(kernel=label, batch=batch, regs=int(fields.get("REG", -1)), stack=int(fields.get("STACK", -1)),
                   copies=copies, plain=plain, sass_loads=loads)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="CUDA compute capabilities")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="only the first config of each kernel")
    args = parser.parse_args(argv)
    if INTERPRETED:
        raise SystemExit("unset TRITON_INTERPRET: interpreter kernels cannot be compiled")
    for arch in args.arch:
        seen = set()
        for label, kernel, consts, config, fp32_ptrs in _cases(args.rank):
            if args.quick and label in seen:
                continue
            seen.add(label)
            blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
            report = compile_report(kernel, consts, config, arch, fp32_ptrs)
            print(f"sm_{arch}  r={args.rank:<4} {label:<34} {blocks:<36} w{config.num_warps} s{config.num_stages}  "
                  f"{report}")


if __name__ == "__main__":
    main()
