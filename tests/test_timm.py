"""timm models whose reconfigured graphs once failed at run time (issue 13): a reconfigured
model must always run, with approximate (residual stream) groups masked too."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import prunefx
from zoo import max_rel_diff, randomize_norms

# name -> image side
MODELS = {"eva02_tiny_patch14_224": 224, "maxvit_nano_rw_256": 256}
KNOWN_FAILURES: dict[str, str] = {}  # name -> reason (strict xfail); empty: every model passes


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[n])] if n in KNOWN_FAILURES else [])
                                  for n in MODELS])
def test_reconfigured_timm_model_runs_and_exact_groups_match(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(2, 3, MODELS[name], MODELS[name])
    graph = prunefx.trace(model, x)
    every = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5, seed=1), graph=graph)
    with torch.no_grad():
        assert every(x).shape == model(x).shape  # approximate groups too: it runs
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    with torch.no_grad():
        assert max_rel_diff(small(x), ref(x)) <= 1e-4
