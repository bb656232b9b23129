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
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import INTERPRETED

# Inner strides that are 1 for contiguous rows (Triton specialises a stride of 1 to a constant).
_UNIT = {"stride_xk", "stride_wk", "stride_on", "stride_br", "stride_la", "stride_rb", "stride_mn", "stride_pr",
         "stride_tak", "stride_tbr", "stride_ibr"}
_SCALARS = {"alpha", "alpha_in", "alpha_out", "scale"}
_INT64_PTRS = {"rows_ptr", "src_ptr", "add_idx_ptr", "h_idx_ptr", "tgt_ptr", "lidx_ptr", "ridx_ptr", "pos_ptr",
               "height_ptr", "width_ptr"}
_FP32_PTRS = {"h_ptr", "add_ptr", "hz_ptr", "pend_ptr"}


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_report(kernel, consts: dict, config: triton.Config, arch: int, fp32_ptrs=()) -> str:
    """Compile ``kernel`` (an autotuned kernel) with ``consts`` + ``config`` for ``sm_<arch>``; one line."""
    fn = kernel.fn
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
               if sig[n] not in ("constexpr", "fp32") and n not in ("M", "batch", "NT_TILES")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = next((line for line in dump.splitlines() if "REG:" in line), "")
    fields = dict(part.split(":") for part in usage.split() if ":" in part)
    return (f"regs {fields.get('REG', '?'):>3}  stack {fields.get('STACK', '?'):>5}  "
            f"shared {compiled.metadata.shared // 1024:>3} KB")


def _cases(rank: int):
    fwd = importlib.import_module(f"{__package__}.forward")
    bwd = importlib.import_module(f"{__package__}.backward")
    dec = importlib.import_module(f"{__package__}.decode")
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
    flags = dict(HAS_TEXT=True, HAS_IMAGE=True, KS=2, stride_wk=4)  # decode reads the taps as a strided view
    for c in dec.decode_kernel.configs:
        yield "decode_kernel (one launch)", dec.decode_kernel, dict(
            **flags, DOT_T=bf, DOT_TB=bf, DOT_I=bf, DOT_IB=bf, BLOCK_B=dec.BLOCK_B, BLOCK_RT=block_r,
            BLOCK_RI=block_r), c, ()
    for c in dec.decode_rank_kernel.configs:
        yield "decode_rank_kernel (split)", dec.decode_rank_kernel, dict(
            **flags, DOT_T=bf, DOT_I=bf, BLOCK_B=dec.BLOCK_B, BLOCK_R=dec.SPLIT_BLOCK_R), c, ()
    for c in dec.decode_expand_kernel.configs:
        yield "decode_expand_kernel (split)", dec.decode_expand_kernel, dict(
            HAS_TEXT=True, HAS_IMAGE=True, DOT_TB=bf, DOT_IB=bf, BLOCK_B=dec.BLOCK_B, BLOCK_RT=block_r,
            BLOCK_RI=block_r), c, ()


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
