"""``MMFS``: MM-Interleaved's multi-image multi-scale feature synchronizer as an ``nn.Module`` (MMFS.md §a.3, §c.3).

The parameters carry the official names and shapes (``dynamic_offset_mask``, ``query_relpos``,
``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``, ``ignore_token``), so an
MM-Interleaved state dict loads unchanged. The computation is the official one, reorganised:

* the per-image query ``W_q f + b_q + E[rho]`` is never formed: ``W_q``, ``W_p`` and ``W_A`` are
  linear with nothing between them, so offsets and logits are ``[W_p(W_q f + b_q) + b_p] + T_p[rho]``
  and ``[W_A(W_q f + b_q) + b_A] + T_A[rho]`` with the ``M̄``-row tables ``T = E W^T`` (exact up to
  rounding). The ``C x C`` projection runs once per token instead of once per (token, image);
* the ``(P + 1)``-th "ignore" slot, the ``-10000`` mask and the ``-log(M L)`` overwrite of the official
  code are exactly a softmax with a constant 1 in the denominator: ``mmfs_attn(..., sink=1.0)``, which
  skips invisible images instead of masking them.

``mmfs_official`` follows the official ``MMFS.forward`` step by step (repeated queries, ``(P+1)``
slots, ``-10000`` mask, ``-log(M L)`` overwrite, the ignore token, locations cast to the value dtype)
on a pure-PyTorch ``grid_sample`` core: the independent check that the module is the same function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deform_attn import mmfs_attn
from .layout import ImageLayout

__all__ = ["MMFS", "MMFSBlock", "MMFSOptions", "causal_image_ranges", "image_relpos", "mmfs_official",
           "ms_deform_attn_core_pytorch", "projection_flops"]


def image_relpos(visible: Tensor, num_images: int) -> Tensor:
    """``rho (N, Lq, M)`` int64: 1 for the most recent visible image, 2 for the one before, ..., 0 where
    invisible (the official ``(sum(mask) + 1 - cumsum(mask)) * mask``).

    ``visible``: int64 ranges ``(N, Lq, 2)`` ``[lo, hi)`` (then ``rho = hi - m`` inside the range) or a
    bool mask ``(N, Lq, M)``.
    """
    if visible.dtype == torch.bool:
        mask = visible.long()
        return (mask.sum(-1, keepdim=True) + 1 - mask.cumsum(-1)) * mask
    m = torch.arange(num_images, device=visible.device)
    lo, hi = visible[..., :1], visible[..., 1:]
    return torch.where((m >= lo) & (m < hi), hi - m, torch.zeros_like(m))


class MMFS(nn.Module):
    """Multi-image multi-scale deformable attention with MM-Interleaved's parameters.

    Args (the official constructor's): ``d_model`` attention width, ``d_query`` query width
    (``-1``: ``d_model``), ``d_value`` feature width, ``d_out`` output width (``-1``: ``d_model``),
    ``n_levels``, ``n_heads``, ``n_points``, ``ratio`` (value width ``int(d_model * ratio)``),
    ``offset_init_magnitude``, ``spatial_shapes`` (the side of each level's square map, for the offset
    scale ``s_l / base_spatial_shape``), ``base_spatial_shape``, ``max_num_image_per_seq`` (rows of
    ``query_relpos``); ``backend`` for ``mmfs_attn`` (``None``: the default).
    """

    def __init__(self, d_model: int = 256, d_query: int = -1, d_value: int = 256, d_out: int = -1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 8, ratio: float = 1.0,
                 offset_init_magnitude: float = 3, spatial_shapes: Sequence[int] = (16,),
                 base_spatial_shape: int = 16, max_num_image_per_seq: int = 50, *,
                 backend: Optional[str] = None):
        super().__init__()
        d_query = d_model if d_query < 0 else d_query
        d_out = d_model if d_out < 0 else d_out
        d_v = int(d_model * ratio)
        if d_v % n_heads:
            raise ValueError(f"int(d_model * ratio) = {d_v} must be divisible by n_heads = {n_heads}")
        if len(spatial_shapes) != n_levels:
            raise ValueError(f"spatial_shapes {list(spatial_shapes)} must have n_levels = {n_levels} entries")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.ratio, self.offset_init_magnitude = ratio, offset_init_magnitude
        self.max_num_image_per_seq = max_num_image_per_seq
        self.backend = backend
        self.register_buffer("scale_ratios", torch.tensor([s / base_spatial_shape for s in spatial_shapes]),
                             persistent=False)
        self.sampling_offsets = nn.Linear(d_query, n_heads * n_points * 2)
        # A frozen zero parameter (the value of the "ignore" slot): kept for state-dict compatibility;
        # it must stay zero, which is what makes the ignore slot a sink (checked on load).
        self.ignore_token = nn.Parameter(torch.zeros(1, 1, 1, d_v), requires_grad=False)
        self.dynamic_offset_mask = nn.Linear(d_query, d_query)
        self.attention_weights = nn.Linear(d_query, n_heads * n_levels * (n_points + 1))
        self.value_proj = nn.Linear(d_value, d_v)
        self.output_proj = nn.Linear(d_v, d_out)
        self.query_relpos = nn.Embedding(max_num_image_per_seq, d_query)
        self._reset_parameters()
        self.register_load_state_dict_post_hook(_check_ignore_token)

    def _reset_parameters(self) -> None:
        """The official initialisation (offsets: zero weight, bias U(-magnitude, magnitude))."""
        with torch.no_grad():
            nn.init.constant_(self.sampling_offsets.weight, 0.0)
            grid = torch.empty(self.n_heads, 1, self.n_points, 2).uniform_(-self.offset_init_magnitude,
                                                                           self.offset_init_magnitude)
            self.sampling_offsets.bias.copy_(grid.view(-1))
            nn.init.constant_(self.attention_weights.bias, 0.0)
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.constant_(self.value_proj.bias, 0.0)
            nn.init.xavier_uniform_(self.output_proj.weight)
            nn.init.constant_(self.output_proj.bias, 0.0)
            nn.init.constant_(self.dynamic_offset_mask.bias, 0.0)
            nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)

    def offset_scale(self, spatial_shapes: Tensor) -> Tensor:
        """``kappa (L, 2)``: ``(s_l / s_base) / (W_l, H_l)`` per level (the official scale, then normalizer)."""
        shapes = spatial_shapes.to(self.scale_ratios.device, torch.float64)
        ratio = self.scale_ratios.double()[:, None]
        return (ratio / shapes.flip(-1)).float()

    def forward(self, query: Tensor, features: Tensor, spatial_shapes: Union[Tensor, Sequence[Sequence[int]]],
                visible: Tensor, reference_points: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """Read the visible images' pyramids.

        Args:
            query: ``(N, Lq, d_query)`` (already normed, as the official callers do).
            features: ``(N, M, S, d_value)`` the ``M`` images' multi-scale features, levels concatenated
                row-major (``S = sum_l H_l W_l``); zero-padded image slots are fine if invisible.
            spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)`` of one image (or a sequence of pairs).
            visible: int64 ranges ``(N, Lq, 2)`` ``[lo, hi)`` of the images each query sees, or a bool
                mask ``(N, Lq, M)`` / ``(N, M)`` (the official ``attention_mask``).
            reference_points: ``(N, Lq, 2)`` ``(x, y)`` per query; ``None``: the image centre
                ``(0.5, 0.5)`` (the LLM's choice).
            padding_mask: ``(N, M, S)`` bool, True where a feature is padding (its value is zeroed).

        Returns ``(N, Lq, d_out)`` in ``query``'s dtype.
        """
        if query.dim() != 3 or query.shape[-1] != self.dynamic_offset_mask.in_features:
            raise ValueError(f"query must have shape (N, Lq, {self.dynamic_offset_mask.in_features}), "
                             f"got {tuple(query.shape)}")
        if features.dim() != 4 or features.shape[0] != query.shape[0] \
                or features.shape[-1] != self.value_proj.in_features:
            raise ValueError(f"features must have shape ({query.shape[0]}, M, S, {self.value_proj.in_features}), "
                             f"got {tuple(features.shape)}")
        N, Lq, _ = query.shape
        M, S = features.shape[1], features.shape[2]
        if M >= self.max_num_image_per_seq:
            raise ValueError(f"features hold M = {M} images, but query_relpos has rows for at most "
                             f"{self.max_num_image_per_seq - 1} (max_num_image_per_seq)")
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64, device=query.device)
        if tuple(shapes.shape) != (self.n_levels, 2):
            raise ValueError(f"spatial_shapes must have shape ({self.n_levels}, 2), got {tuple(shapes.shape)}")
        if not isinstance(visible, Tensor):
            raise TypeError(f"visible must be a torch.Tensor, got {type(visible).__name__}")
        if visible.dtype == torch.bool and visible.dim() == 2:
            visible = visible[:, None, :].expand(N, Lq, M)
        H, P, L = self.n_heads, self.n_points, self.n_levels
        value = self.value_proj(features)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, M, S, H, -1)

        # Once per token: the shared part of every image's query (c.3).
        q = self.dynamic_offset_mask(query)
        base_off = self.sampling_offsets(q).view(N, Lq, H, 1, P, 2)
        base_z = self.attention_weights(q).view(N, Lq, H, 1, L, P + 1)[..., :P]
        # Once per relative image index: E W^T (the tables have M̄ rows, a few dozen).
        rows = self.query_relpos.weight
        t_off = F.linear(rows, self.sampling_offsets.weight).view(-1, H, P, 2)
        t_z = F.linear(rows, self.attention_weights.weight).view(-1, H, L, P + 1)[..., :P]
        rho = image_relpos(visible, M)  # (N, Lq, M)
        offsets = base_off + t_off[rho].permute(0, 1, 3, 2, 4, 5)  # (N, Lq, H, M, P, 2)
        logits = base_z + t_z[rho].permute(0, 1, 3, 2, 4, 5)  # (N, Lq, H, M, L, P)
        if reference_points is None:
            reference_points = query.new_full((1, Lq, 2), 0.5, dtype=torch.float32)
        out = mmfs_attn(value, shapes, reference_points, offsets, logits, visible, self.offset_scale(shapes), 1.0,
                        backend=self.backend)
        return self.output_proj(out)


def _check_ignore_token(module: MMFS, incompatible) -> None:
    if bool(module.ignore_token.detach().ne(0).any()):
        raise ValueError("ignore_token must be zero (the official module keeps it a frozen zero; a nonzero "
                         "value would turn the softmax sink into a learned vector, which MMFS does not compute)")


def projection_flops(module: MMFS, N: int, Lq: int, M: int) -> dict:
    """Multiply-add FLOPs of the query projections: as the official code runs them (once per
    (token, image)) and factorized (once per token, plus the ``M̄``-row tables)."""
    cq = module.dynamic_offset_mask.in_features
    n_out = module.sampling_offsets.out_features + module.attention_weights.out_features
    per_query = 2 * (cq * cq + cq * n_out)
    tables = 2 * module.query_relpos.num_embeddings * cq * n_out
    return {"official": N * Lq * M * per_query, "factorized": N * Lq * per_query + tables}


# ============================================================================ inside a decoder
@dataclasses.dataclass
class MMFSOptions:
    """MMFS in a decoder (``DecoderConfig(mmfs=MMFSOptions(...))`` or a dict of these fields).

    ``every``: MMFS in the layers ``idx % every == 0`` (MM-Interleaved: 4), between attention and MLP;
    ``feature_dim``: width of the image features passed in; ``spatial_shapes``: ``(H_l, W_l)`` of each
    pyramid level (the first sets the offset scale's base side); ``heads``/``points`` per MMFS;
    ``max_images``: most images per sequence; ``bos_token_id``: the token that starts a packed
    document (images of earlier documents are invisible), ``None`` for unpacked sequences.
    """

    every: int = 4
    feature_dim: int = 64
    spatial_shapes: tuple = ((4, 4), (2, 2))
    heads: int = 4
    points: int = 4
    max_images: int = 8
    bos_token_id: Optional[int] = None

    def __post_init__(self):
        self.spatial_shapes = tuple(tuple(int(v) for v in hw) for hw in self.spatial_shapes)
        if not self.spatial_shapes or any(len(hw) != 2 or min(hw) < 1 for hw in self.spatial_shapes):
            raise ValueError(f"mmfs spatial_shapes must be (H_l, W_l) pairs >= 1, got {self.spatial_shapes}")
        for name in ("every", "feature_dim", "heads", "points", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"mmfs {name} must be >= 1, got {getattr(self, name)}")


class MMFSBlock(nn.Module):
    """MM-Interleaved's LLM insertion: ``h + tanh(alpha) * MMFS(RMSNorm(h), RMSNorm(F))`` with the gate
    ``alpha`` zero-initialised (a fresh block leaves the decoder's output bitwise unchanged)."""

    def __init__(self, hidden_size: int, options: MMFSOptions, eps: float = 1e-5):
        super().__init__()
        sides = [h for h, _ in options.spatial_shapes]
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.feature_norm = nn.RMSNorm(options.feature_dim, eps=eps)
        self.mmfs = MMFS(d_model=hidden_size, d_value=options.feature_dim, n_levels=len(sides), n_heads=options.heads,
                         n_points=options.points, spatial_shapes=sides, base_spatial_shape=sides[0],
                         max_num_image_per_seq=options.max_images + 1)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, features: Tensor, spatial_shapes: Tensor, visible: Tensor) -> Tensor:
        """``x (B, S, hidden)``, ``features (B, M, S_img, feature_dim)``, ``visible (B, S, 2)`` ranges."""
        read = self.mmfs(self.norm(x), self.feature_norm(features), spatial_shapes, visible)
        return x + torch.tanh(self.alpha).to(x.dtype) * read.to(x.dtype)


def causal_image_ranges(layout: ImageLayout, input_ids: Optional[Tensor] = None,
                        bos_token_id: Optional[int] = None) -> tuple[Tensor, int]:
    """The image-causal visibility of MMFS.md §a.4 from an ``ImageLayout``: ``(ranges (B, S, 2) int64, M)``.

    Image ``m`` of row ``b`` is the ``m``-th image that *starts* in the layout (a span chain at
    offset 0), at its first image token ``t_m``. Token ``q`` sees ``m`` iff ``bos(q) < t_m <= q``, with
    ``bos(q)`` the last ``bos_token_id`` at or before ``q`` in ``input_ids`` (none: ``-1``): a contiguous
    range ``[lo, hi)`` of image indices. ``M`` is the largest image count of a row. The span starts are
    taken as the first image tokens, as in a ``routing="input"`` layout (``ImageLayout.from_token_ids``'
    default); a ``routing="output"`` layout starts each image one token early, at its ``<boi>``.
    """
    B, S = layout.batch_size, layout.seq_len
    firsts: list = [[] for _ in range(B)]
    for seg in layout.segments:
        if seg.offset == 0:
            firsts[seg.batch].append(layout.spans[seg.span_ids[0]].start)
    M = max((len(f) for f in firsts), default=0)
    device = input_ids.device if input_ids is not None else torch.device("cpu")
    t = torch.full((B, max(M, 1)), S, dtype=torch.int64)  # padding slots start after the sequence
    for b, f in enumerate(firsts):
        t[b, :len(f)] = torch.tensor(sorted(f), dtype=torch.int64)
    t = t.to(device)
    pos = torch.arange(S, device=device)
    hi = (t[:, None, :] <= pos[None, :, None]).sum(-1)
    if bos_token_id is not None and input_ids is not None:
        bos = torch.where(input_ids == bos_token_id, pos, torch.full_like(pos, -1)).cummax(-1).values
        lo = (t[:, None, :] <= bos[:, :, None]).sum(-1)
    else:
        lo = torch.zeros_like(hi)
    return torch.stack([lo, hi], -1), M


# ============================================================================ the literal reference
def ms_deform_attn_core_pytorch(value: Tensor, spatial_shapes, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """The official pure-PyTorch core (Deformable-DETR's, as MM-Interleaved ships it): every level
    through ``F.grid_sample``, then all levels stacked and weighted. ``value (N, S, H, D)``,
    ``spatial_shapes`` rows (H_l, W_l) (a tensor or a list), locations ``(N, Lq, H, L, P, 2)``, weights
    ``(N, Lq, H, L, P)`` -> ``(N, Lq, H*D)``. The literal reference below and the benchmark's baseline."""
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else list(spatial_shapes)
    N, _, H, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    values = value.split([int(h) * int(w) for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(N * H, D, int(h), int(w))
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    a = attention_weights.transpose(1, 2).reshape(N * H, 1, Lq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(N, H * D, Lq)
    return out.transpose(1, 2).contiguous()


def mmfs_official(module: MMFS, query: Tensor, features: Tensor, spatial_shapes: Tensor, attention_mask: Tensor,
                  reference_points: Optional[Tensor] = None) -> Tensor:
    """The official ``MMFS.forward`` step by step, on ``module``'s parameters (for tests: slow, memory-hungry).

    ``attention_mask``: bool ``(N, Lq, M)`` or ``(N, M)``, True for visible images; ``reference_points``
    ``(N, Lq, 2)`` or ``None`` (0.5, 0.5). Other arguments as ``MMFS.forward``.
    """
    N, Lq, _ = query.shape
    n_images = features.shape[1]
    H, P, L = module.n_heads, module.n_points, module.n_levels
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64)
    shapes_all = spatial_shapes.repeat(n_images, 1)  # the official tiled (n_images * n_levels, 2)
    nlevels = n_images * L
    if reference_points is None:
        reference_points = torch.full((N, Lq, 2), 0.5)
    reference_points = reference_points[:, :, None, :].expand(N, Lq, nlevels, 2)

    mask_long = attention_mask.long()
    relpos = (mask_long.sum(-1, keepdim=True) + 1 - mask_long.cumsum(-1)) * mask_long
    relpos = relpos[:, None, :].expand(N, Lq, n_images) if attention_mask.dim() == 2 else relpos
    relpos = relpos.permute(0, 2, 1)  # b q n -> b n q

    value = module.value_proj(features).reshape(N, n_images * features.shape[2], H, -1)
    q = query.unsqueeze(1).repeat(1, n_images, 1, 1)  # N x n x Lq x C: the repeated query
    q = module.dynamic_offset_mask(q) + module.query_relpos(relpos)
    offsets = module.sampling_offsets(q).view(N, n_images, Lq, H, 1, P, 2)
    offsets = offsets.permute(0, 2, 3, 1, 4, 5, 6)  # b q h n 1 p t
    weights = module.attention_weights(q).view(N, n_images, Lq, H, L, P + 1)
    weights = weights.permute(0, 2, 3, 1, 4, 5).reshape(N, Lq, H, nlevels, P + 1)
    offsets = offsets * module.scale_ratios.view(1, 1, 1, 1, L, 1, 1)
    offsets = offsets.reshape(N, Lq, H, nlevels, P, 2)

    additive = (1.0 - attention_mask.to(weights.dtype)) * -10000.0
    if attention_mask.dim() == 2:
        additive = additive[:, None, None, :, None].repeat_interleave(L, dim=3)
    else:
        additive = additive[:, :, None, :, None].repeat_interleave(L, dim=3)
    weights = weights + additive
    weights[..., -1] = -math.log(nlevels)  # every ignore slot overwritten (the all-masked branch is dead)
    weights = F.softmax(weights.view(N, Lq, H, nlevels * (P + 1)), -1).view(N, Lq, H, nlevels, P + 1)
    ignore_w, weights = weights[..., -1:], weights[..., :-1]
    ignore = module.ignore_token.repeat(N, Lq, nlevels, 1).view(N, Lq, nlevels, H, -1).transpose(2, 3)
    ignore = (ignore * ignore_w).sum(-2).reshape(N, Lq, -1)

    normalizer = torch.stack([shapes_all[:, 1], shapes_all[:, 0]], -1).to(offsets.dtype)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    locations = locations.to(value.dtype)
    out = ms_deform_attn_core_pytorch(value, shapes_all, locations, weights) + ignore
    return module.output_proj(out)
