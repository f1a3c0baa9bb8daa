"""Synchronised BatchNorm across gloo ranks equals BatchNorm over the global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from leukoscope.distributed import SyncBatchNorm2d, World, convert_sync_batchnorm, wrap
from leukoscope.models import create_model

SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch import nn
    from leukoscope.distributed import SyncBatchNorm2d

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * 3 + 1          # the global batch, the same on every rank
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    synced = SyncBatchNorm2d(4).train()
    with torch.no_grad():
        synced.weight.copy_(weight); synced.bias.copy_(bias)
    mine = x[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
    out = synced(mine)
    (out * torch.arange(out.numel()).view_as(out).float().add(rank * out.numel())).sum().backward()
    pieces = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(pieces, mine.grad)
    outs = [torch.zeros_like(out) for _ in range(size)]
    dist.all_gather(outs, out.detach().contiguous())
    weight_grad = synced.weight.grad.clone(); dist.all_reduce(weight_grad)

    plain = nn.BatchNorm2d(4).train()
    with torch.no_grad():
        plain.weight.copy_(weight); plain.bias.copy_(bias)
    full = x.clone().requires_grad_()
    ref = plain(full)
    (ref * torch.arange(ref.numel()).view_as(ref).float()).sum().backward()
    checks = {
        "output": torch.allclose(torch.cat(outs), ref.detach(), atol=1e-4),
        "input grad": torch.allclose(torch.cat(pieces), full.grad, atol=1e-3),
        "weight grad": torch.allclose(weight_grad, plain.weight.grad, atol=1e-2, rtol=1e-4),
        "running mean": torch.allclose(synced.running_mean, plain.running_mean, atol=1e-5),
        "running var": torch.allclose(synced.running_var, plain.running_var, atol=1e-4),
    }
    print(f"rank {rank}: " + " ".join(f"{k}={'ok' if v else 'DIFFERS'}" for k, v in checks.items()), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_sync_batchnorm_on_two_gloo_ranks_equals_global_batchnorm(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python interpreter")
    script = tmp_path / "sync_bn.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # two processes share stdout, so their lines may interleave: count the verdicts
    assert result.stdout.count("rank ") == 2 and result.stdout.count("=ok") == 10, result.stdout


def test_conversion_keeps_parameters_and_the_checkpoint_format():
    model = create_model("cellnet_tiny", 2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = convert_sync_batchnorm(model)
    assert any(isinstance(m, SyncBatchNorm2d) for m in synced.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    after = synced.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(3, 3, 32, 32)
    synced.train()  # no process group: a plain BatchNorm
    fresh = create_model("cellnet_tiny", 2)
    fresh.load_state_dict(before)
    fresh.train()
    assert torch.allclose(synced(x), fresh(x), atol=1e-5)


def test_single_process_is_left_alone():
    model = create_model("cellnet_tiny", 2)
    assert wrap(model, World(), torch.device("cpu"), sync_bn=True) is model


def test_sharded_prediction_on_two_gloo_ranks_matches_one_process(tiny_run, tmp_path):
    import csv

    from leukoscope.cli import main

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found beside the Python interpreter")
    data, run = tiny_run
    (data / "broken.png").write_bytes(b"not an image")  # a failed row keeps its place too
    single = tmp_path / "single.csv"
    assert main(["predict", str(run), str(data), "--out", str(single), "--backend", "torch"]) == 1
    sharded = tmp_path / "sharded.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "leukoscope", "predict", str(run), str(data),
                             "--out", str(sharded), "--backend", "torch"], env=env, capture_output=True, text=True, timeout=300)
    (data / "broken.png").unlink()
    assert result.returncode != 0 or "1 failed" in result.stdout + result.stderr
    assert "rank 0/2: predicted 13 of 25 images" in result.stdout and "rank 1/2: predicted 12 of 25 images" in result.stdout
    rows = lambda path: list(csv.reader(open(path, newline="")))  # noqa: E731
    assert rows(sharded) == rows(single)
    assert not list(tmp_path.glob("sharded.csv.rank-*"))  # parts merged and removed
