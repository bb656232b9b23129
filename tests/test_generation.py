"""Decoding through the device-side routing: every step is ``moss_lora_step`` with routing tensors
advanced on the device, and equals one full forward over the generated sequence — on every backend,
in the built-in decoder and in Hugging Face ``generate()`` (greedy, sampling, beam search, dynamic
and static caches), for rows that open and close images at different steps. Also: deepcopy /
pickling of injected models, the whole-model backend choice, the no-image warning."""

import copy
import inspect
import io
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import moss_kernels as mk
from moss_kernels import backends
from moss_kernels.layout import ImageLayout
from moss_kernels.model import adapted_layers
from moss_kernels.model.decoder import DecoderConfig, MossDecoder, generate
from moss_kernels.model.providers import BoiGridProvider, Tracker
from moss_kernels.testing import TOLERANCE, assert_close_rel, randomize_adapters

GRID = (3, 4)
BACKENDS = [b for b in ("reference", "native", "triton") if b in mk.available_backends("cpu")]


def tiny(**kw) -> DecoderConfig:
    base = dict(text_vocab_size=48, image_vocab_size=24, grid=GRID, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2)
    base.update(kw)
    return DecoderConfig(**base)


def make_model(adapter="moss", backend=None, routing="input", kernel_size=2, seed=0):
    torch.manual_seed(seed)
    cfg = tiny()
    model = MossDecoder(cfg)
    mk.inject_moss(model, mk.MossConfig(rank=8, alpha=16, dropout=0.0, adapter=adapter, kernel_size=kernel_size,
                                        boi_token_id=cfg.boi_token_id, grid=cfg.grid, routing=routing,
                                        backend=backend))
    randomize_adapters(model, seed)
    return model.eval()


class StepSpy:
    """Counts calls of the backends' decode step (through ``moss_lora_step``'s op, or directly from a
    layer's checked plan) and forbids host reads of tensors in the model path of a decoding step (the
    CPU-only argument checks excepted: on a GPU they run on the device)."""

    ALLOWED = frozenset({("conv_lora.py", "_check_positions"), ("cache.py", "_check_step")})

    def __init__(self, monkeypatch):
        self.calls = 0
        for cls in {type(be) for be in backends._BACKENDS.values()}:
            orig = cls.decode_step  # the function, for methods and staticmethods alike

            def counting(*a, _orig=orig, **k):
                self.calls += 1
                return _orig(*a, **k)

            static = isinstance(inspect.getattr_static(cls, "decode_step"), staticmethod)
            monkeypatch.setattr(cls, "decode_step", staticmethod(counting) if static else counting)
        self.monkeypatch = monkeypatch
        self.armed = False
        for name in ("tolist", "item", "nonzero", "__bool__", "__int__"):
            self._guard(name)

    def _guard(self, name):
        orig = getattr(torch.Tensor, name)
        spy = self

        def guarded(t, *a, **k):
            if spy.armed:
                caller = inspect.stack()[1]
                if (caller.filename.rsplit("/", 1)[-1], caller.function) not in StepSpy.ALLOWED:
                    raise AssertionError(f"host read Tensor.{name} in a decoding step at "
                                         f"{caller.filename}:{caller.lineno} ({caller.function})")
            return orig(t, *a, **k)

        self.monkeypatch.setattr(torch.Tensor, name, guarded)


# ---------------------------------------------------------------------------------------------- device-side step
def test_decode_step_routes_on_device_through_the_step_op(monkeypatch):
    """After the prefill, a step reads nothing on the host and every adapted layer calls moss_lora_step."""
    model = make_model()
    cfg = model.config
    boi = cfg.boi_token_id
    prompt = torch.tensor([[5, boi, 60, 61, 62, 63, 64], [1, 2, 3, 4, 5, 6, 7]])
    cache = model.new_cache()
    spy = StepSpy(monkeypatch)
    with torch.no_grad():
        model(prompt, cache=cache)
        spy.calls = 0
        spy.armed = True
        for tok in ([65, boi], [66, 60], [67, 61]):  # row 1 opens an image at the second step
            model(torch.tensor(tok).unsqueeze(1), cache=cache)
        spy.armed = False
    assert spy.calls == 3 * len(adapted_layers(model))
    tr = cache.moss_states.tracker
    assert tr.mode.tolist() == [1, 1] and tr.pos.tolist() == [8, 2]  # tokens since <boi>


def test_provider_step_equals_host_layout():
    """The device step of the boi-grid provider routes every token as the host scan does, for random
    token streams (markers inside images are image data), both routings."""
    g = torch.Generator().manual_seed(0)
    for routing in ("input", "output"):
        prov = BoiGridProvider(1, (2, 3), routing)
        for trial in range(10):
            B, S = 3, 25
            ids = torch.randint(0, 4, (B, S), generator=g)
            full = ImageLayout.from_token_ids(ids, 1, (2, 3), routing)
            want, _, _ = full.step_positions()
            tracker = Tracker(B, torch.device("cpu"), 2, 3)
            cut = 1 + trial % 7
            prov.layout(ids[:, :cut], tracker)  # a host prefill, then device steps
            got = [prov.step(tracker, ids[:, t:t + 1]).image_pos for t in range(cut, S)]
            assert torch.equal(torch.stack(got), want[cut:]), (routing, trial)


# ---------------------------------------------------------------------------------------------- exactness
SCRIPT = None


def _continuations(cfg):
    """Teacher-forced continuations: row 0 finishes its image then writes text; row 1 is in text, opens an
    image at step 3 and closes it; row 2 opens one at once; row 3 stays in text."""
    boi, eoi, img = cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_start
    n = cfg.image_tokens
    rows = [
        [img + 1] * 7 + [eoi] + [3, 4, boi] + [img + 2] * 4,
        [7, 8, boi] + [img + 3 + (t % 5) for t in range(n)] + [eoi, 9],
        [boi] + [img + (t % 7) for t in range(n)] + [eoi, 5],
        list(range(10, 10 + n + 3)),
    ]
    L = min(len(r) for r in rows)
    return torch.tensor([r[:L] for r in rows])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adapter", ["moss", "moe_lora", "lora"])
def test_steps_equal_full_forward_rows_opening_and_closing_at_different_steps(backend, adapter):
    if backend == "triton" and adapter != "moss":
        pytest.skip("one triton case keeps the interpreter's cost down")
    model = make_model(adapter, backend)
    cfg = model.config
    boi, img = cfg.boi_token_id, cfg.image_token_start
    # Prompts: row 0 ends inside the second image row (5 of 12 codes), row 1 in text, row 2 on <boi>,
    # row 3 in text.
    prompt = torch.tensor([[1, boi, img, img + 1, img + 2, img + 3, img + 4],
                           [1, 2, 3, 4, 5, 6, 7],
                           [1, 2, 3, 4, 5, 6, boi],
                           [9, 9, 9, 9, 9, 9, 9]])
    cont = _continuations(cfg)
    cache = model.new_cache()
    with torch.no_grad():
        first = model(prompt, cache=cache).logits
        steps = [model(cont[:, t:t + 1], cache=cache).logits for t in range(cont.shape[1])]
        full = model(torch.cat([prompt, cont], 1)).logits
    tol = TOLERANCE[torch.float32]
    assert_close_rel(first, full[:, :prompt.shape[1]], tol, "prefill")
    assert_close_rel(torch.cat(steps, 1), full[:, prompt.shape[1]:], tol, "decode steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_equals_full_forward_every_backend(backend):
    model = make_model("moss", backend, kernel_size=3 if backend == "reference" else 2)
    cfg = model.config
    boi = cfg.boi_token_id
    img = cfg.image_token_start
    prompt = torch.tensor([[5, 6, boi, img, img + 1, img + 2, img + 3, img + 4],  # ends in the image's second row
                           [9, 1, 2, 3, 4, 5, 6, boi]])
    n = cfg.image_tokens + 3
    gen = generate(model, prompt, n, do_sample=True, generator=torch.Generator().manual_seed(1), temperature=2.0)
    full = model(gen.sequences).logits[:, prompt.shape[1] - 1:-1]
    assert_close_rel(gen.logits, full, TOLERANCE[torch.float32], f"{backend} generate")


@pytest.fixture(scope="module")
def simt_backend():
    """The CUDA kernels, run on the CPU by the SIMT harness (tests/simt), as the backend "simt_cuda"."""
    if os.environ.get("MOSS_KERNELS_NATIVE", "1") == "0" or shutil.which("g++") is None:
        pytest.skip("the SIMT harness needs the native build and g++")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "simt"))
    import torch_ext as simt

    with simt.registered():
        yield simt


def test_model_path_on_the_cuda_kernels(simt_backend):
    """The CUDA build's launch sequences in the model path (prefill through the fused forward with
    state writes, weight-stationary decode steps, a full forward), executed by the SIMT harness."""
    before = simt_backend.launches("decode"), simt_backend.launches("fused")
    test_steps_equal_full_forward_rows_opening_and_closing_at_different_steps(simt_backend.BACKEND, "moss")
    test_generate_equals_full_forward_every_backend(simt_backend.BACKEND)
    assert simt_backend.launches("decode") > before[0] and simt_backend.launches("fused") > before[1]


# ---------------------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")

BOI = 60
HF_GRID = (2, 3)


def llama(seed=0, **moss):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=BOI, grid=HF_GRID, **moss))
    randomize_adapters(model, seed)
    return model.eval()


PROMPT = torch.tensor([[1, 5, 7, BOI, 10, 11, 12, 13], [1, 2, 3, 4, 9, 8, BOI, 13], [1, 2, 3, 4, 5, 6, 7, 8]])


def _hf_generate(model, **kw):
    return model.generate(PROMPT, return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hf_greedy_generate_equals_full_forward(cache, monkeypatch):
    model = llama()
    spy = StepSpy(monkeypatch)
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = _hf_generate(model, max_new_tokens=9, do_sample=False, **kw)
    assert spy.calls == 8 * len(adapted_layers(model))  # every step after the prefill went through the step op
    assert ("Static" in type(out.past_key_values).__name__) == (cache == "static")
    seq = out.sequences
    full = model(seq).logits[:, PROMPT.shape[1] - 1:-1]
    assert_close_rel(torch.stack(out.logits, 1), full, 1e-5, f"{cache} generate logits")
    assert torch.equal(full.argmax(-1), seq[:, PROMPT.shape[1]:])


def test_hf_sampling_and_beam_search_equal_uncached():
    model = llama()
    torch.manual_seed(5)
    cached = _hf_generate(model, max_new_tokens=8, do_sample=True, top_k=0, temperature=3.0).sequences
    torch.manual_seed(5)
    uncached = _hf_generate(model, max_new_tokens=8, do_sample=True, top_k=0, temperature=3.0, use_cache=False)
    assert torch.equal(cached, uncached.sequences)
    beams = model.generate(PROMPT, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    beams_uncached = model.generate(PROMPT, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                                    use_cache=False)
    assert torch.equal(beams, beams_uncached)


# ---------------------------------------------------------------------------------------------- model surface
def test_deepcopy_pickle_and_torch_save_of_an_injected_model():
    model = make_model()
    ids = torch.tensor([[5, model.config.boi_token_id, 60, 61, 62, 63, 64, 65]])
    want = model(ids).logits
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies.append(torch.load(buf, weights_only=False))
    for c in copies:
        assert c._moss_router is not model._moss_router
        assert all(layer.routing is c._moss_router for layer in adapted_layers(c).values())
        assert torch.equal(c(ids).logits, want)
        gen_c, gen_m = generate(c, ids[:, :4], 5), generate(model, ids[:, :4], 5)
        assert torch.equal(gen_c.sequences, gen_m.sequences)
    with torch.no_grad():  # the copy's adapters are its own
        next(iter(adapted_layers(copies[0]).values())).text_B.add_(1.0)
    assert torch.equal(model(ids).logits, want) and not torch.equal(copies[0](ids).logits, want)


def test_whole_model_backend_choice():
    model = make_model(backend="reference")
    assert {layer.backend for layer in adapted_layers(model).values()} == {"reference"}
    model2 = MossDecoder(tiny())
    mk.inject_moss(model2, mk.MossConfig(rank=4), backend="reference")
    assert {layer.backend for layer in adapted_layers(model2).values()} == {"reference"}
    with pytest.raises(ValueError, match="backend"):
        mk.MossConfig(backend=3)


def test_warns_once_when_a_training_batch_routes_no_image():
    model = make_model()
    model.train()
    text = torch.randint(0, 40, (2, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(text)
        model(text)
    msgs = [w for w in caught if "routed no image token" in str(w.message)]
    assert len(msgs) == 1


def test_generation_benchmark_smoke():
    """The benchmark runs and reports what it says (tiny sizes: the numbers mean nothing here)."""
    from moss_kernels.bench.generation import GenerationConfig, format_table, run_generation

    cfg = GenerationConfig.quick()
    cfg.variants, cfg.new_tokens, cfg.train_seq = ("base", "peft_lora", "moss"), 3, 8
    report = run_generation(cfg, verbose=False)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"base", "peft_lora", "moss"}
    for r in rows.values():
        assert r["generate_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 3 / r["generate_s"])
        assert len(r["samples"]["generate"]) == 1
    assert rows["base"]["train_step_s"] is None and rows["moss"]["train_step_s"] > 0
    # The bytes a step reads: every generated token is an image token, so MoSS reads its 2x2 conv
    # (4 r d_in) and up-projection, PEFT its A and B, for q, k, v, o, gate, up, down of each layer.
    h, f, r = cfg.hidden_size, cfg.intermediate_size, cfg.rank
    shapes = [(h, h)] * 4 + [(h, f), (h, f), (f, h)]
    assert rows["moss"]["adapter_bytes"] == 4 * cfg.num_layers * sum(4 * r * i + r * o for i, o in shapes)
    assert rows["peft_lora"]["adapter_bytes"] == 4 * cfg.num_layers * sum(r * i + r * o for i, o in shapes)
    assert rows["moss"]["floor_step_s"] == pytest.approx(
        rows["moss"]["adapter_bytes"] / (report["meta"]["stream_bandwidth_gb_s"] * 1e9))
    table = format_table(report)
    assert "| moss |" in table and "x PEFT LoRA's" in table and "PEFT's adapter bytes" in table


def test_single_token_first_forward_and_use_cache_without_a_cache():
    """A cache's first forward may be a step (a one-token prompt); ``model(ids, use_cache=True)`` without a
    cache gets one that carries the conv states, so decoding can continue from ``out.past_key_values``."""
    model = llama()
    seq = torch.tensor([[BOI, 10, 11, 12, 13, 14, 15, 16], [5, BOI, 10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        out = model(seq[:, :1], use_cache=True)
        parts = [out.logits]
        cache = out.past_key_values
        assert cache.moss_states is not None
        for t in range(1, seq.shape[1]):
            parts.append(model(seq[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert_close_rel(torch.cat(parts, 1), model(seq).logits, 1e-5, "decoding from a one-token prompt")


def test_config_round_trips_providers():
    from moss_kernels.model.providers import Emu3Provider, JanusProvider

    for prov in (JanusProvider(5, (4, 4)), Emu3Provider(1, 2, 3, list(range(10, 20)), 4, max_width=8)):
        cfg = mk.MossConfig(rank=4, layout_provider=prov, backend="reference")
        back = mk.MossConfig.from_dict(cfg.to_dict())
        assert type(back.layout_provider) is type(prov) and back.backend == "reference"
        assert vars(back.layout_provider) == {k: v for k, v in vars(prov).items() if k != "_digit_table"} | (
            {"_digit_table": None} if isinstance(prov, Emu3Provider) else {})
    with pytest.raises(ValueError, match="layout_provider"):
        mk.MossConfig(layout_provider=3)
