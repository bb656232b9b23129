"""The demo's pipeline on a tiny setting: data, training, generation, comparison table, files written."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the demo's data come from scikit-learn (pip install scikit-learn)")
pytest.importorskip("matplotlib", reason="the demo writes PNGs with matplotlib (pip install matplotlib)")
pytest.importorskip("tqdm", reason="the demo's progress bars need tqdm (pip install tqdm)")

from moss_kernels.demo.__main__ import main, parser, settings_from
from moss_kernels.demo.compare import run_compare
from moss_kernels.demo.data import GRID, DigitsData, Vocab
from moss_kernels.demo.train import DemoSettings, build_decoder, evaluate, pretrain_base, tune_adapter
from moss_kernels.model.decoder import generation_mask

TINY = dict(limit=120, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, pretrain_steps=6,
            tune_steps=4, batch_size=8, rank=2, alpha=4.0, progress=False)
TINY_ARGS = ["--limit", "120", "--hidden-size", "16", "--intermediate-size", "32", "--layers", "1", "--heads", "2",
             "--pretrain-steps", "6", "--tune-steps", "4", "--batch-size", "8", "--rank", "2", "--alpha", "4",
             "--no-progress", "--threads", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The demo's tiny models run fastest on one thread (as the CLI's default); restore the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_vocab_quantises_and_matches_the_decoder():
    v = Vocab(levels=4)
    levels = v.quantise(np.array([[0, 4, 5, 8, 9, 12, 13, 16]]))
    assert levels.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]  # equal-width bins of 0..16
    with pytest.raises(ValueError, match="levels"):
        Vocab(levels=1)
    with pytest.raises(KeyError, match="nonsense"):
        v.text("a nonsense digit")
    cfg = build_decoder(DemoSettings(**TINY), v).config
    assert (cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_start, cfg.vocab_size) == \
        (v.boi_id, v.eoi_id, v.image_start, v.size)


def test_task_sequences():
    data = DigitsData(limit=100, given_rows=2, transform="mirror")
    v = data.vocab
    assert len(set(data.train_index) & set(data.test_index)) == 0
    assert len(data.train_index) + len(data.test_index) == 100
    pre, task = data.pretrain("train"), data.complete("test")
    n_img = GRID[0] * GRID[1]
    for batch in (pre, task):
        assert ((batch.ids >= v.image_start).sum(1) == n_img).all()
        assert ((batch.ids == v.boi_id).sum(1) == 1).all() and ((batch.ids == v.eoi_id).sum(1) == 1).all()
        assert (batch.ids[:, 0] == v.bos_id).all() and (batch.ids[:, -1] == v.eos_id).all()
        assert not batch.loss_mask[:, 0].any()
    # The instruction task scores exactly the image rows after the given ones, and its images are mirrored.
    assert (task.image_target.sum(1) == (GRID[0] - 2) * GRID[1]).all()
    assert not task.loss_mask[:, :task.prompt_len].any() and task.loss_mask[:, task.prompt_len:].all()
    boi = int((task.ids[0] == v.boi_id).nonzero()[0])
    assert task.prompt_len == boi + 1 + 2 * GRID[1]
    from sklearn.datasets import load_digits

    raw = load_digits().images[data.test_index[0]]
    stored = task.ids[0, boi + 1: boi + 1 + n_img].reshape(GRID) - v.image_start
    assert stored.tolist() == v.quantise(raw[:, ::-1]).tolist()
    assert v.decode(task.ids[0]).startswith("complete the mirrored digit [image 8x8] it is a ")
    # Every training sequence is one the generation loop could produce (the modes agree).
    cfg = build_decoder(DemoSettings(**TINY), v).config
    since = torch.full((len(task),), -1)
    for t in range(1, task.seq_len):
        allowed = generation_mask(cfg, since)
        assert allowed.gather(1, task.ids[:, t:t + 1]).all(), f"position {t}"
        tok = task.ids[:, t]
        since = torch.where(since >= 0, since + 1, torch.where(tok == v.boi_id, 0, -1))
        since = torch.where(since > n_img, torch.full_like(since, -1), since)


def test_training_is_seeded_and_adapters_start_as_the_base():
    s = DemoSettings(**TINY)
    data = s.data()
    base, losses = pretrain_base(s, data)
    _, losses2 = pretrain_base(s, data)
    assert losses == losses2 and all(math.isfinite(x) for x in losses)
    assert not any(p.requires_grad for p in base.parameters())
    state = base.state_dict()
    held_out = data.complete("test")
    base_metrics = evaluate(base, held_out, data.vocab)
    for adapter in ("lora", "moe_lora", "moss"):
        model, tune_losses = tune_adapter(s, data, state, adapter, seed=3)
        _, again = tune_adapter(s, data, state, adapter, seed=3)
        assert tune_losses == again
        # The base weights did not move; the adapter did (its B started at zero).
        for k, t in model.state_dict().items():
            if ".base." in k or k in state:
                assert torch.equal(t, state[k.replace(".base.", ".")]), k
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("_B"))
        m = evaluate(model, held_out, data.vocab)
        assert all(math.isfinite(m[k]) for k in ("loss", "image_loss", "image_acc", "answer_acc"))
        assert 0.0 <= m["image_acc"] <= 1.0 and m["image_loss"] != base_metrics["image_loss"]


def test_demo_cli_writes_files(tmp_path):
    out = tmp_path / "demo"
    assert main([*TINY_ARGS, "--out", str(out), "--show", "3", "--speed-repeats", "1"]) == 0
    for name in ("loss_curve.png", "digits.png"):
        assert _png(out / name), name
    metrics = json.loads((out / "demo_metrics.json").read_text())
    for key in ("base_heldout_task", "moss_heldout_task"):
        assert all(math.isfinite(v) for v in metrics[key].values()), metrics[key]
    assert metrics["decode_max_logit_diff"] < 1e-4  # incremental decoding == one full forward
    assert metrics["speed"]["fused_ms"] > 0 and metrics["speed"]["eager_ms"] > 0
    assert metrics["settings"]["rank"] == 2


def test_compare_table(tmp_path):
    s = DemoSettings(**TINY)
    result = run_compare(s, seeds=[0, 1], out_dir=str(tmp_path), param_matched=True, log=lambda *_: None)
    table = (tmp_path / "compare.md").read_text()
    assert table == result["table"]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 7  # header, base, LoRA, MoE-LoRA, MoSS, and the two parameter-matched controls
    assert all(row.count("±") == 3 for row in rows[2:])
    assert _png(tmp_path / "compare_losses.png")
    res = json.loads((tmp_path / "compare.json").read_text())["results"]
    assert list(res)[:3] == ["lora", "moe_lora", "moss"]
    # Same rank: MoE-LoRA adds a second (d_in x r + d_out x r) pair per layer; MoSS's image A has k*k taps.
    assert res["lora"]["params"] < res["moe_lora"]["params"] < res["moss"]["params"]
    target = res["moss"]["params"]
    for adapter in ("lora", "moe_lora"):
        (key,) = [k for k in res if k.startswith(adapter + "@")]
        assert res[key]["rank"] > s.rank
        assert abs(res[key]["params"] - target) < abs(res[adapter]["params"] - target)
    for row in res.values():
        assert len(row["runs"]) == 2
        for run in row["runs"]:
            assert all(math.isfinite(v) for v in run.values())


def test_cli_help_and_validation(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--help"])
    assert e.value.code == 0
    assert "--compare" in capsys.readouterr().out
    s = settings_from(parser().parse_args(["--rank", "4", "--seed", "7", "--transform", "none"]))
    assert (s.rank, s.seed, s.transform) == (4, 7, "none")
    with pytest.raises(ValueError, match="given_rows"):
        DigitsData(given_rows=8)
    with pytest.raises(ValueError, match="adapters"):
        run_compare(DemoSettings(**TINY), seeds=[0], out_dir=os.devnull, adapters=("dora",))
