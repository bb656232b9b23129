"""A small LLaMA-style decoder with discrete image tokens, and an interleaved generation loop.

Torch only (RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention, a KV cache). It
is the reference model of the tests, the benchmarks and the demo: big enough to carry MoSS adapters
in every linear layer, small enough to train on a CPU. Submodule names follow Hugging Face's LLaMA
(``layers.N.self_attn.q_proj``, ``layers.N.mlp.gate_proj``, ``lm_head``...), so ``target_modules``
written for one work for the other.

API (stable; the demo and benchmarks build on it)::

    cfg = DecoderConfig(text_vocab_size=256, image_vocab_size=64, grid=(4, 4), hidden_size=64)
    model = MossDecoder(cfg)                      # vocabulary: see DecoderConfig
    out = model(input_ids)                        # DecoderOutput(logits (B, S, V), hidden_states (B, S, D), cache)
    out = model(input_ids, layout=layout)         # an explicit ImageLayout (needs inject_moss to matter)
    out = model(inputs_embeds=emb, layout=layout)
    cache = model.new_cache()                     # DecoderCache: KV per layer (+ MoSS states once injected)
    out = model(prompt_ids, cache=cache)          # prefill; then model(next_ids, cache=cache) token by token
    gen = generate(model, prompt_ids, max_new_tokens=40, do_sample=False)
    gen.sequences                                  # (B, S + max_new_tokens) int64
    gen.logits                                     # (B, max_new_tokens, V) float32: logits each token was drawn from

Without adapters the model ignores ``layout``. After ``moss_kernels.inject_moss(model, MossConfig(
boi_token_id=cfg.boi_token_id, grid=cfg.grid))`` the layout is derived from ``input_ids`` (full
forwards and cached decoding alike) and each adapted layer's ``ConvLoRAState`` lives in
``cache.moss_states``; ``layout=`` overrides the derived layout for one call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DecoderCache",
    "DecoderConfig",
    "DecoderOutput",
    "GenerationOutput",
    "MossDecoder",
    "generate",
    "generation_mask",
    "interleaved_batch",
]


@dataclasses.dataclass
class DecoderConfig:
    """Sizes of a ``MossDecoder`` and the layout of its vocabulary.

    Vocabulary: text tokens ``[0, text_vocab_size)``, then ``<boi>`` (``boi_token_id``), ``<eoi>``
    (``eoi_token_id``), then ``image_vocab_size`` image codes ``[image_token_start, vocab_size)``.
    Every image is ``grid = (H, W)`` codes in raster order between ``<boi>`` and ``<eoi>``.
    ``eos_token_id`` (a text token, or ``None``) ends a sequence in ``generate``.
    """

    text_vocab_size: int = 256
    image_vocab_size: int = 64
    grid: tuple = (4, 4)
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: as many as num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    eos_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    gradient_checkpointing: bool = False
    # MM-Interleaved's feature synchronizer every n-th layer (moss_kernels.mmfs.MMFSOptions or a dict of its
    # fields); the forward then takes image_features=. None: no MMFS.
    mmfs: Optional[object] = None

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        if isinstance(self.mmfs, dict):
            from ..mmfs import MMFSOptions

            self.mmfs = MMFSOptions(**self.mmfs)
        if len(self.grid) != 2 or min(self.grid) <= 0:
            raise ValueError(f"grid must be a positive (height, width) pair, got {self.grid!r}")
        for name in ("text_vocab_size", "image_vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        kv = self.num_kv_heads or self.num_heads
        if self.hidden_size % self.num_heads or self.num_heads % kv or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads {kv} "
                             "must give an even head size and num_heads divisible by num_kv_heads")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.text_vocab_size:
            raise ValueError(f"eos_token_id must be a text token in [0, {self.text_vocab_size}), "
                             f"got {self.eos_token_id}")

    @property
    def boi_token_id(self) -> int:
        return self.text_vocab_size

    @property
    def eoi_token_id(self) -> int:
        return self.text_vocab_size + 1

    @property
    def image_token_start(self) -> int:
        return self.text_vocab_size + 2

    @property
    def vocab_size(self) -> int:
        return self.image_token_start + self.image_vocab_size

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # (B, S, vocab_size), float32
    hidden_states: torch.Tensor  # (B, S, hidden_size), after the final norm
    cache: Optional[DecoderCache]


class DecoderCache:
    """Keys and values of every layer for ``batch`` sequences, plus (once MoSS is injected) the adapted
    layers' ``ConvLoRAState``s in ``moss_states`` (a ``moss_kernels.model.cache.MossStates``)."""

    def __init__(self, num_layers: int):
        self.keys: list = [None] * num_layers  # (B, kv_heads, T, head_dim)
        self.values: list = [None] * num_layers
        self.moss_states = None

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def get_seq_length(self) -> int:
        return len(self)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, indices) -> None:
        """Reorder (and duplicate) sequences, as beam search does: KV and MoSS states alike."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        for n, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[n] = k.index_select(0, idx.to(k.device))
                self.values[n] = v.index_select(0, idx.to(v.device))
        if self.moss_states is not None:
            self.moss_states.reorder(idx)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[DecoderCache]):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        if cfg.mmfs is not None and layer % cfg.mmfs.every == 0:  # between attention and MLP, gated
            from ..mmfs import MMFSBlock

            self.mmfs = MMFSBlock(cfg.hidden_size, cfg.mmfs, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, mmfs_inputs=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if mmfs_inputs is not None and hasattr(self, "mmfs"):
            x = self.mmfs(x, *mmfs_inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class MossDecoder(nn.Module):
    """The decoder (see the module docstring for the API)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, n) for n in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02 * math.sqrt(64 / module.in_features))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.config.num_layers)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        layout=None,
        cache: Optional[DecoderCache] = None,
        image_features: Optional[torch.Tensor] = None,
        image_visible: Optional[torch.Tensor] = None,
    ) -> DecoderOutput:
        """Run the decoder.

        Args:
            input_ids: ``(B, S)`` int64 token ids (or give ``inputs_embeds``, ``(B, S, hidden)``).
            attention_mask: ``(B, past + S)`` with 1 for real tokens and 0 for (left) padding; positions
                count real tokens only. ``None``: all real.
            layout: an ``ImageLayout`` for these ``S`` tokens; read by injected MoSS adapters (see
                ``moss_kernels.model.routing``) and, with ``image_features``, where the images start.
            cache: a ``DecoderCache`` to extend (prefill or decoding); ``None`` for a full forward.
            image_features: with ``config.mmfs``: ``(B, M, S_img, feature_dim)``, the multi-scale features
                of the sequence's images in order (levels ``config.mmfs.spatial_shapes``, concatenated).
            image_visible: ``(B, S, 2)`` int64 ranges ``[lo, hi)`` of the images each token sees; ``None``:
                derived from ``layout`` (or from ``input_ids``) by ``moss_kernels.mmfs.causal_image_ranges``
                (needed with a cache, where earlier tokens are not in this call).

        Returns ``DecoderOutput(logits (B, S, V) float32, hidden_states (B, S, D), cache)``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
            x = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must have shape (batch, seq, {self.config.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            x = inputs_embeds
        B, S, _ = x.shape
        past = 0 if cache is None else len(cache)
        if attention_mask is None:
            positions = torch.arange(past, past + S, device=x.device).expand(B, S)
            real = None
        else:
            if tuple(attention_mask.shape) != (B, past + S):
                raise ValueError(f"attention_mask must have shape ({B}, {past + S}), got {tuple(attention_mask.shape)}")
            real = attention_mask.to(device=x.device, dtype=torch.bool)
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        ang = positions.unsqueeze(-1).float() * self.inv_freq
        ang = torch.cat([ang, ang], dim=-1).unsqueeze(1)  # (B, 1, S, head_dim)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        # Causal over past + S keys; padding keys masked; each query always sees itself (no empty rows).
        q_pos = torch.arange(past, past + S, device=x.device).unsqueeze(1)
        k_pos = torch.arange(past + S, device=x.device).unsqueeze(0)
        mask = (k_pos <= q_pos).expand(B, 1, S, past + S)
        if real is not None:
            mask = (mask & real[:, None, None, :]) | (k_pos == q_pos)
        mmfs_inputs = self._mmfs_inputs(input_ids, layout, image_features, image_visible, cache, B, S)
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, mmfs_inputs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, mmfs_inputs)
        h = self.norm(x)
        return DecoderOutput(self.lm_head(h).float(), h, cache)

    def _mmfs_inputs(self, input_ids, layout, image_features, image_visible, cache, B, S):
        """``(features, spatial_shapes, visible ranges)`` for the MMFS blocks, or ``None`` without features."""
        # `layout` is the MoSS layout when given (the MoSS pre-hook reads it too): one ImageLayout routes both.
        opts = self.config.mmfs
        if image_features is None:
            if image_visible is not None:
                raise ValueError("image_visible was given without image_features")
            return None
        if opts is None:
            raise ValueError("image_features needs a decoder built with DecoderConfig(mmfs=...)")
        S_img = sum(h * w for h, w in opts.spatial_shapes)
        if image_features.dim() != 4 or image_features.shape[0] != B or image_features.shape[2] != S_img \
                or image_features.shape[3] != opts.feature_dim:
            raise ValueError(f"image_features must have shape ({B}, M, {S_img}, {opts.feature_dim}), "
                             f"got {tuple(image_features.shape)}")
        if image_visible is None:
            if cache is not None and len(cache) > 0:
                raise ValueError("image_visible is needed with a non-empty cache (earlier tokens are not in "
                                 "this call to derive it from)")
            if layout is None:
                if input_ids is None:
                    raise ValueError("image_visible (or layout=) is needed with inputs_embeds")
                from ..layout import ImageLayout

                layout = ImageLayout.from_token_ids(input_ids, self.config.boi_token_id, self.config.grid)
            from ..mmfs import causal_image_ranges

            image_visible, found = causal_image_ranges(layout, input_ids, opts.bos_token_id)
            if found > image_features.shape[1]:
                raise ValueError(f"the sequences hold up to {found} images, image_features only "
                                 f"{image_features.shape[1]}")
        elif image_visible.dtype not in (torch.int64, torch.int32) or tuple(image_visible.shape) != (B, S, 2):
            raise ValueError(f"image_visible must be int64 ranges of shape ({B}, {S}, 2), got "
                             f"{image_visible.dtype} {tuple(image_visible.shape)}")
        shapes = torch.tensor(opts.spatial_shapes, dtype=torch.int64)
        return image_features, shapes, image_visible.to(image_features.device)


class GenerationOutput(NamedTuple):
    sequences: torch.Tensor  # (B, S + n) int64: prompt and generated tokens
    logits: torch.Tensor  # (B, n, V) float32: the raw logits of each generated token's step


def generation_mask(config: DecoderConfig, since_boi: torch.Tensor) -> torch.Tensor:
    """Which tokens may come next, ``(B, V)`` bool, given ``since_boi (B,)`` int64: ``-1`` in text mode,
    else how many tokens after the last ``<boi>`` were already produced (``0``: just after it).

    Text mode: text tokens and ``<boi>``; inside an image: image codes only until ``H*W`` are out,
    then exactly ``<eoi>``.
    """
    V, n_img = config.vocab_size, config.image_tokens
    ids = torch.arange(V, device=since_boi.device)
    text = (ids < config.text_vocab_size) | (ids == config.boi_token_id)
    image = ids >= config.image_token_start
    eoi = ids == config.eoi_token_id
    s = since_boi.unsqueeze(1)
    return torch.where(s < 0, text, torch.where(s < n_img, image, eoi))


def _since_boi(config: DecoderConfig, ids: torch.Tensor) -> torch.Tensor:
    """``since_boi`` (see ``generation_mask``) after the tokens ``ids (B, S)``, scanned on the host."""
    out = []
    for row in ids.tolist():
        s = -1
        for t in row:
            if s >= 0:
                s += 1
                if s > config.image_tokens:  # the token after the last image code closes the image
                    s = -1
            elif t == config.boi_token_id:
                s = 0
        out.append(s)
    return torch.tensor(out, dtype=torch.int64, device=ids.device)


@torch.no_grad()
def generate(
    model: MossDecoder,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    stop_at_eos: bool = True,
) -> GenerationOutput:
    """Interleaved generation: text until ``<boi>``, then exactly ``H*W`` image codes, ``<eoi>``, text again.

    Args:
        model: a ``MossDecoder`` (MoSS-injected or not).
        input_ids: ``(B, S)`` int64 prompt; it may end inside an image (the loop finishes it).
        max_new_tokens: number of tokens to generate for every row.
        do_sample: sample (with ``temperature``, ``top_k``, ``generator``) instead of greedy argmax.
        attention_mask: ``(B, S)`` for left-padded prompts of different lengths.
        stop_at_eos: once a row emits ``config.eos_token_id`` it emits only that token.

    Returns ``GenerationOutput(sequences (B, S + n), logits (B, n, V))``: ``logits[:, t]`` are the raw
    logits (before the mode mask) of the step that produced token ``S + t``.
    """
    cfg = model.config
    was_training = model.training
    model.eval()
    try:
        B = input_ids.shape[0]
        cache = model.new_cache()
        mask = attention_mask
        since = _since_boi(cfg, input_ids)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        seq, step_ids, all_logits = input_ids, input_ids, []
        for _ in range(max_new_tokens):
            logits = model(step_ids, attention_mask=mask, cache=cache).logits[:, -1]
            all_logits.append(logits)
            allowed = generation_mask(cfg, since)
            scores = logits.masked_fill(~allowed, float("-inf"))
            if do_sample:
                scores = scores / max(temperature, 1e-6)
                if top_k is not None:
                    kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            if cfg.eos_token_id is not None and stop_at_eos:
                nxt = torch.where(done, torch.full_like(nxt, cfg.eos_token_id), nxt)
                done |= (nxt == cfg.eos_token_id) & (since < 0)
            since = torch.where(since >= 0, since + 1, torch.where(nxt == cfg.boi_token_id, 0, -1))
            since = torch.where(since > cfg.image_tokens, torch.full_like(since, -1), since)
            step_ids = nxt.unsqueeze(1)
            seq = torch.cat([seq, step_ids], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = torch.stack(all_logits, 1) if all_logits else input_ids.new_zeros(B, 0, cfg.vocab_size).float()
        return GenerationOutput(seq, logits)
    finally:
        model.train(was_training)


def interleaved_batch(
    config: DecoderConfig,
    batch_size: int,
    seq_len: int,
    generator: Optional[torch.Generator] = None,
    images_per_row: Sequence[int] = (1, 2),
) -> torch.Tensor:
    """Random interleaved token ids ``(batch_size, seq_len)``: text, then ``<boi>``, ``H*W`` codes,
    ``<eoi>``, text..., with a random number of images per row from ``images_per_row``; an image may be
    cut by the end of the sequence. For tests, benchmarks and smoke runs (random data)."""
    rows = []
    for _ in range(batch_size):
        n_img = int(images_per_row[int(torch.randint(len(images_per_row), (1,), generator=generator))])
        row: list = []
        for _ in range(n_img):
            gap = int(torch.randint(1, 6, (1,), generator=generator))
            row += torch.randint(config.text_vocab_size, (gap,), generator=generator).tolist()
            row.append(config.boi_token_id)
            row += (config.image_token_start
                    + torch.randint(config.image_vocab_size, (config.image_tokens,), generator=generator)).tolist()
            row.append(config.eoi_token_id)
        while len(row) < seq_len:
            row += torch.randint(config.text_vocab_size, (1,), generator=generator).tolist()
        rows.append(row[:seq_len])
    return torch.tensor(rows, dtype=torch.int64)
