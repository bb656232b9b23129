"""Two CPU processes over gloo: DDP and FSDP2 (``fully_shard``) on an injected decoder give the losses
and adapter gradients of the single-process run on the whole batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moss_kernels as mk
from moss_kernels.model.decoder import DecoderConfig, MossDecoder, interleaved_batch

WORLD = 2

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this build", allow_module_level=True)


def build():
    torch.manual_seed(0)
    cfg = DecoderConfig(text_vocab_size=48, image_vocab_size=24, grid=(3, 4), hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4)
    model = MossDecoder(cfg)
    mk.inject_moss(model, mk.MossConfig(rank=8, alpha=16, dropout=0.0, boi_token_id=cfg.boi_token_id, grid=cfg.grid))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids = interleaved_batch(cfg, 2 * WORLD, 36, torch.Generator().manual_seed(2))
    return model, ids


def loss_fn(model, ids):
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def adapter_grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2: DTensor shards
            out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1)] = g.detach().clone()
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # two processes on a small CI machine: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        results = {}
        model, ids = build()
        shard = ids.chunk(WORLD)[rank]  # equal halves: the mean of the per-rank means is the full mean
        ddp = DDP(model)
        loss = loss_fn(ddp, shard)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        results["ddp"] = (total / WORLD, adapter_grads(model))

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # pragma: no cover - old torch
            results["fsdp2"] = f"fully_shard unavailable: {e}"
        else:
            model, ids = build()
            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
            loss = loss_fn(model, ids.chunk(WORLD)[rank])
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            # FSDP2 reduce-scatters the average gradient, like DDP.
            results["fsdp2"] = (total / WORLD, adapter_grads(model))
            mk.save_moss(model, os.path.join(out_dir, "fsdp2_adapter"))  # every rank: gathers the shards
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        # Both ranks done with every collective before either tears gloo down: a rank destroying
        # its group while the other still talks to it aborted once in CI ("terminate called
        # without an active exception"). Not in `finally`: after an error it would wait forever.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    mk.available_backends("cpu")  # build/load the native extension here once, not in both children at once
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    results = torch.load(d / "results.pt", weights_only=False)
    results["adapter_dir"] = d / "fsdp2_adapter"
    return results


@pytest.fixture(scope="module")
def single_process():
    model, ids = build()
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.detach(), adapter_grads(model)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_matches_single_process(mode, distributed_results, single_process):
    result = distributed_results[mode]
    if isinstance(result, str):
        pytest.skip(result)
    loss, grads = result
    ref_loss, ref_grads = single_process
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 56
    for name, g in grads.items():
        err = ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item()
        assert err <= 1e-5, f"{mode} {name}: relative error {err:.2e}"


def test_save_from_fsdp2_gathers_full_adapters(distributed_results):
    if isinstance(distributed_results["fsdp2"], str):
        pytest.skip(distributed_results["fsdp2"])
    model, ids = build()
    reference = model(ids).logits
    fresh, _ = build()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()  # so that loading must restore them
    mk.load_moss(fresh, distributed_results["adapter_dir"])
    assert torch.equal(fresh(ids).logits, reference)
