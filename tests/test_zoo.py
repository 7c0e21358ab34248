"""Every torchvision model of the classification, segmentation and video modules: exact
groups match the masked model, FLOPs drop by at least 20%, the input model is untouched,
and masking every prunable group (approximate ones too) still trains."""

from __future__ import annotations

import pytest
import torch

import prunefx
from zoo import (
    build,
    check_exact,
    cnn_names,
    example_input,
    segmentation_names,
    tensor_out,
    transformer_names,
    video_names,
    zoo_params,
)

ALL = cnn_names() + transformer_names() + segmentation_names() + video_names()

# Known failures while the core issue is in progress: name -> reason. Must be empty when it closes.
KNOWN_FAILURES: dict[str, str] = {}




def test_zoo_is_complete() -> None:
    assert len(ALL) == len(set(ALL)) >= 80 + 6 + 9  # torchvision 0.29: 80 + 6 + 9


@pytest.mark.filterwarnings("ignore:prunefx. .* in training mode does not run")  # eval-sized inputs
@pytest.mark.parametrize("name", zoo_params(ALL, KNOWN_FAILURES))
def test_zoo(name: str) -> None:
    model = build(name)
    x = example_input(name)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    assert mask, "no prunable exact group"

    small, diff = check_exact(model, x, mask, graph)
    assert diff <= 1e-4, f"reconfigured output differs from the masked model by {diff:.3g}"
    costs = prunefx.masks.CostModel.of(graph)  # what shrink reports FLOPs with
    flops, small_flops = costs.flops, prunefx.count_flops(small, x)
    assert small_flops <= 0.8 * flops, f"FLOPs only fell to {small_flops / flops:.2f}"
    if costs.exact:
        assert costs.estimate(mask).flops == small_flops, "an exact estimate is the count"
    del small

    every = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, seed=1), graph=graph)
    every.train()
    out = every(x)
    loss = tensor_out(out).square().mean()
    loss.backward()
    grads = [p.grad for p in every.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
