"""Sizes read in forward (x.shape[1], x.size(-1) // 2) follow the pruned tensor where they
are sizes, and keep their original value where they are numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunefx
from zoo import check_exact, randomize_norms


class ManualChannelMean(nn.Module):
    """sum over channels / channel count, and a scale derived from the width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))
        c = y.shape[1]
        pooled = y.sum(dim=1, keepdim=True) / c  # a number: must stay 8
        y = y * (c // 2) ** -0.5  # a number: must stay 8 // 2
        y = y.view(y.size(0), c, -1).view(y.size(0), c, 4, 4)  # sizes: must follow the pruned width
        return self.b(y) + pooled


def test_size_reads_are_sizes_or_numbers() -> None:
    torch.manual_seed(0)
    model = randomize_norms(ManualChannelMean()).eval()
    x = torch.randn(2, 3, 4, 4)
    graph = prunefx.trace(model, x)
    group = graph.group_of("a")
    assert group.prunable and group.exact
    mask = {"a": torch.tensor([True, False, True, True, False, False, True, True])}
    small, diff = check_exact(model, x, mask, graph)
    assert diff <= 1e-5
    assert small.a.out_channels == 5
    assert "8" in small.code  # the frozen numbers


class Outlook(nn.Module):
    """timm VOLO's outlook attention between two layers: its value channels are read as
    the input's width (``C * k * k``), and its spatial sizes as ``math.ceil(H / stride)``."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.volo import OutlookAttention

        self.inp = nn.Linear(8, 24)
        self.attn = OutlookAttention(24, 3, stride=2)
        self.out = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.inp(x)))


def test_a_stale_width_times_a_literal_is_not_rescaled_twice() -> None:
    """``C * 3 * 3`` with C the pruned input width, as a size of the unpruned value channels:
    the product is the original size (it was rescaled from C's new value while C itself was
    frozen to its old one, a reshape to twice the size that did not run); and the spatial
    sizes ``ceil(H / 2) * ceil(W / 2)`` stay computed at run time."""
    torch.manual_seed(0)
    model = Outlook().eval()
    x = torch.randn(2, 8, 8, 8)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=1)
    assert "inp" in mask
    small, diff = check_exact(model, x, mask, graph)
    assert diff <= 1e-5
    for other in (torch.randn(3, 12, 12, 8), torch.randn(1, 6, 10, 8)):  # other batch and spatial sizes
        _, diff = check_exact(model, other, mask, graph)
        assert diff <= 1e-5
    assert "216" in small.code  # the 24 value channels x 9, a literal


class ShapeTail(nn.Module):
    """timm MaxViT's ``x.reshape(x.shape[:-1] + (-1,))`` after a pruned layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 12)
        self.b = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).view(x.shape[0], x.shape[1], 3, -1)
        return self.b(y.reshape(y.shape[:-2] + (-1,)))


def test_a_whole_shape_ending_in_minus_one_stays_dynamic() -> None:
    torch.manual_seed(0)
    model = ShapeTail().eval()
    x = torch.randn(2, 5, 4)
    graph = prunefx.trace(model, x)
    mask = {"a": torch.arange(12) % 3 != 0}
    small, diff = check_exact(model, x, mask, graph)
    assert diff <= 1e-5
    _, diff = check_exact(model, torch.randn(3, 7, 4), mask, graph)  # the example's sizes are not frozen
    assert diff <= 1e-5


def test_a_rewrite_asking_a_reshape_for_the_wrong_size_is_refused(monkeypatch) -> None:
    """The safety net after the size passes (CheckSizes): a size argument that does not
    evaluate to the planned shape is a prunefx bug, refused by name instead of returned as a
    model that fails in that reshape (VOLO's, before the rescale fix above)."""
    from prunefx.passes import fix_shape_args

    real = fix_shape_args._sizes
    monkeypatch.setattr(fix_shape_args, "_sizes", lambda *a, **k: [s + 1 if isinstance(s, int) else s for s in real(*a, **k)])
    model = ManualChannelMean().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = prunefx.trace(model, x)
    mask = {"a": torch.tensor([True, False, True, True, False, False, True, True])}
    with pytest.raises(prunefx.ReconfigureError, match=r"rewrote the sizes of node 'view.*test_size_reads.py:\d+.*this is a prunefx bug"):
        prunefx.reconfigure(model, mask, graph=graph)
