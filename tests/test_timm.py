"""timm models through the default path (``prunefx.trace`` with ``frontend="auto"``): a
reconfigured model must always run, with approximate (residual stream) groups masked too, and
its exact groups must match ``apply_mask`` at the example shape and at other shapes.

The list is the lasting form of a sweep of the smallest variant of every timm architecture
(244 models, none silently wrong; what it found is fixed and listed here with why). Each
model names its number of exact groups, so a change that pins groups shows up by name."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import prunefx
from zoo import max_rel_diff, randomize_norms, tensor_out

# name -> (frontend, exact groups)
ZOO = {
    # fx: a reshape to C * k * k of a pruned C was rescaled twice, and ceil(H / 2) sizes were frozen
    "volo_d1_224": ("fx", 23),
    # fx: `x.reshape(x.shape[:-1] + (-1,))` was frozen to the example's batch
    "test_maxvit": ("fx", 27),
    "maxvit_nano_rw_256": ("fx", 43),
    # export: `with torch.autocast(..., enabled=False)` is a higher-order op (a raw AttributeError)
    "efficientvit_b0": ("export", 16),
    # export: image sizes are static; dynamic_img_size ViTs say so at another size
    "test_vit": ("export", 6),
    # export: its forward caches attention biases in a dict, which the capture left holding FakeTensors
    "tiny_vit_5m_224": ("export", 27),
    "eva02_tiny_patch14_224": ("fx", 12),
    "test_convnext": ("fx", 9),
    "test_efficientnet": ("fx", 13),
    "test_resnet": ("fx", 11),
    "test_byobnet": ("fx", 14),
    "test_coatnet": ("fx", 12),
    "test_vit_relpos": ("fx", 18),
    "test_mambaout": ("fx", 14),
    "levit_128": ("fx", 34),
    "efficientformerv2_s0": ("fx", 24),
    "fastvit_t8": ("fx", 12),
    "ghostnet_050": ("fx", 31),
    "repvit_m1": ("fx", 41),
    "inception_next_atto": ("fx", 28),
    "edgenext_xx_small": ("fx", 12),
    "xcit_nano_12_p8_224": ("fx", 18),
    # a learnable scalar bias after every activation maps a removed channel to a constant
    "hgnetv2_b0": ("fx", 0),
}


def _runs(model: torch.nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 - whether the model itself accepts this size
        return False
    return True


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(ZOO))
def test_timm_model_runs_pruned_and_exact_groups_match(name: str) -> None:
    frontend, n_exact = ZOO[name]
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, pretrained=False)).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    x, batch = torch.randn(2, c, h, w), torch.randn(3, c, h, w)
    larger = torch.randn(1, c, h + 32, w + 32)
    graph = prunefx.trace(model, x)
    assert graph.frontend == frontend
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    assert len(mask) == n_exact, sorted(mask)

    every = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, seed=1), graph=graph)
    with torch.no_grad():
        assert tensor_out(every(x)).shape == tensor_out(model(x)).shape  # approximate groups too: it runs
        every(batch)
    if _runs(model, larger):
        if frontend == "export":  # image sizes are static in an export graph: one clear line
            with pytest.raises(prunefx.TraceError, match="captured by torch.export with static sizes"):
                every(larger)
        else:
            with torch.no_grad():
                every(larger)
    if not mask:
        return
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    with torch.no_grad():
        for inputs in (x, batch):
            expected = tensor_out(ref(inputs))
            assert max_rel_diff(tensor_out(small(inputs)), expected) <= 1e-4
        assert max_rel_diff(expected, tensor_out(model(batch))) > 1e-3  # the mask changed the output
