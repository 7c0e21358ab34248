"""Sizes read in forward (x.shape[1], x.size(-1) // 2) follow the pruned tensor where they
are sizes, and keep their original value where they are numbers."""

from __future__ import annotations

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
