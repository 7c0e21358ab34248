"""prunefx.distributed: reconfigure_ddp under a real process group and the DDP example run
with two processes (torchrun, gloo, CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import prunefx
from prunefx.distributed import DistributedError, grad_bytes_per_step, reconfigure_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grad_bytes_per_step_by_hand() -> None:
    shared = nn.Linear(4, 2).double()  # (4*2 + 2) * 8 bytes, counted once
    frozen = nn.Linear(5, 5)  # requires_grad=False: never all-reduced
    frozen.requires_grad_(False)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # (4*3*3*3 + 4) * 4 = 448 bytes
        shared,
        shared,
        nn.Linear(3, 3).half(),  # (3*3 + 3) * 2 = 24 bytes
        frozen,
    )
    assert grad_bytes_per_step(model) == 448 + 80 + 24


def test_reconfigure_ddp_needs_an_initialised_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(DistributedError, match="init_process_group") as info:
        reconfigure_ddp(nn.Linear(2, 2), {})
    assert isinstance(info.value, prunefx.PruneFxError)


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_reconfigure_ddp_keeps_wrapper_settings_and_optimizer(single_rank_group) -> None:
    x = torch.randn(2, 3, 8, 8)
    ddp = DistributedDataParallel(_net(), find_unused_parameters=True, bucket_cap_mb=1, gradient_as_bucket_view=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    _step(ddp, opt, x)
    mask = {"0": torch.tensor([True, False] * 4)}  # the first conv keeps 4 of 8 channels

    new = reconfigure_ddp(ddp, mask, example_inputs=x, optimizer=opt, find_unused_parameters=False)

    assert isinstance(new, DistributedDataParallel) and new is not ddp
    assert new.module.get_submodule("0").out_channels == 4
    assert ddp.module.get_submodule("0").out_channels == 8  # the old model is untouched
    assert new.gradient_as_bucket_view and new.bucket_bytes_cap == 1024 * 1024  # inherited
    assert new.find_unused_parameters is False  # explicit keyword wins
    new_params = list(new.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in new_params}
    assert opt.state[new_params[0]]["momentum_buffer"].shape == new_params[0].shape
    assert grad_bytes_per_step(new) < grad_bytes_per_step(ddp)
    _step(new, opt, x)  # training goes on with the same optimizer


def test_prunetrain_on_ddp_shrinks_and_rewraps(single_rank_group) -> None:
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    net = nn.Sequential(  # a 1x1 reader, so that folding is exact
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    with torch.no_grad():  # channels 1 and 5 of the first conv are dead; BN's shift keeps a constant alive
        net[0].weight[[1, 5]] = 0
        net[0].bias[[1, 5]] = 0
        net[1].weight[[1, 5]] = 0
        net[1].bias.uniform_(0.5, 1.0)
    ddp = DistributedDataParallel(net, bucket_cap_mb=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref = net.eval()(x)
    net.train()
    pt = prunefx.train.PruneTrain(ddp, opt, example_inputs=x, every=1)

    new = pt.epoch_end(0)

    assert isinstance(new, DistributedDataParallel) and new is not ddp and pt.model is new
    assert new.module.get_submodule("0").out_channels == 6 and new.bucket_bytes_cap == 1024 * 1024
    assert pt.history[-1].report.changed and pt.lasso.num_channels < 8 + 6
    with torch.no_grad():
        assert torch.allclose(new.module.eval()(x), ref, atol=1e-5)  # the dead channels' constants were folded
    new.train()
    opt.zero_grad()
    pt.regularize(new(x).square().mean()).backward()
    opt.step()


def test_reconfigure_ddp_bad_mask_changes_nothing(single_rank_group) -> None:
    x = torch.randn(2, 3, 8, 8)
    ddp = DistributedDataParallel(_net())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    _step(ddp, opt, x)
    params_before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(prunefx.MaskError, match="'0'"):
        reconfigure_ddp(ddp, {"0": torch.ones(5, dtype=torch.bool)}, example_inputs=x, optimizer=opt)
    assert [list(g["params"]) for g in opt.param_groups] == params_before
    with pytest.raises(DistributedError, match="mask=None"):
        reconfigure_ddp(ddp, None, example_inputs=x, optimizer=opt)


def test_ddp_training_example_two_processes() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "examples/ddp_training.py", "--smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"exit code {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{proc.stderr[-5000:]}"
    for i in (1, 2):
        line = re.search(rf"reconfiguration {i} at step \d+: .*?([\d,]+) -> ([\d,]+) \(.*identical on all 2 ranks", out)
        assert line, f"reconfiguration {i} not reported:\n{out}"
        before, after = (int(n.replace(",", "")) for n in line.groups())
        assert 0 < after < before
    per_step = re.search(r"per step: .*: (\d+\.\d)% less", out)
    whole_run = re.search(r"whole run: .*: (\d+\.\d)% less", out)
    assert per_step and whole_run and "PruneTrain reported 55%" in out, out
    assert 0 < float(whole_run.group(1)) < float(per_step.group(1)) < 100
