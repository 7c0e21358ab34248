"""Attention heads are the unit of pruning inside attention."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunefx
import prunefx.nn as pnn


class Attn(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y = self.embed(x)
        a, _ = self.att(y, y, y, need_weights=False)
        return self.head(a + y)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_head_mask_equals_zeroing_those_heads(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = Attn(batch_first).eval()
    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    graph = prunefx.trace(model, x)
    heads = graph.group("att")
    assert heads.size == 4 and heads.prunable and heads.exact
    keep = torch.tensor([True, False, True, False])
    small = prunefx.reconfigure(model, {"att": keep}, graph=graph)
    assert small.att.num_heads == 2
    # independent reference: zero the q/k/v rows of the dropped heads by hand
    ref = copy.deepcopy(model)
    with torch.no_grad():
        d = 16 // 4
        for h in (1, 3):
            for part in range(3):
                rows = slice(part * 16 + h * d, part * 16 + (h + 1) * d)
                ref.att.in_proj_weight[rows] = 0
                ref.att.in_proj_bias[rows] = 0
        torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)
    # the remaining heads keep their order: re-pruning the small model works too
    again = prunefx.reconfigure(small, {"att": torch.tensor([False, True])}, example_inputs=x)
    assert again.att.num_heads == 1


def test_need_weights_average_makes_heads_approximate() -> None:
    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            out, w = self.att(x, x, x)
            return out, w

    graph = prunefx.trace(Weights().eval(), torch.randn(1, 3, 8))
    heads = graph.group("att")
    assert heads.prunable and not heads.exact and "averaged over heads" in heads.reason


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("shift", [[0, 0], [3, 3]])
def test_window_attention_matches_torchvision(v2: bool, shift: list[int]) -> None:
    import torchvision.models.swin_transformer as swin
    torch.manual_seed(0)
    c, h = 32, 4
    x = torch.randn(2, 9, 5, c)
    args = (torch.randn(3 * c, c), torch.randn(c, c), torch.randn(1, h, 49, 49), [7, 7], h, shift)
    kw = {"qkv_bias": torch.randn(3 * c), "proj_bias": torch.randn(c), "logit_scale": torch.randn(h, 1, 1) if v2 else None, "training": False}
    torch.testing.assert_close(pnn.shifted_window_attention(x, *args, **kw), swin.shifted_window_attention(x, *args, **kw), rtol=0, atol=0)
