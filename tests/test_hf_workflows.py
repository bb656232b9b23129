"""The Hugging Face fine-tuner's workflows on tiny configs: adapter-only save/load, MossTrainer
(checkpoints, exact resume, best model, Chameleon's hidden-state loss), disable_moss, merging the
text adapter, PEFT LoRA conversion and refusals, other linear bases (nn.Linear subclasses, torch.ao
dynamic-quantized linears), deepcopy / torch.save of an injected model."""

import copy
import io
import json
import os
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers",
                                   reason="Hugging Face transformers is not installed (pip install .[hf])")
pytest.importorskip("safetensors", reason="safetensors is not installed")

import moss_kernels as mk  # noqa: E402
from moss_kernels.bases import LinearInfo, register_linear_base  # noqa: E402
from moss_kernels.layout import ImageLayout  # noqa: E402
from moss_kernels.model import adapted_layers  # noqa: E402
from moss_kernels.model.hf import MossTrainer, allow_image_tokens, hidden_state_loss, lm_logits  # noqa: E402
from moss_kernels.model.io import CONFIG_NAME  # noqa: E402
from moss_kernels.model.tiny import tiny_chameleon, tiny_llama  # noqa: E402
from moss_kernels.testing import assert_close_rel, ground_truth, randomize_adapters  # noqa: E402

GRID = (2, 3)
BOI = 60
MOSS = dict(rank=4, alpha=8, dropout=0.0, boi_token_id=BOI, grid=GRID)
IDS = torch.tensor([[1, 5, BOI, 10, 11, 12, 13, 14, 15, 2, 7, BOI, 20, 21],
                    [1, BOI, 30, 31, 32, 33, 34, 35, 3, 4, 5, 6, BOI, 40]])
TEXT = torch.tensor([[1, 5, 7, 9, 11, 2, 3, 4], [1, 8, 6, 4, 2, 9, 10, 12]])


def llama(seed=0, randomize=True, **moss):
    model = tiny_llama(seed)
    mk.inject_moss(model, mk.MossConfig(**{**MOSS, **moss}))
    if randomize:
        randomize_adapters(model, seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------- 1. save / load
def test_save_records_config_and_loads_into_base(tmp_path):
    model = llama(modules_to_save=["embed_tokens"])
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5)  # a trained embedding: saved, not dropped
    expected = model(IDS).logits
    mk.save_moss(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg = meta["config"]
    assert (cfg["rank"], cfg["alpha"], cfg["kernel_size"], cfg["adapter"], cfg["target_modules"], cfg["routing"],
            cfg["grid"], cfg["boi_token_id"], cfg["modules_to_save"], meta["dtype"]) == \
        (4, 8, 2, "moss", "all-linear", "input", list(GRID), BOI, ["embed_tokens"], "float32")
    assert list(meta["modules_to_save"]) == ["model.embed_tokens.weight"]
    loaded = mk.load_moss(tiny_llama(0), tmp_path).eval()  # a base model: injected from the saved config
    assert loaded.moss_config == model.moss_config
    assert torch.equal(loaded(IDS).logits, expected)
    assert loaded.model.embed_tokens.weight.requires_grad
    # The saved adapters' dtype comes back too.
    model.to(torch.float64)
    mk.save_moss(model, tmp_path / "f64")
    again = mk.load_moss(tiny_llama(0).double(), tmp_path / "f64")
    assert all(layer.text_A.dtype == torch.float64 for layer in adapted_layers(again).values())


@pytest.mark.parametrize("field,value", [("alpha", 16), ("boi_token_id", 61), ("grid", (3, 2)),
                                         ("routing", "output"), ("kernel_size", 3), ("adapter", "moe_lora"),
                                         ("modules_to_save", ["norm"])])
def test_load_into_injected_model_refuses_other_settings(tmp_path, field, value):
    mk.save_moss(llama(), tmp_path)
    other = llama(randomize=False, **{field: value})
    with pytest.raises(ValueError, match=f"{field}: the model has"):
        mk.load_moss(other, tmp_path)


def test_load_refuses_other_dtype_and_save_refuses_stray_trainables(tmp_path):
    mk.save_moss(llama(), tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        mk.load_moss(llama(randomize=False).double(), tmp_path)
    model = llama()
    model.model.norm.weight.requires_grad_(True)  # unfrozen after injection, not in modules_to_save
    with pytest.raises(ValueError, match=r"model\.norm\.weight require grad but are neither adapters nor"):
        mk.save_moss(model, tmp_path / "x")
    with pytest.raises(ValueError, match="modules_to_save: 'nowhere' matches no module"):
        llama(modules_to_save=["nowhere"])
    with pytest.raises(ValueError, match="holds an adapted layer"):
        llama(modules_to_save=["self_attn"])


def test_wrapped_models_save_and_load_like_unwrapped(tmp_path):
    model = llama()
    expected = model(IDS).logits
    mk.save_moss(torch.compile(model), tmp_path / "compiled")  # OptimizedModule: not compiled until called
    mk.save_moss(nn.DataParallel(model), tmp_path / "dp")  # DDP / DataParallel style: `.module`
    for sub in ("compiled", "dp"):
        base = tiny_llama(0)
        wrapped = torch.compile(base) if sub == "compiled" else nn.DataParallel(base)
        assert mk.load_moss(wrapped, tmp_path / sub) is wrapped
        assert torch.equal(base.eval()(IDS).logits, expected)
        assert mk.load_moss(nn.DataParallel(base), tmp_path / sub).module is base  # into an injected one


# ---------------------------------------------------------------------------------------------- 2. MossTrainer
class Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(out, **kw):
    kw = {"output_dir": str(out), "per_device_train_batch_size": 2, "learning_rate": 5e-3, "max_steps": 6,
          "logging_steps": 1, "save_steps": 3, "report_to": "none", "use_cpu": True, "seed": 0,
          "dataloader_num_workers": 0, "disable_tqdm": True, "save_safetensors": True,
          "activation_checkpointing": True, **kw}
    known = set(transformers.TrainingArguments.__dataclass_fields__)
    if "activation_checkpointing" not in known:  # the older spelling
        kw["gradient_checkpointing"] = kw.pop("activation_checkpointing")
    kw = {k: v for k, v in kw.items() if k in known}
    return transformers.TrainingArguments(**kw)


def losses(trainer):
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def train_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(2, 50, (8, 14), generator=g)
    rows[:, 3] = BOI  # an image after three text tokens
    return Rows(rows)


def test_trainer_adapter_only_checkpoints_exact_resume_and_best_model(tmp_path):
    data = train_rows()
    full = MossTrainer(model=llama(randomize=False, dropout=0.1), args=args(tmp_path / "a"), train_dataset=data)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", CONFIG_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert os.path.getsize(ckpt / "adapter_model.safetensors") < 64 * 1024  # adapters only
    ref = losses(full)
    assert len(ref) == 6 and all(torch.isfinite(torch.tensor(v)) and v > 0 for _, v in ref)

    resumed = MossTrainer(model=llama(randomize=False, dropout=0.1), args=args(tmp_path / "b"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert losses(resumed) == ref  # steps 1-3 from the checkpoint's state, 4-6 the same, bit for bit
    for (n, p), q in zip(adapted_layers(full.model).items(), adapted_layers(resumed.model).values()):
        assert torch.equal(p.text_B, q.text_B), n

    # load_best_model_at_end: evaluation each save; the best checkpoint's adapters come back.
    best = MossTrainer(model=llama(randomize=False), args=args(tmp_path / "c", eval_strategy="steps", eval_steps=3,
                                                               load_best_model_at_end=True,
                                                               metric_for_best_model="loss", greater_is_better=True),
                       train_dataset=data, eval_dataset=Rows(data.ids[:2]))
    best.train()
    chosen = best.state.best_model_checkpoint
    assert chosen is not None and chosen.endswith(("checkpoint-3", "checkpoint-6"))
    reference = mk.load_moss(tiny_llama(0), chosen)
    for p, q in zip(adapted_layers(best.model).values(), adapted_layers(reference).values()):
        assert torch.equal(p.text_B, q.text_B) and torch.equal(p.image_B, q.image_B)


def test_accelerate_loop_saves_the_prepared_model(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    model = llama(randomize=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    model.train()
    acc.backward(model(input_ids=IDS, labels=IDS).loss)
    opt.step()
    mk.save_moss(model, tmp_path)  # the prepared model as it is: no unwrap_model call needed
    loaded = mk.load_moss(tiny_llama(0), tmp_path).eval()
    assert torch.equal(loaded(IDS).logits, acc.unwrap_model(model).eval()(IDS).logits)


def chameleon_rows():
    model = tiny_chameleon(0)
    boi = model.config.vocabulary_map["<racm3:break>"]
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(23, 43, (4, 12), generator=g)
    rows[:, 2] = boi
    rows[:, 3:9] = torch.randint(4, 20, (4, 6), generator=g)  # 2x3 image codes
    return model, boi, Rows(rows)


def test_trainer_chameleon_trains_image_codes_through_hidden_states(tmp_path):
    model, boi, data = chameleon_rows()
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=boi, grid=GRID))
    batch = data.ids[:2]
    assert torch.isinf(model(batch, labels=batch).loss)  # the model's own loss: image-code logits masked
    # The hidden-state loss is transformers' causal-LM loss, and equals the model's where that is finite.
    llm = llama()
    out = llm(IDS, output_hidden_states=True)
    assert torch.equal(hidden_state_loss(llm, out, IDS)[0], llm(IDS, labels=IDS).loss)

    out = model(batch, output_hidden_states=True)  # its last hidden state is the normed one the head reads
    assert torch.equal(hidden_state_loss(model, out, batch)[1], lm_logits(model, model.model(batch).last_hidden_state))

    trainer = MossTrainer(model=model, args=args(tmp_path, max_steps=3, save_steps=10), train_dataset=data,
                          eval_dataset=Rows(data.ids[:2]))
    assert trainer.hidden_state_loss
    before = {n: layer.image_B.clone() for n, layer in adapted_layers(model).items()}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for _, v in losses(trainer))
    assert all(not torch.equal(layer.image_B, before[n]) for n, layer in adapted_layers(model).items())
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))  # evaluation takes the same loss

    # Without it the loss is inf, which the Trainer would log as 0: MossTrainer raises instead.
    model2, _, _ = chameleon_rows()
    mk.inject_moss(model2, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=boi, grid=GRID))
    plain = MossTrainer(model=model2, args=args(tmp_path / "p", max_steps=1), train_dataset=data,
                        hidden_state_loss=False)
    with pytest.raises(FloatingPointError, match="hidden_state_loss=True"):
        plain.train()


def test_chameleon_generate_emits_image_codes_under_allow_image_tokens():
    model, boi, data = chameleon_rows()
    mk.inject_moss(model, mk.MossConfig(rank=4, alpha=8, dropout=0.0, boi_token_id=boi, grid=GRID))
    randomize_adapters(model, 0)
    model.eval()
    image = model.model.vocabulary_mapping.image_tokens
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight[image] *= 40  # make image codes the likeliest tokens after <boi>
    prompt = data.ids[:2, :3]  # ends with <boi>
    with allow_image_tokens(model):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=3)
    seq = out.sequences
    assert torch.isin(seq[:, 3:], torch.tensor(image)).all()  # six image codes each
    full = lm_logits(model, model.model(seq).last_hidden_state)[:, 2:-1]
    assert_close_rel(torch.stack(out.logits, 1), full, 1e-5, "unmasked generate logits")
    assert model.model.vocabulary_mapping.image_tokens == image  # the mask is back
    assert torch.isinf(model(seq, labels=seq).loss)


# ---------------------------------------------------------------------------------------------- 4. controls
def test_disable_moss_runs_the_base_exactly():
    base_logits = tiny_llama(0).eval()(IDS).logits
    base_gen = tiny_llama(0).eval().generate(IDS[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = llama(modules_to_save=["norm"])
    with torch.no_grad():
        model.model.norm.weight.mul_(3)  # a trained module_to_save: its original runs under disable_moss
    tuned = model(IDS).logits
    assert (tuned - base_logits).norm() > 1e-2 * base_logits.norm()
    with mk.disable_moss(model):
        assert torch.equal(model(IDS).logits, base_logits)
        with mk.disable_moss(model):  # nests
            assert torch.equal(model(IDS).logits, base_logits)
        assert torch.equal(model(IDS).logits, base_logits)
        gen = model.generate(IDS[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, base_gen)
    assert torch.equal(model(IDS).logits, tuned)
    with pytest.raises(RuntimeError, match="boom"), mk.disable_moss(model):
        raise RuntimeError("boom")
    assert torch.equal(model(IDS).logits, tuned)  # restored after the error
    with pytest.raises(ValueError, match="no MoSS adapters"), mk.disable_moss(tiny_llama(0)):
        pass


def test_merge_text_adapter_exact_for_text_and_refuses_the_image_adapter():
    model = llama(adapter="lora")
    expected = model(IDS).logits
    merged = mk.merge_text_adapter(model)
    assert not adapted_layers(merged) and type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close_rel(merged(IDS).logits, expected, 1e-5, "merged lora")
    model = llama()
    with pytest.raises(ValueError, match="cannot be folded"):
        mk.merge_text_adapter(model)
    text = model(TEXT).logits
    merged = mk.merge_text_adapter(model, drop_image_adapter=True)
    assert_close_rel(merged(TEXT).logits, text, 1e-5, "merged text adapter")
    mk.inject_moss(merged, mk.MossConfig(**MOSS))  # a plain model again: MoSS goes back in


def test_deepcopy_and_torch_save_roundtrip():
    model = llama()
    expected = model(IDS).logits
    twin = copy.deepcopy(model)
    assert torch.equal(twin(IDS).logits, expected)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert torch.equal(restored(IDS).logits, expected)
    with torch.no_grad():
        adapted_layers(twin)["model.layers.0.mlp.up_proj"].text_B.add_(1)
    assert torch.equal(model(IDS).logits, expected)  # independent copies


# ---------------------------------------------------------------------------------------------- 5. PEFT
@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    peft = pytest.importorskip("peft")
    base = tiny_llama(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=True,
                                                   target_modules=["q_proj", "v_proj", "down_proj"],
                                                   alpha_pattern={"down_proj": 3}))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("peft")
    pm.save_pretrained(d)
    pm.eval()
    with torch.no_grad():
        return d, pm(IDS).logits, pm(TEXT).logits


@pytest.mark.parametrize("self_tap", [False, True])
def test_from_peft_lora_is_exact(peft_dir, self_tap):
    d, on_ids, on_text = peft_dir
    model = llama(randomize=False, rank=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    randomize_adapters(model, 3)  # the image adapters hold something before the conversion
    k_proj = {n: layer for n, layer in adapted_layers(model).items() if n.endswith("k_proj")}  # not in PEFT's
    with torch.no_grad():
        for layer in k_proj.values():
            layer.text_B.zero_()
            layer.image_B.zero_()
    kept = {n: layer.text_A.clone() for n, layer in k_proj.items()}
    mk.from_peft_lora(model, d, image_self_tap=self_tap)
    assert_close_rel(model(TEXT).logits, on_text, 1e-5, "text tokens")
    if self_tap:
        assert_close_rel(model(IDS).logits, on_ids, 1e-5, "image tokens through the self tap")
    else:
        assert (model(IDS).logits - on_ids).norm() > 1e-3 * on_ids.norm()
    assert all(torch.equal(k_proj[n].text_A, a) for n, a in kept.items())  # untouched


def test_from_peft_lora_refusals_and_peft_stacking(peft_dir):
    peft = pytest.importorskip("peft")
    d, _, _ = peft_dir
    with pytest.raises(ValueError, match="rank >= 4"):
        mk.from_peft_lora(llama(rank=2, target_modules=["q_proj", "v_proj", "down_proj"]), d)
    with pytest.raises(ValueError, match="not MoSS layers"):
        mk.from_peft_lora(llama(target_modules=["q_proj"]), d)
    with pytest.raises(ValueError, match="inject MoSS into the base model first"):
        mk.from_peft_lora(tiny_llama(0), d)
    with pytest.raises(ValueError, match="image_self_tap=True needs an image adapter"):
        mk.from_peft_lora(llama(adapter="lora", target_modules=["q_proj", "v_proj", "down_proj"]), d, True)
    # MoSS into a PEFT model: refused, saying what to do.
    pm = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"merge_and_unload.*from_peft_lora"):
        mk.inject_moss(pm, mk.MossConfig(**MOSS))
    with pytest.raises(ValueError, match="carries PEFT adapters"):
        mk.inject_moss(pm.base_model.model, mk.MossConfig(**MOSS))
    # PEFT into a MoSS model: named targets are MossLinears, which PEFT refuses itself; "all-linear" wraps
    # the bases, and the next forward says so instead of training a frozen MoSS.
    model = llama()
    with pytest.raises(ValueError, match="MossLinear"):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(TypeError, match="get_peft_model on a MoSS model"):
        wrapped(IDS)


# ---------------------------------------------------------------------------------------------- 6. other bases
class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (bitsandbytes-style)."""

    def forward(self, x):
        return super().forward(x) * 0.5


class Packed(nn.Module):
    """A GPTQ-style module: no nn.Linear, its weight in a buffer."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.register_buffer("w", torch.randn(d_out, d_in))
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x):
        return x @ self.w.t()


def quantized_llama():
    """Tiny Llama with torch.ao dynamic-quantized decoder linears (the head stays float), and the same
    model with float linears holding the dequantized weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        q = tiny_llama(0)
        q.model = torch.ao.quantization.quantize_dynamic(q.model, {nn.Linear}, dtype=torch.qint8)
        ref = tiny_llama(0)
        for name, m in q.named_modules():
            if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
                lin = ref.get_submodule(name)
                with torch.no_grad():
                    lin.weight.copy_(m.weight().dequantize())
    return q, ref


def test_quantized_and_subclassed_bases():
    q, ref = quantized_llama()
    qtype = type(q.model.layers[0].mlp.up_proj)
    assert not isinstance(q.model.layers[0].mlp.up_proj, nn.Linear)
    for m in (q, ref):
        mk.inject_moss(m, mk.MossConfig(**MOSS))  # "all-linear" selects the quantized linears
    randomize_adapters(q, 0)
    with torch.no_grad():
        for a, b in zip(adapted_layers(q).values(), adapted_layers(ref).values()):
            for name in ("text_A", "text_B", "image_A", "image_B"):
                getattr(b, name).copy_(getattr(a, name))
    layers = adapted_layers(q)
    assert len(layers) == 14 and all(type(layer.base) is qtype for layer in layers.values())
    layer = layers["model.layers.1.mlp.down_proj"]
    seen = []
    h = layer.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning: our backward runs
        q(IDS, labels=IDS).loss.backward()
    h.remove()
    x, y = seen[0]
    expected = ground_truth(x, ImageLayout.from_token_ids(IDS, BOI, GRID), layer.text_A, layer.text_B,
                            layer.image_A, layer.image_B, layer.scale)
    assert_close_rel(y - layer.base(x), expected, 1e-5, "quantized base (black box) + adapters")
    # Gradients reach every layer through the quantized bases, as through float bases with the same
    # (dequantized) weights, up to the activation quantization of the dynamic forward.
    ref(IDS, labels=IDS).loss.backward()
    for (n, a), b in zip(adapted_layers(q).items(), adapted_layers(ref).values()):
        assert_close_rel(a.text_A.grad, b.text_A.grad, 0.1, n)
        assert_close_rel(a.image_A.grad, b.image_A.grad, 0.1, n)
    with mk.disable_moss(q):
        assert torch.equal(layer(x), layer.base(x))
    with pytest.raises(TypeError, match="cannot take the adapter's update"):
        mk.merge_text_adapter(q, drop_image_adapter=True)

    model = tiny_llama(0)
    model.model.layers[0].mlp.up_proj = sub = ScaledLinear(32, 64)
    model.model.layers[1].mlp.up_proj = Packed(32, 64)
    unregistered = tiny_llama(0)
    unregistered.model.layers[1].mlp.up_proj = Packed(32, 64)
    assert list(adapted_layers(mk.inject_moss(unregistered, target_modules=["up_proj"]))) == \
        ["model.layers.0.mlp.up_proj"]
    register_linear_base(Packed, lambda m: LinearInfo(m.in_features, m.out_features, m.w.device))
    mk.inject_moss(model, mk.MossConfig(**MOSS))
    layers = adapted_layers(model)
    assert layers["model.layers.0.mlp.up_proj"].base is sub
    assert type(layers["model.layers.1.mlp.up_proj"].base) is Packed
    x = torch.randn(2, 5, 32)
    assert torch.equal(layers["model.layers.0.mlp.up_proj"](x), sub(x))  # B = 0: the base, as a black box
    with pytest.raises(TypeError, match=r"registered with moss_kernels\.bases\.register_linear_base"):
        mk.MossLinear(nn.Conv1d(3, 3, 1))


def test_user_layout_provider_is_recorded_by_name(tmp_path):
    def provider(ids):
        return ImageLayout.from_token_ids(ids, BOI, GRID)

    model = llama(layout_provider=provider)
    expected = model(IDS).logits
    mk.save_moss(model, tmp_path)
    with pytest.raises(ValueError, match=r"layout_provider=\.\.\."):  # code cannot be rebuilt from a file
        mk.load_moss(tiny_llama(0), tmp_path)
    again = mk.load_moss(llama(randomize=False, layout_provider=provider), tmp_path)
    assert torch.equal(again(IDS).logits, expected)
    with pytest.raises(ValueError, match="layout_provider: the model has"):
        mk.load_moss(llama(randomize=False, layout_provider=lambda ids: provider(ids)), tmp_path)


def test_callable_provider_wrapper_is_recorded_by_its_function(tmp_path):
    """A ``CallableProvider`` is recorded by the function it wraps: loading under another function
    raises (no silent other routing), under the same one (wrapped or plain) it loads."""
    from moss_kernels.model.providers import CallableProvider

    def provider(ids):
        return ImageLayout.from_token_ids(ids, BOI, GRID)

    def other(ids):
        return ImageLayout.text_only(*ids.shape)

    model = llama(layout_provider=CallableProvider(provider))
    expected = model(IDS).logits
    mk.save_moss(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["layout_provider"]["unserializable"].endswith(
        "<locals>.provider")
    with pytest.raises(ValueError, match=r"saved layout_provider .*provider\).*layout_provider=\.\.\."):
        mk.load_moss(tiny_llama(0), tmp_path)  # a fresh base: the function must be given
    with pytest.raises(ValueError, match=r"layout_provider: the model has .*other.*provider"):
        mk.load_moss(llama(randomize=False, layout_provider=CallableProvider(other)), tmp_path)
    for given in (CallableProvider(provider), provider):
        assert torch.equal(mk.load_moss(llama(randomize=False, layout_provider=given), tmp_path)(IDS).logits, expected)
