"""The model wrapper on the built-in decoder: injection, layout routing, gradient checkpointing,
threads, incremental decoding (prefill inside an image, rows at different positions, beam reorder)."""

import random
import threading

import pytest
import torch
from torch import nn

import moss_kernels as mk
from moss_kernels.layout import ImageLayout
from moss_kernels.model import MossStates, adapted_layers, current_layout
from moss_kernels.model.decoder import (
    DecoderConfig,
    MossDecoder,
    _since_boi,
    generate,
    generation_mask,
    interleaved_batch,
)
from moss_kernels.testing import TOLERANCE, assert_close_rel, ground_truth, randomize_adapters, rel_err

GRID = (3, 4)


def tiny_config(**kw) -> DecoderConfig:
    base = dict(text_vocab_size=48, image_vocab_size=24, grid=GRID, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2)
    base.update(kw)
    return DecoderConfig(**base)


def make_model(adapter="moss", routing="input", seed=0, dtype=torch.float32, kernel_size=2, **cfg_kw):
    torch.manual_seed(seed)
    cfg = tiny_config(**cfg_kw)
    model = MossDecoder(cfg).to(dtype)
    mk.inject_moss(model, mk.MossConfig(rank=8, alpha=16, dropout=0.0, adapter=adapter, kernel_size=kernel_size,
                                        boi_token_id=cfg.boi_token_id, grid=cfg.grid, routing=routing))
    randomize_adapters(model, seed)
    return model.eval()


def batch(cfg, B=3, S=40, seed=1):
    return interleaved_batch(cfg, B, S, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- config
def test_config_validation():
    with pytest.raises(ValueError, match="rank"):
        mk.MossConfig(rank=0)
    with pytest.raises(ValueError, match="adapter"):
        mk.MossConfig(adapter="dora")
    with pytest.raises(ValueError, match="boi_token_id and grid"):
        mk.MossConfig(boi_token_id=5)
    with pytest.raises(ValueError, match="grid"):
        mk.MossConfig(boi_token_id=5, grid=(0, 3))
    with pytest.raises(ValueError, match="routing"):
        mk.MossConfig(routing="both")
    with pytest.raises(ValueError, match="target_modules"):
        mk.MossConfig(target_modules=[])
    cfg = mk.MossConfig(boi_token_id=7, grid=[2, 3], target_modules=("q_proj",))
    assert mk.MossConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------- injection
def test_inject_all_linear_freezes_base_and_keeps_output():
    torch.manual_seed(0)
    model = MossDecoder(tiny_config())
    ids = batch(model.config)
    before = model(ids).logits
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, boi_token_id=model.config.boi_token_id, grid=GRID))
    layers = adapted_layers(model)
    assert len(layers) == 7 * model.config.num_layers  # q k v o gate up down, not lm_head
    assert "lm_head" not in layers and type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("text_A", "text_B", "image_A", "image_B") for n in trainable)
    model.eval()
    assert torch.equal(model(ids).logits, before)  # B starts at zero: the model is unchanged
    s = mk.moss_summary(model)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s.trainable == expected and s.adapted_layers == 14 and s.total > s.trainable
    assert "trainable params" in str(s)
    with pytest.raises(ValueError, match="already has MoSS adapters"):
        mk.inject_moss(model, mk.MossConfig())


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r"layers\.1\.mlp\..*", {"gate_proj", "up_proj", "down_proj"}),
    ("o_proj", {"o_proj"}),
])
def test_inject_targets(targets, expected):
    model = MossDecoder(tiny_config())
    mk.inject_moss(model, mk.MossConfig(rank=4, target_modules=targets))
    assert {n.rsplit(".", 1)[1] for n in adapted_layers(model)} == expected


def test_inject_errors():
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        mk.inject_moss(MossDecoder(tiny_config()), mk.MossConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="config"):
        mk.inject_moss(MossDecoder(tiny_config()), {"rank": 4})


def test_all_linear_skips_vision_tower():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = nn.ModuleList([nn.Linear(4, 4)])
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])
            self.lm_head = nn.Linear(4, 9)

        def forward(self, x):
            return self.lm_head(self.layers[0](self.vision_tower[0](x)))

    model = mk.inject_moss(Toy(), mk.MossConfig(rank=2))
    assert set(adapted_layers(model)) == {"layers.0.0"}


@pytest.mark.parametrize("adapter", ["moss", "moe_lora", "lora"])
def test_adapter_kinds(adapter):
    model = make_model(adapter)
    layer = next(iter(adapted_layers(model).values()))
    assert layer.adapter == adapter
    assert (layer.image_A is None) == (adapter == "lora")
    if adapter == "moe_lora":
        assert layer.image_A.shape[-1] == 1


# ---------------------------------------------------------------------------------------------- routing
def _capture(model):
    """Record (layer name, input, output delta over the base, layout) of every adapted layer call."""
    seen = []
    handles = []
    for name, layer in adapted_layers(model).items():
        def hook(mod, args, out, name=name):
            seen.append((name, args[0].detach(), (out - mod.base(args[0])).detach(), current_layout(model)))
        handles.append(layer.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("routing", ["input", "output"])
def test_forward_routes_one_derived_layout_to_every_layer(routing):
    """Each adapted layer's delta equals the float64 ground truth on the layout of the token ids."""
    model = make_model(routing=routing)
    cfg = model.config
    ids = batch(cfg)
    seen, handles = _capture(model)
    model(ids)
    for h in handles:
        h.remove()
    expected = ImageLayout.from_token_ids(ids, cfg.boi_token_id, cfg.grid, routing)
    assert len(seen) == 14 and expected.num_image_tokens > 0
    assert len({id(lay) for *_, lay in seen}) == 1  # one layout object shared by all layers
    assert seen[0][3].spans == expected.spans
    layers = adapted_layers(model)
    for name, x, delta, _lay in seen:
        layer = layers[name]
        ref = ground_truth(x, expected, layer.text_A, layer.text_B, layer.image_A, layer.image_B, layer.scale)
        assert_close_rel(delta, ref, 1e-5, name)
    assert current_layout(model) is None  # nothing leaks past the forward


def test_explicit_layout_and_inputs_embeds():
    model = make_model()
    cfg = model.config
    ids = batch(cfg)
    derived = model(ids).logits
    layout = ImageLayout.from_token_ids(ids, cfg.boi_token_id, cfg.grid)
    assert torch.equal(model(ids, layout=layout).logits, derived)
    emb = model.embed_tokens(ids)
    with pytest.raises(ValueError, match="moss_layout"):
        model(inputs_embeds=emb)
    with mk.moss_layout(model, layout):
        via_embeds = model(inputs_embeds=emb).logits
    assert torch.equal(via_embeds, derived)
    text_only = model(ids, layout=ImageLayout.text_only(*ids.shape)).logits
    assert rel_err(text_only, derived) > 1e-3  # the layout matters
    with pytest.raises(ValueError, match="layout is for"):
        model(ids[:, :10], layout=layout)


def test_layout_not_leaked_after_error_or_between_calls():
    model = make_model()
    cfg = model.config
    ids = batch(cfg)
    with pytest.raises(ValueError):
        model(ids, attention_mask=torch.ones(1, 1))
    assert current_layout(model) is None
    layer = next(iter(adapted_layers(model).values()))
    x = torch.randn(*ids.shape, layer.in_features)
    text = ImageLayout.text_only(*ids.shape)
    assert torch.equal(layer(x), layer(x, text))  # outside a forward: all text


def test_threads_do_not_share_layouts():
    model = make_model()
    cfg = model.config
    inputs = [batch(cfg, seed=s) for s in (1, 2)]
    expected = [model(ids).logits for ids in inputs]
    barrier = threading.Barrier(2)
    first = adapted_layers(model)["layers.0.self_attn.q_proj"]

    def meet(*_):  # both threads are inside a forward before either goes on: the forwards interleave
        barrier.wait(timeout=30)

    handle = first.register_forward_pre_hook(meet)
    results, errors = [None, None], []

    def run(n):
        try:
            results[n] = model(inputs[n]).logits
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handle.remove()
    assert not errors, errors
    for got, exp in zip(results, expected):
        assert torch.equal(got, exp)


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches(reentrant):
    """Recomputation in backward sees the layout of its own forward, even after later forwards."""
    model = make_model()
    model.train()
    cfg = model.config
    ids_a, ids_b = batch(cfg, B=2, S=30, seed=3), batch(cfg, B=2, S=30, seed=4)

    def loss_of(ids):
        return model(ids).logits.logsumexp(-1).mean()

    (loss_of(ids_a) + 2 * loss_of(ids_b)).backward()
    ref = _adapter_grads(model)
    model.zero_grad()
    if reentrant:
        # As Hugging Face does: torch.utils.checkpoint(use_reentrant=True) around each layer's module call.
        class Checkpointed(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, *args):
                return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=True)

        model.layers = nn.ModuleList(Checkpointed(layer) for layer in model.layers)
        model.embed_tokens.weight.requires_grad_(True)  # reentrant checkpointing needs a grad-requiring input
    else:
        cfg.gradient_checkpointing = True
    la = loss_of(ids_a)
    lb = loss_of(ids_b)  # a second forward with another layout before the backward of the first
    (la + 2 * lb).backward()
    got = _adapter_grads(model)
    got.pop("embed_tokens.weight", None)
    got = {n.replace(".inner.", "."): g for n, g in got.items()}
    assert ref.keys() == got.keys() and len(ref) == 56
    for n in ref:
        assert_close_rel(got[n], ref[n], 1e-5, n)


# ---------------------------------------------------------------------------------------------- decoding
def test_tracker_matches_from_token_ids_in_chunks():
    rng = random.Random(0)
    for routing in ("input", "output"):
        cfg = mk.MossConfig(boi_token_id=1, grid=(2, 3), routing=routing)
        for trial in range(20):
            B, S = rng.randint(1, 3), rng.randint(5, 30)
            ids = torch.randint(0, 4, (B, S), generator=torch.Generator().manual_seed(trial))
            full = ImageLayout.from_token_ids(ids, 1, (2, 3), routing)
            states = MossStates(B, cfg)
            cuts = sorted(rng.sample(range(1, S), min(3, S - 1)))
            mask = []
            for a, b in zip([0, *cuts], [*cuts, S]):
                mask.append(states.layout_for(ids[:, a:b]).image_mask())
            assert torch.equal(torch.cat(mask, 1), full.image_mask())


@pytest.mark.parametrize("adapter,routing,k", [("moss", "input", 2), ("moss", "output", 2), ("moss", "input", 3),
                                               ("moe_lora", "input", 2), ("lora", "input", 2)])
def test_greedy_generation_equals_full_forward(adapter, routing, k):
    """Prefill ending inside an image, token-by-token decoding finishing it; rows at different positions."""
    model = make_model(adapter, routing, kernel_size=k)
    cfg = model.config
    prompt = torch.tensor([
        [5, 6, 7, cfg.boi_token_id, 60, 61, 62, 63, 64],     # 5 image tokens in
        [9, 1, 2, 3, 4, 5, 6, 7, cfg.boi_token_id],          # right after <boi>
        [3, 4, cfg.boi_token_id, *range(50, 62)][:9],        # 6 image tokens in (routing: 6/7)
    ])
    n = cfg.image_tokens + 4  # finishes every row's image (12 codes at most), <eoi>, then text
    gen = generate(model, prompt, n)
    seq = gen.sequences
    full = model(seq).logits[:, prompt.shape[1] - 1:-1]
    assert_close_rel(gen.logits, full, TOLERANCE[torch.float32], "decode logits vs full forward")
    # The generated tokens are the argmax of the full forward under the same mode masks.
    for t in range(n):
        since = _since_boi(cfg, seq[:, : prompt.shape[1] + t])
        allowed = generation_mask(cfg, since)
        assert torch.equal(full[:, t].masked_fill(~allowed, float("-inf")).argmax(-1), seq[:, prompt.shape[1] + t])
    # Images were finished with exactly H*W codes and closed by <eoi>.
    row0 = seq[0].tolist()
    boi_at = row0.index(cfg.boi_token_id)
    assert all(t >= cfg.image_token_start for t in row0[boi_at + 1: boi_at + 1 + cfg.image_tokens])
    assert row0[boi_at + 1 + cfg.image_tokens] == cfg.eoi_token_id


def test_left_padding_and_chunked_prefill():
    model = make_model()
    cfg = model.config
    ids = batch(cfg, B=2, S=30, seed=5)
    full = model(ids).logits
    cache = model.new_cache()
    parts = []
    with torch.no_grad():
        for a, b in ((0, 7), (7, 8), (8, 21), (21, 30)):  # chunks cut images anywhere
            parts.append(model(ids[:, a:b], cache=cache).logits)
    assert_close_rel(torch.cat(parts, 1), full, 1e-5, "chunked prefill")
    assert cache.moss_states is not None and len(cache.moss_states.states) == 14
    # Left padding: row 1 shorter by 4; its logits equal those of the unpadded row alone.
    pad = torch.cat([torch.zeros(1, 4, dtype=torch.int64), ids[1:, :26]], 1)
    mask = torch.ones(2, 30, dtype=torch.int64)
    mask[1, :4] = 0
    out = generate(model, torch.cat([ids[:1], pad]), 6, attention_mask=mask)
    alone = generate(model, ids[1:, :26], 6)
    assert torch.equal(out.sequences[1, 4:], alone.sequences[0])
    assert_close_rel(out.logits[1], alone.logits[0], 1e-5, "left-padded row")


def test_beam_reorder():
    """Reorder (and duplicate) rows mid-image: decoding continues each row's own image."""
    model = make_model()
    cfg = model.config
    ids = batch(cfg, B=2, S=24, seed=6)
    cont = torch.randint(cfg.image_token_start, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :17], cache=cache)
        cache.reorder([1, 0, 1])
        steps = [model(cont[:, t: t + 1], cache=cache).logits for t in range(5)]
    reordered = torch.cat([ids[[1, 0, 1], :17], cont], 1)
    full = model(reordered).logits[:, 17:]
    assert_close_rel(torch.cat(steps, 1), full, 1e-5, "after reorder")


def test_cache_filled_without_states_is_rejected():
    torch.manual_seed(0)
    model = MossDecoder(tiny_config())
    cache = model.new_cache()
    ids = batch(model.config)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)  # before injection: no MoSS states
    mk.inject_moss(model, mk.MossConfig(rank=4, boi_token_id=model.config.boi_token_id, grid=GRID))
    with torch.no_grad(), pytest.raises(ValueError, match="no MoSS states"):
        model(ids[:, 5:6], cache=cache)


def test_bfloat16_model_decodes_like_full_forward():
    model = make_model(dtype=torch.bfloat16)
    cfg = model.config
    prompt = batch(cfg, B=2, S=10, seed=8)
    gen = generate(model, prompt, cfg.image_tokens + 2)
    full = model(gen.sequences).logits[:, 9:-1]
    assert_close_rel(gen.logits, full, TOLERANCE[torch.bfloat16], "bf16 decode")


def test_training_step_reduces_loss():
    model = make_model()
    model.train()
    cfg = model.config
    ids = batch(cfg, B=4, S=32, seed=9)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        logits = model(ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_and_generation():
    model = make_model().cuda()
    cfg = model.config
    prompt = batch(cfg, B=2, S=10, seed=8).cuda()
    gen = generate(model, prompt, cfg.image_tokens + 2)
    full = model(gen.sequences).logits[:, 9:-1]
    assert_close_rel(gen.logits, full, 1e-3, "cuda decode (tf32 may be on)")
    model.train()
    model(gen.sequences).logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters() if p.requires_grad)
