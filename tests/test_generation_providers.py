"""Layout providers of real model families (tiny transformers configs, no download): the same
provider routes the training forward, the prefill and every decoding step, so ``generate()`` equals
one full forward — Emu3 (size parsed from the text, end-of-line tokens text, a resolution per
image), Janus (image generation, steps as ``inputs_embeds``), a user callable."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moss_kernels as mk  # noqa: E402
from moss_kernels.layout import ImageLayout, ImageSpan  # noqa: E402
from moss_kernels.model import adapted_layers  # noqa: E402
from moss_kernels.model.providers import Emu3Provider, JanusProvider, Tracker  # noqa: E402
from moss_kernels.model.tiny import tiny_emu3, tiny_janus  # noqa: E402
from moss_kernels.model.tiny import tiny_emu3_vocab as emu3_vocab  # noqa: E402
from moss_kernels.testing import assert_close_rel, randomize_adapters  # noqa: E402


# ---------------------------------------------------------------------------------------------- Emu3
def emu3_provider(vocab, max_width=12):
    return Emu3Provider(vocab["<|image start|>"], vocab["<|image token|>"], vocab["<|extra_200|>"],
                        [vocab[str(d)] for d in range(10)], vocab["*"], max_width=max_width)


def emu3(seed=0):
    vocab = emu3_vocab()
    model = tiny_emu3(seed).eval()
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, layout_provider=emu3_provider(vocab)))
    randomize_adapters(model, seed)
    return model, vocab


def _ids(vocab, *tokens):
    return [vocab[t] if isinstance(t, str) else t for t in tokens]


def test_emu3_provider_layout_and_device_steps_agree():
    vocab = emu3_vocab()
    prov = emu3_provider(vocab)
    v = vocab["<|visual token000000|>"]
    eol = vocab["<|extra_200|>"]
    # Row 0: a 2x3 image (rows end with eol), then a 1x2 image; row 1: text, then a 3x1 image cut.
    row0 = _ids(vocab, "<s>", "<|image start|>", "2", "*", "3", "<|image token|>", v, v + 1, v + 2, eol,
                v + 3, v + 4, v + 5, eol, "<|image end|>", "t1", "<|image start|>", "1", "*", "2", "<|image token|>",
                v, v + 1, eol, "t2")
    row1 = _ids(vocab, "t3", "t4", "<|image start|>", "3", "*", "1", "<|image token|>", v, eol, v + 1, eol, v + 2)
    row1 += [vocab["t5"]] * (len(row0) - len(row1))
    ids = torch.tensor([row0, row1])
    layout = prov.layout(ids)
    want = [ImageSpan(0, 6, 2, 3, 0, 3), ImageSpan(0, 10, 2, 3, 3, 3), ImageSpan(0, 21, 1, 2, 0, 2),
            ImageSpan(1, 7, 3, 1, 0, 1), ImageSpan(1, 9, 3, 1, 1, 1), ImageSpan(1, 11, 3, 1, 2, 1)]
    assert list(layout.spans) == want
    pos, height, width = layout.step_positions()
    for cut in (1, 5, 8, 12):  # a host prefill of `cut` tokens, then device steps
        tracker = Tracker(2, torch.device("cpu"))
        prov.layout(ids[:, :cut], tracker)
        for t in range(cut, ids.shape[1]):
            route = prov.step(tracker, ids[:, t:t + 1])
            assert torch.equal(route.image_pos, pos[t]), (cut, t)
            img = pos[t] >= 0
            assert torch.equal(route.height[img], height[t][img]) and torch.equal(route.width[img], width[t][img])


def test_emu3_generate_equals_full_forward():
    model, vocab = emu3()
    v = vocab["<|visual token000000|>"]
    prompt = torch.tensor([_ids(vocab, "<s>", "t1", "<|image start|>", "2", "*", "3", "<|image token|>", v + 1, v + 2),
                           _ids(vocab, "<s>", "<|image start|>", "1", "*", "1", "0", "<|image token|>", v + 1, v + 2)])
    n = 8
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=3)
    seq = out.sequences
    assert out.past_key_values.moss_states.tracker.mode.tolist() == [0, 1]  # row 0 closed its image, row 1 not yet
    full = model(seq).logits[:, prompt.shape[1] - 1:-1]
    assert_close_rel(torch.stack(out.logits, 1), full, 1e-5, "emu3 generate")
    layout = model._moss_router.provider.layout(seq)
    assert layout.num_image_tokens == 6 + 10  # the 2x3 (its end-of-line tokens are text) and the 1x10
    with mk.moss_layout(model, ImageLayout.text_only(*seq.shape)):
        text = model(seq).logits[:, prompt.shape[1] - 1:-1]
    assert (text - full).norm() > 1e-3 * full.norm()  # the routing matters


# ---------------------------------------------------------------------------------------------- Janus
JANUS_BOI = 62


def janus(seed=0):
    model = tiny_janus(seed).eval()
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, layout_provider=JanusProvider(JANUS_BOI, (2, 3))))
    randomize_adapters(model, seed)
    return model


def test_janus_image_generation_equals_full_forward():
    model = janus()
    prompt = torch.tensor([[1, 5, 6, 7, JANUS_BOI], [1, 8, 9, 10, JANUS_BOI]])
    scores = []

    class Record(transformers.LogitsProcessor):
        def __call__(self, input_ids, s):
            scores.append(s.clone())
            return s

    gc = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, guidance_scale=2.0, pad_token_id=0,
                                       bos_token_id=1, generation_kwargs={"boi_token_id": JANUS_BOI})
    tokens = model.generate(prompt, generation_config=gc, generation_mode="image",
                            attention_mask=torch.ones_like(prompt),
                            logits_processor=transformers.LogitsProcessorList([Record()]))
    assert tokens.shape == (2, 6) and len(scores) == 6
    # One full forward over what generation fed: the prompts (conditional and unconditional rows) as
    # embeddings, then the first five generated image tokens through the generation embedding.
    cond = prompt.repeat(2, 1)
    cond[2:] = torch.where((cond[2:] == 1) | (cond[2:] == JANUS_BOI), cond[2:], 0)
    codes = torch.cat([tokens, tokens])[:, :-1]
    with torch.no_grad():
        emb = torch.cat([model.get_input_embeddings()(cond), model.prepare_embeddings_for_image_generation(codes)], 1)
        S = prompt.shape[1]
        layout = ImageLayout.from_spans(4, emb.shape[1], [(b, S, 2, 3, 0, 5) for b in range(4)])
        with mk.moss_layout(model, layout):
            hidden = model.model.language_model(inputs_embeds=emb).last_hidden_state
        full = model.model.generation_head(hidden[:, S - 1:])
    assert_close_rel(torch.stack(scores, 1), full, 1e-5, "janus generation scores")
    assert len(adapted_layers(model)) == 14


# ---------------------------------------------------------------------------------------------- a callable
def test_callable_provider_routes_training_and_decoding():
    """A user function gives the layout of multi-token forwards; decoding steps finish the images it
    left open (from the device tracker), then route text."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    marker = 60

    def fn(ids):  # images: 2x2 grids after the marker, found by the user's own rule
        spans = [(b, t + 1, 2, 2) for b, row in enumerate(ids.tolist()) for t, tok in enumerate(row)
                 if tok == marker and t + 1 < ids.shape[1]]
        return ImageLayout.from_spans(ids.shape[0], ids.shape[1], spans)

    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, layout_provider=fn))
    randomize_adapters(model, 0)
    model.eval()
    prompt = torch.tensor([[1, 5, marker, 10], [1, marker, 11, 12]])  # row 1: 2 of 4 image tokens in
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0)
    seq = out.sequences
    # fn on the whole sequence sees markers the steps did not open: compare against the same routing.
    want = ImageLayout.from_spans(2, seq.shape[1], [(0, 3, 2, 2), (1, 2, 2, 2)])
    with mk.moss_layout(model, want):
        full = model(seq).logits[:, prompt.shape[1] - 1:-1]
    assert_close_rel(torch.stack(out.logits, 1), full, 1e-5, "callable provider generate")
    with pytest.raises(TypeError, match="ImageLayout"):
        mk.inject_moss(transformers.LlamaForCausalLM(cfg),
                       mk.MossConfig(rank=4, layout_provider=lambda ids: None))(prompt)
