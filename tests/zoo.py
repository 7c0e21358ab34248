"""Shared helpers for the zoo tests: model list, smallest inputs, randomised norms, and the
equivalence check against apply_mask."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import prunefx

# Transformers and ConvNeXt come with the transformer issue (LayerNorm streams, heads).
NOT_CNN = ("vit_", "swin", "maxvit", "convnext")

INPUT_SIZE = {
    "inception_v3": 75,  # eval only: its training-mode aux head needs 299 (tests/test_modes.py)
    "alexnet": 63,
}
DEFAULT_SIZE = 32

# Models with more than ~80M parameters (or heavy minimum inputs) share one xdist worker, so
# two never sit in memory at once.
HUGE = {"regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf", "vgg11", "vgg11_bn", "vgg13",
        "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet101_2", "efficientnet_v2_l",
        "vit_h_14", "vit_l_16", "vit_l_32", "swin_b", "swin_v2_b", "convnext_large", "swin3d_b",
        "mvit_v1_b", "mvit_v2_s", "maxvit_t"}

# Up to ~6 GB at their peak each (two models in memory at once, see check_exact): `make test` runs their tests alone, after the rest
# (marker `huge`), so they never share the machine's memory with another worker.
GIANT = frozenset({"vit_h_14", "regnet_y_128gf"})


def cnn_names() -> list[str]:
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(NOT_CNN))


def transformer_names() -> list[str]:
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(NOT_CNN))


def segmentation_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def video_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.video))


# Smallest inputs that every model family accepts (image side, or (T, H, W) for video).
# ViTs are built for a small image_size (their position embedding follows it).
VIT_IMAGE = {"vit_h_14": 28}
VIDEO_SHAPE = {"mvit_v1_b": (16, 224, 224), "mvit_v2_s": (16, 224, 224), "s3d": (16, 224, 224)}  # s3d ends in a 2x7x7 pool


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if name in video_names():
        return torch.randn(batch, 3, *VIDEO_SHAPE.get(name, (8, 32, 32)), generator=gen)
    if name.startswith("vit_"):
        s = VIT_IMAGE.get(name, 32)
    elif name.startswith("maxvit"):
        s = 224  # partition size 7 at every stage
    else:
        s = INPUT_SIZE.get(name, DEFAULT_SIZE)
    return torch.randn(batch, 3, s, s, generator=gen)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm statistics and affine terms away from their 0/1 defaults, and every constant-
    initialised tensor (zero classifier heads and class tokens, 1e-6 layer scales) random:
    defaults hide misaligned slices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                scale = max(float(p.flatten()[0].abs()), 0.02)
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs: dict = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name.startswith("vit_"):
        kwargs["image_size"] = VIT_IMAGE.get(name, 32)
    if name in segmentation_names():
        kwargs["weights_backbone"] = None
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize_norms(model).eval()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def fingerprint(model: nn.Module) -> dict[str, str]:
    """A SHA-256 of every state_dict tensor's bytes: "the model is unchanged" without holding
    a second copy of a 600M-parameter model."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, str]) -> None:
    after = fingerprint(model)
    changed = [k for k in before if after.get(k) != before[k]]
    assert before.keys() == after.keys() and not changed, f"input model changed: {changed[:5]}"


def masked_output(model: nn.Module, x: Any, mask: dict, graph: prunefx.PruneGraph | None = None) -> Any:
    """The output of ``apply_mask`` on a copy of ``model``; the copy is freed before it returns."""
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, example_inputs=x, graph=graph)
    with torch.no_grad():
        return ref(x)


def check_exact(model: nn.Module, x: torch.Tensor, mask: dict, graph: prunefx.PruneGraph | None = None) -> tuple[nn.Module, float]:
    """Reconfigure with ``mask``; return the small model and max|diff| / max(1, max|ref|)
    against ``apply_mask`` on a copy. The masked copy is gone before the small model is built
    (at most two models in memory)."""
    before = fingerprint(model)
    expected = masked_output(model, x, mask, graph)
    small = prunefx.reconfigure(model, mask, example_inputs=x, graph=graph)
    assert_unchanged(model, before)
    with torch.no_grad():
        out = small(x)
    return small, max_rel_diff(tensor_out(out), tensor_out(expected))


def tensor_out(y):
    """All tensors of a model output (tensor, tuple/namedtuple, dict) as one flat vector."""
    if isinstance(y, torch.Tensor):
        return y.flatten()
    values = y.values() if isinstance(y, dict) else y
    return torch.cat([tensor_out(v) for v in values if v is not None])


def zoo_params(names: list[str], known_failures: dict[str, str]) -> list:
    """One pytest param per model: the HUGE ones share an xdist worker, the GIANT ones are
    marked `huge` (run alone), known failures are strict xfails with their reason."""
    out = []
    for n in names:
        marks = [pytest.mark.xdist_group("huge")] if n in HUGE else []
        if n in GIANT:
            marks.append(pytest.mark.huge)
        if n in known_failures:
            marks.append(pytest.mark.xfail(strict=True, reason=known_failures[n]))
        out.append(pytest.param(n, marks=marks, id=n))
    return out
