"""Models whose forward branches on self.training (GoogLeNet and Inception-v3 return
auxiliary logits only in training, from modules the eval graph never runs): the
reconfigured model behaves like the masked original in both modes, and the auxiliary
modules are sliced too."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import prunefx
from zoo import max_rel_diff, randomize_norms, tensor_out


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


@pytest.mark.parametrize("name, size", [("googlenet", 64), ("inception_v3", 299)])  # its aux head needs 17x17 maps
def test_both_modes_match_the_masked_model(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = _no_dropout(randomize_norms(torchvision.models.get_model(name, weights=None, init_weights=False))).eval()
    x = torch.randn(2, 3, size, size)
    graph = prunefx.trace(model, x)
    assert graph.traced.other is not None, "the training graph differs and must be traced"
    aux = [g for g in graph.groups if "aux" in g.name.lower() and g.prunable and g.exact]
    assert aux, "auxiliary heads have prunable groups"
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph)
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)

    # the auxiliary modules are physically smaller too
    aux_name = next(n for n, _ in model.named_modules() if "aux" in n.lower())
    before = sum(p.numel() for p in model.get_submodule(aux_name).parameters())
    after = sum(p.numel() for p in small.get_submodule(aux_name).parameters())
    assert after < before

    with torch.no_grad():
        assert max_rel_diff(tensor_out(small(x)), tensor_out(ref(x))) <= 1e-4
        small.train()
        ref.train()
        out, expected = small(x), ref(x)
    assert type(out).__name__ == type(expected).__name__
    assert len(out) == len(expected) >= 2  # logits plus auxiliary logits
    assert max_rel_diff(tensor_out(out), tensor_out(expected)) <= 1e-4
    # and back to eval; a deepcopy (EMA, checkpoint code) keeps both modes
    twin = copy.deepcopy(small)
    small.eval()
    with torch.no_grad():
        assert small(x).shape == expected[0].shape
        assert len(twin.train()(x)) == len(expected)


def test_compile_of_a_reconfigured_model() -> None:
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = prunefx.trace(model, x)
    small = prunefx.reconfigure(model, prunefx.masks.random(graph, 0.5), graph=graph)
    compiled = torch.compile(small, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), small(x))
