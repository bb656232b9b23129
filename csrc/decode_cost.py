"""Cost model of the weight-stationary CUDA decode step (csrc/cuda/decode.cu), standard library only.

It mirrors the kernel's split (``down_split`` and ``Chunking`` in decode.cu; tests/test_cuda_decode_static.py
checks it against the compiled split through ``decode_workspace_floats`` on the SIMT harness) and counts,
per launch, the blocks and the weight bytes each block reads, then a roofline time:

* down (``decode_down_kernel``): block = 16 rank rows x one d_in slice of one modality, reading
  ``rows x per x C`` elements (``per`` chunks of ``C`` elements: ``G = C / kk`` inputs, all taps);
* reduce (``decode_reduce_kernel``): no weights; the slices' partial sums and the ring;
* up (``decode_up_kernel``): block = 16 rows of ``B`` (``d_out x r``) of one modality.

``dram_bytes`` is what must come from HBM at least once: the weights, x, out (read and written), the
ring slots a row touches; ``l2_bytes`` is what the split adds on top, served by L2 at these sizes
(x re-read by every rank tile, the fp32 partial sums written and read, z re-read by every up block,
the weights re-read for every group of ``group_rows`` batch rows past the first).
``issue_s`` counts FFMA and SHFL warp instructions of the unrolled loops (4 FFMA and 1 SHFL warp
instructions per clock and SM, the sm_90 throughputs), so it is a lower bound on compute time.
``time_s = max(dram_bytes / bandwidth, issue_s)``: launch gaps (three launches) are not modelled.

Usage: python3 csrc/decode_cost.py   (prints the Anole-7B table: d_in 4096, d_out 4096/11008, r 256,
k 2, bf16, batch 1/8/64, 132 SMs, 3.35 TB/s, 1.755 GHz: an H100 SXM)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

WARPS = 8
ROWS_PER_WARP = 2
ROWS_PER_BLOCK = WARPS * ROWS_PER_WARP


def chunking(elem_bytes: int, kk: int, vec: bool = True) -> tuple[int, int, int]:
    """(C, G, NJ) of decode.cu's Chunking: C elements per chunk (lcm(16 B / elem_bytes, kk) when
    16-byte loads are used, else kk), G = C / kk inputs per chunk, NJ chunks per lane and pass."""
    v = 16 // elem_bytes
    c = v // math.gcd(v, kk) * kk if vec else kk
    nj = 1 if c >= 32 else min(8, 32 // c)
    return c, c // kk, nj


@dataclass(frozen=True)
class Split:
    """One modality's down-projection split: `rows` weight rows in tiles of ROWS_PER_BLOCK, `chunks`
    chunks of `chunk` elements per row cut into `slices` slices of `per` chunks."""

    rows: int
    chunks: int
    chunk: int
    slices: int
    per: int

    @property
    def tiles(self) -> int:
        return -(-self.rows // ROWS_PER_BLOCK) if self.rows else 0

    @property
    def blocks(self) -> int:
        return self.tiles * self.slices if self.rows else 0


def down_split(rows: int, d_in: int, kk: int, elem_bytes: int, sms: int, vec: bool = True) -> Split:
    """decode.cu's down_split: as many d_in slices as it takes to give at least `sms` blocks, never
    slices of fewer than 32 chunks (or one slice)."""
    c, g, _ = chunking(elem_bytes, kk, vec)
    chunks = d_in // g
    if rows <= 0:
        return Split(0, 0, c, 1, 0)
    tiles = -(-rows // ROWS_PER_BLOCK)
    most = -(-chunks // 32) if chunks > 32 else 1
    slices = min(max(-(-sms // tiles), 1), most)
    per = max(-(-chunks // slices), 1)
    return Split(rows, chunks, c, max(-(-chunks // per), 1), per)


def group_rows(kk: int) -> int:
    """Batch rows a block runs over one load of its weights (decode.cu GROUP): more rows re-read the
    weights once per group (from L2 at these sizes)."""
    return min(1024 // (ROWS_PER_WARP * kk), 64)


def workspace_floats(batch: int, d_in: int, r: int, r_text: int, k: int, elem_bytes: int, sms: int) -> int:
    """decode_workspace_floats for 16-byte aligned weights: the partial sums of every slice, z, a flag per row."""
    text = down_split(r_text, d_in, 1, elem_bytes, sms)
    image = down_split(r, d_in, k * k, elem_bytes, sms)
    rz = -(-max(r, r_text) // 4) * 4
    return text.slices * batch * r_text + image.slices * batch * k * k * r + batch * rz + batch


@dataclass(frozen=True)
class Launch:
    """The weight reads of one launch for one modality."""

    name: str
    blocks: int
    block_bytes: int  # the most weight bytes one block reads
    total_bytes: int  # the weight's bytes

    @property
    def balance(self) -> float:
        """The busiest block's bytes over an even share (total / blocks): 1.0 is a perfect spread."""
        return self.block_bytes * self.blocks / self.total_bytes


def _columns(chunks: int, nj: int) -> tuple[int, int]:
    """(chunk columns a lane runs over all passes, passes) for a slice of `chunks` chunks: a pass
    holds up to NJ columns of 32 chunks."""
    passes = max(-(-chunks // (32 * nj)), 1)
    return max(-(-chunks // 32), 1), passes


def _sums_shuffles(n: int) -> int:
    np2 = 1 << max(n - 1, 0).bit_length()
    return np2 - 1 + int(math.log2(32 // np2))


def decode_cost(batch: int, d_in: int, d_out: int, r: int, k: int = 2, elem_bytes: int = 2, sms: int = 132,
                image_rows: bool = True, bandwidth: float = 3.35e12, clock: float = 1.755e9) -> dict:
    """Cost of one layer-step with `batch` rows all image (`image_rows`) or all text, both adapters
    of rank `r` present (the other modality's blocks exit at once), 16-byte aligned weights."""
    kk = k * k if image_rows else 1
    split = down_split(r, d_in, kk, elem_bytes, sms)
    c, _, nj = chunking(elem_bytes, kk)
    down = Launch("down", split.blocks, min(ROWS_PER_BLOCK, r) * split.per * c * elem_bytes,
                  r * d_in * kk * elem_bytes)
    up_blocks = -(-d_out // ROWS_PER_BLOCK)
    up = Launch("up", up_blocks, min(ROWS_PER_BLOCK, d_out) * r * elem_bytes, d_out * r * elem_bytes)
    weights = down.total_bytes + up.total_bytes
    ring = batch * r * 4 * (1 + 2 * (kk - 1)) if image_rows else 0
    dram = weights + batch * d_in * elem_bytes + 2 * batch * d_out * elem_bytes + ring
    rereads = (-(-batch // group_rows(kk)) - 1) * down.total_bytes + (-(-batch // group_rows(1)) - 1) * up.total_bytes
    l2 = (split.tiles * batch * d_in * elem_bytes + 2 * split.slices * batch * kk * r * 4
          + up_blocks * batch * r * 4 + rereads)
    # Issue counts per warp and batch row: every pass runs R * C FFMA per chunk column it holds (the
    # columns past the slice are skipped, uniformly) and one transposing sum (decode.cu transpose_sum).
    cu, _, nju = chunking(elem_bytes, 1)
    down_warps = split.tiles * split.slices * WARPS
    up_warps = up_blocks * WARPS
    down_cols, down_passes = _columns(split.per, nj)
    up_cols, up_passes = _columns(r // cu, nju)
    ffma = batch * ROWS_PER_WARP * (down_warps * down_cols * c + up_warps * up_cols * cu)
    shfl = batch * (down_warps * down_passes * _sums_shuffles(ROWS_PER_WARP * kk)
                    + up_warps * up_passes * _sums_shuffles(ROWS_PER_WARP))
    issue = max(ffma / 4, shfl, (ffma + shfl) / 4) / (sms * clock)
    return {"down": down, "up": up, "weight_bytes": weights, "dram_bytes": dram, "l2_bytes": l2,
            "floor_s": weights / bandwidth, "dram_s": dram / bandwidth, "issue_s": issue,
            "time_s": max(dram / bandwidth, issue)}


def main() -> int:
    print(f"{'rows':<6}{'d_in':>6}{'d_out':>7}{'batch':>6} {'down blk':>9} {'bal':>6} {'up blk':>7} {'bal':>6} "
          f"{'weights MB':>11} {'floor us':>9} {'dram us':>8} {'issue us':>9} {'model us':>9} {'L2 extra MB':>12}")
    for image in (True, False):
        for d_in, d_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
            for batch in (1, 8, 64):
                m = decode_cost(batch, d_in, d_out, 256, 2, 2, 132, image_rows=image)
                print(f"{'image' if image else 'text':<6}{d_in:>6}{d_out:>7}{batch:>6} {m['down'].blocks:>9} "
                      f"{m['down'].balance:>6.3f} {m['up'].blocks:>7} {m['up'].balance:>6.3f} "
                      f"{m['weight_bytes'] / 1e6:>11.2f} {m['floor_s'] * 1e6:>9.2f} {m['dram_s'] * 1e6:>8.2f} "
                      f"{m['issue_s'] * 1e6:>9.2f} {m['time_s'] * 1e6:>9.2f} {m['l2_bytes'] / 1e6:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
