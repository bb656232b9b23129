"""Saving and loading MoSS adapters: safetensors weights + JSON config."""

import json
import os

import pytest
import torch

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")

import moss_kernels as mk
from moss_kernels.model import adapted_layers
from moss_kernels.model.decoder import MossDecoder, interleaved_batch
from moss_kernels.model.io import CONFIG_NAME, WEIGHTS_NAME

from test_model import make_model, tiny_config


def fresh(seed=0, **cfg_kw):
    """The same base weights as make_model(seed) builds, without adapters."""
    torch.manual_seed(seed)
    return MossDecoder(tiny_config(**cfg_kw)).eval()


@pytest.mark.parametrize("adapter", ["moss", "lora"])
def test_save_load_roundtrip(tmp_path, adapter):
    model = make_model(adapter)
    ids = interleaved_batch(model.config, 2, 30, torch.Generator().manual_seed(0))
    expected = model(ids).logits
    mk.save_moss(model, tmp_path)
    assert {WEIGHTS_NAME, CONFIG_NAME} <= set(os.listdir(tmp_path))
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["config"]["adapter"] == adapter and meta["config"]["grid"] == list(model.config.grid)

    loaded = mk.load_moss(fresh(), tmp_path)  # injects with the saved config, then loads
    assert loaded.moss_config == model.moss_config
    assert torch.equal(loaded(ids).logits, expected)

    injected = mk.inject_moss(fresh(), model.moss_config)  # an injected model with untrained adapters
    mk.load_moss(injected, tmp_path)
    assert torch.equal(injected(ids).logits, expected)
    for _name, layer in adapted_layers(injected).items():
        assert layer.text_B.requires_grad  # still trainable after loading


def test_load_mismatches(tmp_path):
    model = make_model()
    mk.save_moss(model, tmp_path)
    with pytest.raises(ValueError, match="shape mismatch"):
        mk.load_moss(fresh(hidden_size=48, intermediate_size=64), tmp_path)
    with pytest.raises(ValueError, match="rank"):
        mk.load_moss(mk.inject_moss(fresh(), rank=4), tmp_path)
    with pytest.raises(ValueError, match="not in the model"):
        mk.load_moss(mk.inject_moss(fresh(), model.moss_config, target_modules=["q_proj"]), tmp_path)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        mk.load_moss(fresh(num_layers=3), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mk.load_moss(fresh(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no MoSS adapters"):
        mk.save_moss(fresh(), tmp_path / "x")
