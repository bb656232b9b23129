"""MoSS in Hugging Face models built from tiny configs (no download): LlamaForCausalLM and
ChameleonForConditionalGeneration; training (with gradient checkpointing) and generate()."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers",
                                   reason="Hugging Face transformers is not installed (pip install .[hf])")

import moss_kernels as mk  # noqa: E402
from moss_kernels.layout import ImageLayout  # noqa: E402
from moss_kernels.model import adapted_layers, current_layout  # noqa: E402
from moss_kernels.model.hf import MossCache, lm_logits  # noqa: E402
from moss_kernels.model.tiny import tiny_chameleon, tiny_llama  # noqa: E402
from moss_kernels.testing import assert_close_rel, ground_truth, randomize_adapters  # noqa: E402

GRID = (2, 3)
BOI = 60


def checkpointing(model, on=True, use_reentrant=False):
    """``activation_checkpointing_*`` (newer transformers) or the older ``gradient_checkpointing_*``."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not on:
        return (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    kwargs = {"use_reentrant": use_reentrant}
    if new:
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def llama(seed=0, **moss):
    model = tiny_llama(seed)  # eos_token_id=None: generate() never stops early
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=BOI, grid=GRID, **moss))
    randomize_adapters(model, seed)
    return model.eval()


# Prompts: row 0 ends 3 tokens into an image, row 1 one token in (rows at different image positions).
PROMPT = torch.tensor([[1, 5, 7, BOI, 10, 11, 12], [1, 2, 3, 4, 9, BOI, 13]])
TRAIN = torch.tensor([[1, 5, BOI, 10, 11, 12, 13, 14, 15, 2, 7, BOI, 20, 21],
                      [1, BOI, 30, 31, 32, 33, 34, 35, 3, 4, 5, 6, BOI, 40]])


def test_llama_injection_and_routing():
    model = llama()
    names = list(adapted_layers(model))
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert type(model.lm_head) is nn.Linear
    layer = adapted_layers(model)["model.layers.1.mlp.down_proj"]
    seen = []
    h = layer.register_forward_hook(lambda mod, a, out: seen.append((a[0], out - mod.base(a[0]),
                                                                      current_layout(model))))
    model(TRAIN)
    h.remove()
    x, delta, layout = seen[0]
    expected = ImageLayout.from_token_ids(TRAIN, BOI, GRID)
    assert layout.spans == expected.spans
    ref = ground_truth(x, expected, layer.text_A, layer.text_B, layer.image_A, layer.image_B, layer.scale)
    assert_close_rel(delta, ref, 1e-5, "down_proj delta")


@pytest.mark.parametrize("reentrant", [False, True])
def test_llama_training_with_gradient_checkpointing(reentrant):
    model = llama()
    model.train()
    out = model(TRAIN, labels=TRAIN)
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for n, g in ref.items() if n.endswith(("_B",)))
    model.zero_grad()
    checkpointing(model, use_reentrant=reentrant)
    if reentrant:
        model.enable_input_require_grads()
    loss = model(TRAIN, labels=TRAIN).loss
    loss.backward()
    assert torch.allclose(loss, out.loss)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close_rel(p.grad, ref[n], 1e-5, n)


def test_llama_greedy_generate_equals_full_forward():
    model = llama()
    n = 9
    out = model.generate(PROMPT, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    assert out.past_key_values.moss_states is not None  # generate's own cache carried the conv states
    seq = out.sequences
    full = model(seq).logits[:, PROMPT.shape[1] - 1:-1]
    got = torch.stack(out.logits, 1)
    assert_close_rel(got, full, 1e-5, "generate logits")
    assert torch.equal(full.argmax(-1), seq[:, PROMPT.shape[1]:])
    # The adapters matter for these logits: an all-text run differs.
    with mk.moss_layout(model, ImageLayout.text_only(*seq.shape)):
        text = model(seq).logits[:, PROMPT.shape[1] - 1:-1]
    assert (text - full).norm() > 1e-3 * full.norm()


def test_llama_beam_search_reorders_states():
    model = llama()
    reorders = []
    orig = mk.model.cache.MossStates.reorder

    def spy(self, idx):
        reorders.append(torch.as_tensor(idx).tolist())
        return orig(self, idx)

    mk.model.cache.MossStates.reorder = spy
    try:
        cached = model.generate(PROMPT, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    finally:
        mk.model.cache.MossStates.reorder = orig
    uncached = model.generate(PROMPT, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert reorders and any(r != sorted(r) for r in reorders)
    assert torch.equal(cached, uncached)


def test_llama_manual_loop_with_moss_cache():
    model = llama()
    seq = torch.cat([PROMPT, torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27]])], 1)
    cache = MossCache()
    with torch.no_grad():
        parts = [model(seq[:, :7], past_key_values=cache, use_cache=True).logits]
        for t in range(7, seq.shape[1]):
            parts.append(model(seq[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.moss_states.states
    assert_close_rel(torch.cat(parts, 1), model(seq).logits, 1e-5, "manual loop")
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(2)


# ---------------------------------------------------------------------------------------------- Chameleon
def chameleon(seed=0):
    """A tiny Chameleon: 16 image codes (ids 4..19), <image> 20, <racm3:break> (boi) 21, <eoss> 22, text."""
    model = tiny_chameleon(seed)
    boi = model.config.vocabulary_map["<racm3:break>"]
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=boi, grid=GRID))
    randomize_adapters(model, seed)
    return model.eval(), boi


def test_chameleon_train_and_generate():
    model, boi = chameleon()
    assert not any("vq" in n for n in adapted_layers(model)) and len(adapted_layers(model)) == 14
    ids = torch.tensor([[1, 30, boi, 5, 6, 7, 8, 9, 10, 31, 32, boi, 11, 12],
                        [1, boi, 13, 14, 15, 16, 17, 18, 33, 34, 35, 36, 37, 38]])
    # Training on image codes: logits from hidden states (the forward masks image-code logits).
    model.train()
    checkpointing(model)
    loss = nn.functional.cross_entropy(lm_logits(model, model.model(ids).last_hidden_state)[:, :-1].flatten(0, 1),
                                       ids[:, 1:].flatten())
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    checkpointing(model, on=False)
    model.zero_grad()
    nn.functional.cross_entropy(lm_logits(model, model.model(ids).last_hidden_state)[:, :-1].flatten(0, 1),
                                ids[:, 1:].flatten()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close_rel(grads[n], p.grad, 1e-5, n)
    # generate() with a prompt ending inside an image: its conv states ride in the generation cache.
    model.eval()
    prompt = ids[:, :5]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=3)
    seq = out.sequences
    full = model(seq).logits[:, prompt.shape[1] - 1:-1]
    got = torch.stack(out.logits, 1)
    keep = torch.ones(full.shape[-1], dtype=torch.bool)
    keep[model.model.vocabulary_mapping.image_tokens] = False  # masked to the dtype's minimum by the model
    assert_close_rel(got[..., keep], full[..., keep], 1e-5, "chameleon generate logits")
    assert torch.equal(full.argmax(-1), seq[:, prompt.shape[1]:])


def test_llama_generate_from_inputs_embeds_with_explicit_layout():
    """Emu2-style: the prompt comes as embeddings, its layout explicitly; decoding continues the image."""
    model = llama()
    by_ids = model.generate(PROMPT, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                            output_logits=True, pad_token_id=0)
    emb = model.get_input_embeddings()(PROMPT)
    with pytest.raises(ValueError, match="moss_layout"):
        model.generate(inputs_embeds=emb, max_new_tokens=2, pad_token_id=0)
    with mk.moss_layout(model, ImageLayout.from_token_ids(PROMPT, BOI, GRID)):
        by_emb = model.generate(inputs_embeds=emb, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                                output_logits=True, pad_token_id=0)
    assert torch.equal(by_emb.sequences[:, -5:], by_ids.sequences[:, -5:])
    assert_close_rel(torch.stack(by_emb.logits, 1), torch.stack(by_ids.logits, 1), 1e-5, "inputs_embeds generate")


def test_llama_left_padded_batch_generation():
    """A left-padded row generates what it generates alone (the tracker counts padding as text)."""
    model = llama()
    row = PROMPT[1:, 2:]  # 5 tokens, ends one token into an image
    padded = torch.cat([PROMPT[:1], torch.cat([torch.zeros(1, 2, dtype=torch.int64), row], 1)])
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    both = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0)
    alone = model.generate(row, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                           pad_token_id=0)
    assert torch.equal(both.sequences[1, 2:], alone.sequences[0])
    assert_close_rel(torch.stack(both.logits, 1)[1], torch.stack(alone.logits, 1)[0], 1e-5, "left-padded row")


def test_llama_layout_kwarg_and_nested_entry():
    """``layout=`` reaches the adapters and is kept out of the HF forward; model.model works alone."""
    model = llama()
    layout = ImageLayout.from_token_ids(TRAIN, BOI, GRID)
    derived = model(TRAIN).logits
    assert torch.equal(model(TRAIN, layout=layout).logits, derived)
    text = model(TRAIN, layout=ImageLayout.text_only(*TRAIN.shape)).logits
    assert (text - derived).norm() > 1e-3 * derived.norm()
    hidden = model.model(TRAIN).last_hidden_state  # the inner entry routes on its own
    assert_close_rel(lm_logits(model, hidden), derived, 1e-6, "inner entry")
    with pytest.raises(TypeError, match="layout must be an ImageLayout"):
        model(TRAIN, layout="nope")
    assert current_layout(model) is None
