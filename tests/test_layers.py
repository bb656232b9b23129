"""MossLinear: initialisation, freezing, dropout placement, adapter variants."""

import math

import pytest
import torch

import moss_kernels as mk
from moss_kernels.testing import assert_close_rel, ground_truth


def _layout():
    return mk.ImageLayout.from_spans(2, 16, [(0, 1, 3, 3), (1, 4, 2, 5)])


@pytest.mark.parametrize("bias", [True, False])
def test_untrained_layer_equals_base_and_base_is_frozen(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 7, bias=bias)
    layer = mk.MossLinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(2, 16, 10)
    assert torch.equal(layer(x, _layout()), base(x))
    assert not any(p.requires_grad for p in base.parameters())
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"text_A", "text_B", "image_A", "image_B"}
    assert layer.text_A.shape == (4, 10) and layer.text_B.shape == (7, 4)
    assert layer.image_A.shape == (4, 10, 2, 2) and layer.image_B.shape == (7, 4)
    assert layer.scale == 2.0 and layer.text_B.abs().sum() == 0 and layer.image_B.abs().sum() == 0
    assert layer.text_A.dtype == torch.float32


def test_a_init_is_peft_kaiming_uniform():
    layer = mk.MossLinear(torch.nn.Linear(400, 3), rank=64, alpha=64)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on fan_in 400
    assert layer.text_A.abs().max() <= bound and layer.text_A.abs().max() > 0.9 * bound
    bound = 1 / math.sqrt(400 * 4)
    assert layer.image_A.abs().max() <= bound and layer.image_A.abs().max() > 0.9 * bound


def test_forward_is_base_plus_routed_adapters():
    torch.manual_seed(1)
    base = torch.nn.Linear(10, 7)
    layer = mk.MossLinear(base, rank=4, alpha=6, dropout=0.0)
    with torch.no_grad():
        layer.text_B.normal_()
        layer.image_B.normal_()
    x = torch.randn(2, 16, 10)
    lay = _layout()
    want = base(x).double() + ground_truth(x, lay, layer.text_A, layer.text_B, layer.image_A, layer.image_B, 1.5)
    assert_close_rel(layer(x, lay), want, 1e-5)
    with torch.no_grad():
        assert_close_rel(layer(x, lay), want, 1e-5)  # the in-place inference path


def test_dropout_only_on_adapter_input_and_shared_by_all_taps():
    torch.manual_seed(2)
    base = torch.nn.Linear(10, 7)
    layer = mk.MossLinear(base, rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.text_B.normal_()
        layer.image_B.normal_()
    seen = []
    layer.dropout.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    layer.train()
    x = torch.randn(2, 16, 10)
    lay = _layout()
    y = layer(x, lay)
    (dropped,) = seen
    assert (dropped == 0).any() and not torch.equal(dropped, x)
    # the base saw the clean input; every tap of the conv read the one dropped-out tensor
    want = base(x).double() + ground_truth(dropped, lay, layer.text_A, layer.text_B, layer.image_A, layer.image_B, 1.0)
    assert_close_rel(y, want, 1e-5)
    layer.eval()
    assert_close_rel(layer(x, lay), base(x).double() + ground_truth(
        x, lay, layer.text_A, layer.text_B, layer.image_A, layer.image_B, 1.0), 1e-5)


def test_adapter_variants_are_the_table_2_baselines():
    torch.manual_seed(3)
    base = torch.nn.Linear(10, 7)
    x = torch.randn(2, 16, 10)
    lay = _layout()
    lora = mk.MossLinear(base, rank=4, alpha=4, dropout=0.0, adapter="lora")
    assert lora.image_A is None
    with torch.no_grad():
        lora.text_B.normal_()
    every_token_text = mk.ImageLayout.text_only(2, 16)
    want = base(x).double() + ground_truth(x, every_token_text, lora.text_A, lora.text_B, None, None, 1.0)
    assert_close_rel(lora(x, lay), want, 1e-5)
    moe = mk.MossLinear(base, rank=4, alpha=4, dropout=0.0, adapter="moe_lora", kernel_size=2)
    assert moe.image_A.shape == (4, 10, 1, 1) and moe.kernel_size == 1
    with torch.no_grad():
        moe.image_B.normal_()
        moe.text_B.normal_()
    want = base(x).double() + ground_truth(x, lay, moe.text_A, moe.text_B, moe.image_A, moe.image_B, 1.0)
    assert_close_rel(moe(x, lay), want, 1e-5)


def test_bf16_base_with_float32_adapters_trains():
    torch.manual_seed(4)
    base = torch.nn.Linear(10, 7).to(torch.bfloat16)
    layer = mk.MossLinear(base, rank=4, alpha=4, dropout=0.0)
    x = torch.randn(2, 16, 10, dtype=torch.bfloat16)
    y = layer(x, _layout())
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.text_B.grad.dtype == torch.float32 and layer.image_B.grad.abs().sum() > 0


def test_new_state_and_routing_hook():
    layer = mk.MossLinear(torch.nn.Linear(10, 7), rank=4, alpha=4, dropout=0.0)
    st = layer.new_state(2, max_width=5)
    assert st.capacity == 6 and st.rank == 4
    assert mk.MossLinear(torch.nn.Linear(10, 7), rank=4, adapter="lora").new_state(2) is None

    class Routing:
        def lookup(self, lay):
            return _layout(), None

    layer.routing = Routing()
    with torch.no_grad():
        layer.image_B.normal_()
    x = torch.randn(2, 16, 10)
    assert torch.equal(layer(x), layer(x, _layout()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(kernel_size=0), "kernel_size must be a positive int"),
        (dict(dropout=1.0), "dropout must lie in"),
        (dict(adapter="dora"), "adapter must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mk.MossLinear(torch.nn.Linear(4, 4), **kwargs)
    with pytest.raises(TypeError, match=r"base must be an nn\.Linear"):
        mk.MossLinear(torch.nn.Conv1d(4, 4, 1))
