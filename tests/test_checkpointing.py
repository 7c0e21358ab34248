"""Activation checkpointing (``torch.utils.checkpoint``) survives pruning.

Both front-ends trace through a checkpoint: a GraphModule computes the same values but keeps
every activation for backward, so a model trained with checkpointing would silently need far
more memory once pruned. The capture records where the forward checkpoints
(``graph.traced.checkpoints``) and ``reconfigure(emit="auto")`` returns the model's own class,
whose forward still checkpoints; a GraphModule asked for explicitly, or forced by a class that
cannot hold the pruned sizes, comes with a warning. Checked on the values and gradients
against the masked model, and on the checkpoints the result runs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.utils.checkpoint as cp
from torch import nn

import prunefx
from prunefx.guards import activation_checkpoints_seen
from zoo import max_rel_diff, randomize_norms


class Reentrant(nn.Module):
    """The old default (``use_reentrant=True``), through ``CheckpointFunction``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def block(self, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = cp.checkpoint(self.block, y, use_reentrant=True)
        return self.c(y)


class NonReentrant(Reentrant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cp.checkpoint(self.block, self.a(x), use_reentrant=False)
        return self.c(y)


class Sequential(nn.Module):
    """``checkpoint_sequential`` over a Sequential; keyword inputs send it to torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(cp.checkpoint_sequential(self.body, 2, x, use_reentrant=False)) * scale


class Literal(NonReentrant):
    """Its forward computes a size from a literal, which its own class cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cp.checkpoint(self.block, self.a(x), use_reentrant=False)
        return self.fc(self.c(y).view(x.shape[0], 4 * 8 * 8))


def _timm_resnet() -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    model.set_grad_checkpointing(True)
    return model


CASES = {
    "reentrant": (Reentrant, {}, "tests/test_checkpointing.py"),
    "non-reentrant": (NonReentrant, {}, "tests/test_checkpointing.py"),
    "checkpoint_sequential (export)": (Sequential, {"scale": 2.0}, "tests/test_checkpointing.py"),
    "timm set_grad_checkpointing": (_timm_resnet, {}, "timm/models/_manipulate.py"),
}


def _model(make) -> nn.Module:
    """In training mode, where checkpoints matter (BatchNorm then normalises with the batch's
    statistics: a batch of 8 keeps them well conditioned at ResNet's 1x1 last stage)."""
    torch.manual_seed(0)
    return randomize_norms(make()).train()


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpointed_model_is_reconfigured_into_its_own_class(case: str) -> None:
    make, kwargs, where = CASES[case]
    model = _model(make)
    x = torch.randn(8, 3, 16, 16)
    graph = prunefx.trace(model, x, example_kwargs=kwargs)
    assert graph.frontend == ("export" if kwargs else "fx")
    assert graph.traced.checkpoints and all(c.startswith(where) for c in graph.traced.checkpoints), graph.traced.checkpoints
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    assert any(not m.all() for m in mask.values())
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert type(small) is type(model) and sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())

    reference = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with activation_checkpoints_seen() as run:
        out = small(xs, **kwargs)
        out.square().sum().backward()
    assert run == list(graph.traced.checkpoints), "the result checkpoints where the model does"
    expected = reference(xr, **kwargs)
    expected.square().sum().backward()
    assert max_rel_diff(out, expected) <= 1e-4
    assert max_rel_diff(xs.grad, xr.grad) <= 1e-4
    other = torch.randn(8, 3, 24, 24)  # a second input shape
    assert max_rel_diff(small(other, **kwargs), reference(other, **kwargs)) <= 1e-4


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")
def test_a_graph_result_says_that_checkpointing_is_lost() -> None:
    model = _model(NonReentrant)
    x = torch.randn(2, 3, 8, 8)
    mask = {"b": torch.arange(8) < 4}
    with pytest.warns(UserWarning, match=r"NonReentrant checkpoints activations \(torch.utils.checkpoint at tests/test_checkpointing.py:\d+ "
                                         r".*keeps every activation for backward; emit='module' \(or 'auto'\) keeps them"):
        small = prunefx.reconfigure(model, mask, example_inputs=x, emit="graph")
    with activation_checkpoints_seen() as run:
        small(x)
    assert isinstance(small, torch.fx.GraphModule) and run == []


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")
def test_a_class_that_cannot_hold_the_sizes_gets_a_graph_with_a_warning() -> None:
    """``emit="auto"`` chose the module for the checkpoints; a forward that computes a size from
    a literal cannot follow the pruned sizes, so the GraphModule (exact, without checkpoints)
    is returned, saying why."""
    model = _model(Literal)
    x = torch.randn(2, 3, 8, 8)
    mask = {"b": torch.arange(8) < 4, "c": torch.arange(4) < 2}
    with pytest.warns(UserWarning, match=r"a GraphModule is returned all the same, since Literal's own forward cannot run the "
                                         r"pruned sizes \(.*shape '\[2, 256\]' is invalid"):
        small = prunefx.reconfigure(model, mask, example_inputs=x)
    assert isinstance(small, torch.fx.GraphModule)
    reference = prunefx.apply_mask(copy.deepcopy(model), mask, example_inputs=x)
    torch.testing.assert_close(small(x), reference(x), rtol=1e-4, atol=1e-5)


def test_prunetrain_shrink_keeps_checkpointing() -> None:
    """``prunefx.train.shrink`` (each PruneTrain reconfiguration) returns the timm class again,
    still checkpointing, with SGD's momentum re-pointed."""
    model = _model(_timm_resnet)
    x = torch.randn(8, 3, 16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():  # the lasso's work: half the channels of two groups reach zero
        for block in (model.layer1[0], model.layer2[1]):
            for t in (block.conv1.weight, block.bn1.weight, block.bn1.bias):
                t[::2] = 0
    small, report = prunefx.train.shrink(model, example_inputs=x, optimizer=optimizer)
    assert report.changed and type(small) is type(model) and small.grad_checkpointing
    assert small.layer1[0].conv1.out_channels == 32 and small.layer2[1].conv1.out_channels == 64
    with activation_checkpoints_seen() as run:
        small(x).sum().backward()
    assert run and run[0].startswith("timm/models/_manipulate.py")
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in small.parameters()}
    optimizer.step()
