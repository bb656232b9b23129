"""The benchmark suite (``moss_kernels.bench``): that it runs, writes its report, and compares what it
claims to compare. Speeds are never asserted here (they live in ``benchmarks/``)."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import moss_kernels as mk
from moss_kernels.bench import cases as bc
from moss_kernels.bench.__main__ import main
from moss_kernels.bench.cost import cost
from moss_kernels.bench.timing import measure_memory
from moss_kernels.reference import literal_moss_lora

TINY = bc.Model("tiny", 24, 40, (3, 4), "test")


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["--quick", "--device", "cpu", "--models", "janus-1.3b/8", "--ranks", "64", "--mixes", "mix75",
               "--ops", "forward", "fwd_bwd", "prefill", "decode", "layer_fwd_bwd", "--no-compile",
               "--budget", "0.002", "--threads", "1", "--quiet", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## fwd_bwd" in printed and "## Summary" in printed
    report = json.loads((out / "results.json").read_text())
    for key in ("device", "device_name", "commit", "date", "torch", "triton", "threads", "backends", "timer",
                "wall_s", "loadavg_start"):
        assert key in report["meta"], key
    assert report["meta"]["threads"] == 1
    assert "1 threads" in report["meta"]["timer"]
    ceil = report["ceilings"]["float32"]
    assert ceil["bandwidth"] > 0 and ceil["flops"] > 0
    results = report["results"]
    assert {r["op"] for r in results} == {"forward", "fwd_bwd", "prefill", "decode", "layer_fwd_bwd"}
    impls = {r["impl"] for r in results}
    assert {"eager_literal", "reference", "lora", "moe_lora", "base"} <= impls
    assert "triton" not in impls  # Triton's CPU interpreter is never timed
    for r in results:
        assert r["status"] == "ok", (r["op"], r["impl"], r.get("error"))
        for key in ("median_s", "p20_s", "p80_s", "runs", "flops", "bytes", "floor_s", "x_floor", "shape_id"):
            assert r[key] is not None, (key, r)
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert math.isclose(r["x_floor"], r["median_s"] / r["floor_s"])
        if r["adapter"] == "moss" and r["impl"] != "reference":
            assert r["rel_err_vs_reference"] < 1e-4, r  # float32: the same function
        if r["op"].endswith("fwd_bwd"):
            assert r["saved_bytes"] >= r["saved_new_bytes"] >= 0 and r["peak_bytes"] > 0
            assert r["peak_kind"].startswith("estimate")
        if r["op"].startswith("layer"):
            assert r["time_over_base"] > 0
    assert set(report["summary"]) == {"forward", "fwd_bwd", "prefill", "decode", "layer_fwd_bwd"}
    md = (out / "results.md").read_text()
    assert "ceilings (float32)" in md and "## Memory of forward+backward" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["layer_time_over_base.png", "memory_saved.png", "speedup_vs_eager.png", "time_vs_floor.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --from-json rewrites the table and plots of a run without measuring anything
    again = tmp_path / "again"
    assert main(["--from-json", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "results.md").read_text() == md
    assert sorted(p.name for p in again.glob("*.png")) == pngs


def test_mix_layout_fractions_and_cut_images():
    H, W = 4, 4
    text = bc.mix_layout(2, 50, (H, W), 0.0)
    assert text.num_image_tokens == 0
    image = bc.mix_layout(2, 50, (H, W), 1.0)
    assert image.num_text_tokens == 0 and image.spans[-1].length == 50 - 3 * H * W  # the last image is cut
    mixed = bc.mix_layout(3, 50, (H, W), 0.75)
    assert mixed.num_image_tokens == 3 * round(0.75 * 50)
    assert mixed.spans[0].start > 0  # text comes first (a prompt)


def test_literal_decode_matches_ground_truth_and_step():
    """The decode baseline walks an image token by token; its outputs equal the float64 ground truth
    of the whole sequence, and ``moss_lora_step`` (reference) on the same steps."""
    torch.manual_seed(0)
    H, W, r, d_in, d_out = 3, 4, 5, 7, 6
    B, S = 2, H * W + 2  # row 0: an image and two text tokens; row 1: text only
    x = torch.randn(B, S, d_in, dtype=torch.float64)
    ta, tb = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    K, ib = torch.randn(r, d_in, 2, 2, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    layout = mk.ImageLayout.from_spans(B, S, [(0, 0, H, W)])
    truth = literal_moss_lora(x, layout, ta, tb, K, ib, 0.5)
    cache = torch.zeros(B, W + 2, d_in, dtype=torch.float64)
    state = mk.ConvLoRAState(B, r, 2, dtype=torch.float64, max_width=W)
    width, height = torch.full((B,), W), torch.full((B,), H)
    for t in range(S):
        pos = torch.tensor([t if t < H * W else -1, -1])
        lit = bc.literal_decode_step(x[:, t], cache, pos, width, ta, tb, K, ib, 0.5)
        step = mk.moss_lora_step(x[:, t], ta, tb, K, ib, 0.5, state, pos, height, width, backend="reference")
        torch.testing.assert_close(lit, truth[:, t], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(step, truth[:, t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["forward", "fwd_bwd", "prefill", "decode", "layer_fwd", "layer_fwd_bwd"])
def test_every_moss_impl_computes_the_same_function(op):
    """Each benchmarked MoSS implementation's first call equals the reference backend's: the suite
    compares one function computed several ways (including torch.compile for forward/fwd_bwd)."""
    case = bc.Case(op, TINY, 4, "mix75", 2, 30 if op != "decode" else 1, chunk=7, compile=True)
    dev = torch.device("cpu")
    impls = [i for i in bc.impls_for(case, dev) if i not in ("lora", "moe_lora", "base")]
    assert "eager_literal" in impls or op == "prefill"
    ref = bc.prepare(case, "reference", dev).fn()
    for impl in impls:
        outs = bc.prepare(case, impl, dev).fn()
        assert len(outs) == len(ref)
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{op} {impl}")


def test_prepare_rejects_unknown_impl():
    case = bc.Case("decode", TINY, 4, "mix75", 2, 1)
    with pytest.raises(ValueError, match="does not run decode"):
        bc.prepare(case, "compile_literal", "cpu")
    with pytest.raises(ValueError, match="nope"):
        bc.prepare(case, "nope", "cpu")


def test_cost_model_counts():
    """Hand-counted FLOPs and bytes of a small forward: 10 text rows, 20 image rows (2x2 kernel)."""
    model = bc.Model("m", 8, 16, (4, 5), "test")
    case = bc.Case("forward", model, 2, "image", 1, 30)
    layout = bc.mix_layout(1, 30, (4, 5), 1.0)
    assert layout.num_image_tokens == 30  # image-only: one whole image and a cut one
    c = cost(case, "reference")
    assert c.flops == 2 * 30 * 2 * (4 * 8 + 16)
    assert c.bytes == 30 * 8 * 4 + 30 * 16 * 4 + (4 * 2 * 8 + 16 * 2) * 4
    lora = cost(case, "lora")
    assert lora.flops == 2 * 30 * 2 * (8 + 16)
    both = cost(bc.Case("fwd_bwd", model, 2, "image", 1, 30), "reference")
    assert both.flops == 3 * c.flops
    base = cost(bc.Case("layer_fwd", model, 2, "image", 1, 30), "base")
    assert base.flops == 2 * 30 * 8 * 16 and base.bytes == (30 * 8 + 8 * 16 + 30 * 16) * 4


def test_measure_memory_counts_new_saved_tensors_only():
    x = torch.randn(1000, requires_grad=True)

    def call():
        y = x.exp()  # exp saves its output (new) ; mul by x saves x (an input) and y
        z = (y * x).sum()
        return (z, *torch.autograd.grad(z, [x]))

    m = measure_memory(call, {x.untyped_storage().data_ptr()}, "cpu")
    assert m.saved_new_bytes == 4000  # y only
    assert m.saved_bytes == 8000  # y and x
    assert m.output_bytes == 4 + 4000


def test_gpu_session_script_parses_and_names_its_stages():
    """benchmarks/gpu_session.sh runs only on a lent GPU; here: valid bash, and a wrong stage is
    refused with the usage line before anything is installed."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": "/tmp/moss_gpu_session_check"})
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "test|sanitize|bench" in proc.stderr


def test_defaults_are_the_readme_figures_and_a_fresh_folder(tmp_path, monkeypatch, capsys):
    # No --out, --threads or --clock: one thread, the process clock, and a new folder each run —
    # never the committed benchmarks/results/.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("moss_kernels.bench.__main__._utc_stamp", lambda: "20261201-000000")
    earlier = tmp_path / "bench_results" / "cpu-quick-20261201-000000"
    earlier.mkdir(parents=True)  # an earlier run's folder, in the same second
    args = ["--quick", "--device", "cpu", "--models", "janus-1.3b/8", "--ranks", "64", "--mixes", "mix75",
            "--ops", "forward", "--impls", "reference", "--no-compile", "--budget", "0.002", "--quiet"]
    before = torch.get_num_threads()
    assert main(args) == 0
    assert torch.get_num_threads() == before
    assert not any(earlier.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["bench_results"]
    meta = json.loads((earlier.parent / (earlier.name + "-2") / "results.json").read_text())["meta"]
    assert meta["threads"] == 1 and meta["timer"].startswith("process_time") and "1 threads" in meta["timer"]
    capsys.readouterr()


def test_fresh_dir_and_the_loaded_machine_warning(tmp_path, monkeypatch, capsys):
    from moss_kernels.bench.__main__ import fresh_dir, warn_if_loaded

    (tmp_path / "a").mkdir()
    (tmp_path / "a-2").mkdir()
    assert fresh_dir(str(tmp_path / "a")) == str(tmp_path / "a-3")
    assert fresh_dir(str(tmp_path / "b")) == str(tmp_path / "b")
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    warn_if_loaded("process", 1)
    assert capsys.readouterr().err == ""
    warn_if_loaded("wall", 1)
    assert "warning: the machine is loaded (load average 9.0 on 2 cores)" in capsys.readouterr().err
    warn_if_loaded("process", 2)
    assert "2 threads" in capsys.readouterr().err


def test_a_missing_extra_stops_the_bench_before_any_work(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"needs matplotlib, which is not installed: "
                                         r"pip install 'moss_kernels\[bench\]'"):
        main(["--quick", "--device", "cpu", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
