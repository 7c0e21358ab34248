"""reconfigure(..., optimizer=opt): param_groups re-pointed, per-parameter state sliced
exactly like its parameter, scalar state kept, training goes on."""

from __future__ import annotations

import pytest
import torch
import torchvision

import prunefx
from zoo import randomize_norms


def _train_steps(model, opt, x, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
], ids=["sgd", "adam", "adamw"])
def test_optimizer_state_follows_the_slices(make_opt) -> None:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).train()
    x = torch.randn(4, 3, 32, 32)
    opt = make_opt(model.parameters())
    _train_steps(model, opt, x)
    # state as a known (positive, Adam takes its sqrt) function of the parameter: 3|p| + 1
    with torch.no_grad():
        for p, st in opt.state.items():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    v.copy_(3 * p.abs() + 1)
    steps_before = {k: v for st in opt.state.values() for k, v in st.items() if k == "step"}
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, seed=0)
    old_ids = {id(p) for p in model.parameters()}
    small = prunefx.reconfigure(model, mask, graph=graph, optimizer=opt)

    new_params = list(small.parameters())
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_groups} == {id(p) for p in new_params}
    assert not old_ids & {id(p) for p in in_groups}
    assert not old_ids & {id(p) for p in opt.state}
    for p in new_params:
        st = opt.state[p]
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                torch.testing.assert_close(v, 3 * p.detach().abs() + 1)
    if steps_before:
        assert all(st["step"] == next(iter(steps_before.values())) for st in opt.state.values())
    _train_steps(small, opt, x)
    assert torch.isfinite(small(x)).all()
