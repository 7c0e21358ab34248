"""Every torchvision model of the classification, segmentation and video modules: exact
groups match the masked model, FLOPs drop by at least 20%, the input model is untouched,
and masking every prunable group (approximate ones too) still trains."""

from __future__ import annotations

import pytest
import torch

import prunefx
from zoo import (
    GIANT,
    build,
    check_exact,
    cnn_names,
    example_input,
    segmentation_names,
    tensor_out,
    transformer_names,
    video_names,
)

# Models with more than ~80M parameters (or heavy minimum inputs) share one xdist worker, so
# two never sit in memory at once.
HUGE = {"regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf", "vgg11", "vgg11_bn", "vgg13",
        "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet101_2", "efficientnet_v2_l",
        "vit_h_14", "vit_l_16", "vit_l_32", "swin_b", "swin_v2_b", "convnext_large", "swin3d_b",
        "mvit_v1_b", "mvit_v2_s", "maxvit_t"}
ALL = cnn_names() + transformer_names() + segmentation_names() + video_names()

# Known failures while the core issue is in progress: name -> reason. Must be empty when it closes.
KNOWN_FAILURES: dict[str, str] = {}


def _params(names):
    out = []
    for n in names:
        marks = [pytest.mark.xdist_group("huge")] if n in HUGE else []
        if n in GIANT:
            marks.append(pytest.mark.huge)
        if n in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[n]))
        out.append(pytest.param(n, marks=marks, id=n))
    return out


def test_zoo_is_complete() -> None:
    assert len(ALL) == len(set(ALL)) >= 80 + 6 + 9  # torchvision 0.29: 80 + 6 + 9


@pytest.mark.filterwarnings("ignore:prunefx. .* in training mode does not run")  # eval-sized inputs
@pytest.mark.parametrize("name", _params(ALL))
def test_zoo(name: str) -> None:
    model = build(name)
    x = example_input(name)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    assert mask, "no prunable exact group"

    small, diff = check_exact(model, x, mask, graph)
    assert diff <= 1e-4, f"reconfigured output differs from the masked model by {diff:.3g}"
    flops, small_flops = prunefx.count_flops(model, x), prunefx.count_flops(small, x)
    assert small_flops <= 0.8 * flops, f"FLOPs only fell to {small_flops / flops:.2f}"
    del small

    every = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, seed=1), graph=graph)
    every.train()
    out = every(x)
    loss = tensor_out(out).square().mean()
    loss.backward()
    grads = [p.grad for p in every.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
