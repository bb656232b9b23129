"""Compile-clean routing (traced with dynamo's counting backend: no code generation, cheap on a CPU):
a training step with a fixed layout has no graph break in the wrapper, a new image position costs no
recompile, and a whole-model decode step with a static cache compiles with ``fullgraph=True`` once for
every step and image."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import moss_kernels as mk
from moss_kernels.layout import ImageLayout
from moss_kernels.model.decoder import DecoderConfig, MossDecoder
from moss_kernels.testing import assert_close_rel, randomize_adapters


def decoder():
    torch.manual_seed(0)
    cfg = DecoderConfig(text_vocab_size=48, image_vocab_size=24, grid=(3, 4), hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2)
    model = MossDecoder(cfg)
    mk.inject_moss(model, mk.MossConfig(rank=8, alpha=16, dropout=0.0, boi_token_id=cfg.boi_token_id, grid=cfg.grid))
    randomize_adapters(model, 0)
    return model.train()


def test_training_step_with_fixed_layout_has_no_graph_break_and_no_recompile_per_position():
    torch._dynamo.reset()
    model = decoder()
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(0))

    def step(ids, layout):
        return model(ids, layout=layout).logits.logsumexp(-1).mean()

    first = ImageLayout.from_spans(2, 20, [(0, 2, 3, 4), (1, 5, 3, 4)])
    explain = torch._dynamo.explain(step)(ids, first)
    assert explain.graph_break_count == 0, [str(b.reason) for b in explain.break_reasons]
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    want = step(ids, first)
    assert_close_rel(compiled(ids, first), want, 1e-6, "compiled training loss")
    for spans in ([(0, 4, 3, 4), (1, 1, 3, 4)], [(0, 8, 3, 4), (1, 0, 3, 4)]):  # same sizes, new positions
        layout = ImageLayout.from_spans(2, 20, spans)
        loss = compiled(ids, layout)
        assert_close_rel(loss, step(ids, layout), 1e-6, f"compiled loss at {spans}")
        loss.backward()
    assert counter.frame_count == 1


transformers = pytest.importorskip("transformers")


def test_static_cache_decode_step_compiles_fullgraph_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    boi = 60
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=boi, grid=(2, 3)))
    randomize_adapters(model, 0)
    model.eval()
    prompt = torch.tensor([[1, 5, 7, boi, 10], [1, 2, 3, 4, 9]])
    # Row 0 finishes its image and opens a second; row 1 opens one at its first step.
    cont = torch.tensor([[11, 12, 13, 14, 15, 7, boi, 20, 21, 22],
                         [boi, 20, 21, 22, 23, 24, 25, 26, 8, 9]])
    cache = transformers.StaticCache(config=cfg, max_cache_len=32)
    counter = CompileCounter()

    def step(ids, position):
        return model(ids, past_key_values=cache, cache_position=position, use_cache=True).logits

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    with torch.no_grad():
        outs = [model(prompt, past_key_values=cache, cache_position=torch.arange(5), use_cache=True).logits]
        for t in range(cont.shape[1]):
            outs.append(compiled(cont[:, t:t + 1], torch.tensor([5 + t])))
        full = model(torch.cat([prompt, cont], 1)).logits
    assert counter.frame_count == 1  # one graph for every step: no recompile per step or image
    assert_close_rel(torch.cat(outs, 1), full, 1e-5, "compiled static-cache decoding")
