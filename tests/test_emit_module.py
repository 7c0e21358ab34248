"""``reconfigure(..., emit="module")``: a copy of the model of the same class.

Oracles: the zoo models with a random 50% mask over exact groups equal ``apply_mask`` on a
copy, keep their class, state_dict keys and size attributes (checked here against the weights,
independently of the emitter's own rules) and round-trip through ``prunefx.state_dict``; a
forward that hard-codes a size raises ``ReconfigureError`` naming the module; the optimizer
follows the emitted parameters.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchvision
from torch import nn

import prunefx
from prunefx import nn as pnn
from zoo import (
    assert_unchanged,
    build,
    cnn_names,
    example_input,
    fingerprint,
    max_rel_diff,
    segmentation_names,
    state_copy,
    tensor_out,
    transformer_names,
    video_names,
    zoo_params,
)

ALL = cnn_names() + transformer_names() + segmentation_names() + video_names()

# Models whose forward cannot express the random mask, by design: the emitter must say so.
# name -> what the ReconfigureError names.
INEXPRESSIBLE: dict[str, tuple[str, str]] = {
    # x.chunk(2) splits the stream into equal halves; the mask prunes them unequally. The
    # width inside a branch (its first 1x1 conv) is expressible.
    **{
        n: (r"module 'stage2\.\d' \(InvertedResidual\) computes the input", r"branch2\.0$")
        for n in cnn_names()
        if n.startswith("shufflenet")
    },
    # torchvision's shifted_window_attention takes the head width as C // num_heads (C: the
    # stream width), so the pruned heads do not fit; V2's bias table is .view(-1, num_heads).
    # The MLP widths are expressible.
    **{
        n: (r"module 'features\.1\.0\.attn' \(ShiftedWindowAttention(V2)?\)", r"mlp\.0$")
        for n in transformer_names()
        if n.startswith("swin")
    },
}

# Models that should pass but do not yet: name -> reason (strict xfail).
KNOWN_FAILURES: dict[str, str] = {}




def _sizes_disagree(model: nn.Module) -> list[str]:
    """Size attributes that do not describe the module's own tensors."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight.shape
            out, per_group_in = (w[1] * m.groups, w[0]) if m.transposed else (w[0], w[1])
            ok = (
                (m.out_channels, m.in_channels) == (out, per_group_in * m.groups)
                if not m.transposed
                else ((m.in_channels, m.out_channels) == (per_group_in, out))
            )
            ok = ok and m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
        elif isinstance(m, nn.Linear):
            ok = (m.out_features, m.in_features) == tuple(m.weight.shape)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            t = m.weight if m.weight is not None else m.running_mean
            ok = t is None or m.num_features == t.shape[0]
        elif isinstance(m, nn.GroupNorm):
            ok = (
                m.weight is None or m.num_channels == m.weight.shape[0]
            ) and m.num_channels % m.num_groups == 0
        elif isinstance(m, nn.LayerNorm):
            ok = m.weight is None or tuple(m.normalized_shape) == tuple(m.weight.shape)
        elif isinstance(m, pnn.MultiheadAttention):
            ok = tuple(m.in_proj_weight.shape) == (3 * m.num_heads * m.head_dim, m.embed_dim)
        elif isinstance(m, nn.MultiheadAttention):
            ok = (
                tuple(m.in_proj_weight.shape) == (3 * m.embed_dim, m.embed_dim)
                and m.num_heads * m.head_dim == m.embed_dim
            )
        else:
            continue
        if not ok:
            bad.append(f"{name} ({m})")
    return bad


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tensor_out(model(x))


def test_zoo_is_complete() -> None:
    assert len(ALL) == len(set(ALL)) >= 80 + 6 + 9
    assert set(INEXPRESSIBLE) <= set(ALL) and set(KNOWN_FAILURES) <= set(ALL)


@pytest.mark.filterwarnings("ignore:prunefx. .* in training mode does not run")  # eval-sized inputs
@pytest.mark.parametrize("name", zoo_params([n for n in ALL if n not in INEXPRESSIBLE], KNOWN_FAILURES))
def test_zoo_emit_module(name: str) -> None:
    model = build(name)
    x = example_input(name)
    before = fingerprint(model)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    assert mask, "no prunable exact group"
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    expected = _run(ref, x)
    del ref  # at most two models in memory at once (ViT-H/14 is 2.5 GB)

    small = prunefx.reconfigure(model, mask, graph=graph, emit="module")
    assert type(small) is type(model)
    assert_unchanged(model, before)
    assert small.training == model.training
    assert not _sizes_disagree(small), _sizes_disagree(small)
    assert small.state_dict().keys() == model.state_dict().keys()
    assert prunefx.count_params(small) < prunefx.count_params(model)

    diff = max_rel_diff(_run(small, x), expected)
    assert diff <= 1e-4, f"emitted module differs from the masked model by {diff:.3g}"

    # a checkpoint of the emitted model rebuilds from the original architecture (load_state_dict
    # leaves it unchanged): the same class with the same weights (its own emit check ran it)
    del graph
    loaded = prunefx.load_state_dict(model, prunefx.state_dict(small))
    assert_unchanged(model, before)
    assert type(loaded) is type(small)
    ours, theirs = small.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.filterwarnings("ignore:prunefx. .* in training mode does not run")
@pytest.mark.parametrize("name", zoo_params(sorted(INEXPRESSIBLE), KNOWN_FAILURES))
def test_zoo_inexpressible_raises(name: str) -> None:
    model = build(name)
    x = example_input(name)
    before = state_copy(model)
    graph = prunefx.trace(model, x)
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    error, expressible = INEXPRESSIBLE[name]
    with pytest.raises(prunefx.ReconfigureError, match=error) as info:
        prunefx.reconfigure(model, mask, graph=graph, emit="module")
    assert 'emit="graph"' in str(info.value)
    after = state_copy(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "input model changed"

    # what the class can express is still emitted
    part = {k: v for k, v in mask.items() if re.search(expressible, k)}
    assert part, sorted(mask)
    small = prunefx.reconfigure(model, part, graph=graph, emit="module")
    assert type(small) is type(model) and not _sizes_disagree(small)
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, part, graph=graph)
    assert max_rel_diff(_run(small, x), _run(ref, x)) <= 1e-4


# -- forwards that hard-code a size -------------------------------------------------------------


class _ViewHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean((2, 3))
        return self.fc(x.view(x.shape[0], 64))  # the literal 64 does not follow the pruning


class _ReshapeHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.reshape(-1, 64))  # with fewer channels, -1 absorbs them into the batch


class _ShiftedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.zeros(1, 16, 1, 1)  # a constant as wide as the unpruned layer


class _WidthHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.width = 64  # a size the model keeps for itself (as ViT's hidden_dim)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], self.width, -1).mean(-1))


class _Net(nn.Module):
    def __init__(self, head: nn.Module, mid: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = mid if mid is not None else nn.Identity()
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(self.mid(torch.relu(self.stem(x)))))))


def _half(n: int) -> torch.Tensor:
    return torch.arange(n) % 2 == 0


@pytest.mark.parametrize(
    ("net", "mask", "names"),
    [
        (lambda: _Net(_ViewHead()), {"conv": _half(64)}, r"module 'head' \(_ViewHead\)"),
        (
            lambda: _Net(_ReshapeHead()),
            {"conv": _half(64)},
            r"module 'head' \(_ReshapeHead\) computes the input of 'head\.fc'",
        ),
        (
            lambda: _Net(nn.Identity(), _ShiftedBlock()),
            {"mid.conv": _half(16)},
            r"module 'mid' \(_ShiftedBlock\)",
        ),
        (
            lambda: _Net(_WidthHead()),
            {"conv": _half(64)},
            r"module 'head' \(_WidthHead\) computes the input of 'head\.fc'.*self\.width = 64",
        ),
    ],
    ids=["view-literal", "reshape-literal", "constant-width", "size-attribute"],
)
def test_hard_coded_size_raises(net, mask: dict, names: str) -> None:
    model = net().eval()
    x = torch.randn(2, 3, 8, 8)
    before = state_copy(model)
    with pytest.raises(prunefx.ReconfigureError, match=names) as info:
        prunefx.reconfigure(model, mask, example_inputs=x, emit="module")
    text = str(info.value)
    assert (
        "hard-codes a size" in text and 'emit="graph"' in text and "test_emit_module.py" in text
    ), text
    after = state_copy(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, prunefx.provenance.LAYOUT_ATTR)
    graph = prunefx.trace(model, x)
    small = prunefx.reconfigure(model, mask, graph=graph)  # the graph emitter rewrites the sizes
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, graph=graph)
    y, expected = _run(small, x), _run(ref, x)
    exact = all(graph.group_of(key).exact for key in mask)  # a constant added to a layer is not
    assert y.shape == expected.shape and (not exact or max_rel_diff(y, expected) <= 1e-4)


def test_literal_that_survives_is_fine() -> None:
    """A literal that names an unpruned size is no obstacle: only the pruned layer changes."""
    model = _Net(_ViewHead()).eval()
    x = torch.randn(2, 3, 8, 8)
    small = prunefx.reconfigure(model, {"stem": _half(16)}, example_inputs=x, emit="module")
    assert type(small) is _Net and small.stem.out_channels == 8 and small.conv.in_channels == 8


class _TrainingOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.training:  # only this mode hard-codes the width
            x = x + torch.zeros(1, 16, 1, 1)
        return x


def test_training_only_hard_coded_size_raises() -> None:
    """Paths that run only in training are checked too (on meta copies: no statistic moves)."""
    model = _Net(_ViewHead(), _TrainingOnly()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        prunefx.ReconfigureError, match=r"training mode\.\n.*module 'mid' \(_TrainingOnly\)"
    ):
        prunefx.reconfigure(model, {"mid.conv": _half(16)}, example_inputs=x, emit="module")
    assert not model.training and not model.mid.training


def test_meta_model_is_checked_on_shapes() -> None:
    """A model on the meta device cannot be run for values; shapes are still checked."""
    with torch.device("meta"):
        model = _Net(_ViewHead()).eval()
    x = torch.empty(2, 3, 8, 8, device="meta")
    small = prunefx.reconfigure(model, {"stem": _half(16)}, example_inputs=x, emit="module")
    assert small.stem.weight.device.type == "meta" and small.conv.in_channels == 8
    with pytest.raises(prunefx.ReconfigureError, match=r"module 'head' \(_ViewHead\)"):
        prunefx.reconfigure(model, {"conv": _half(64)}, example_inputs=x, emit="module")


# -- the optimizer, tied tensors, modes, meta inputs ---------------------------------------------


def test_optimizer_follows_emitted_parameters() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    graph = prunefx.trace(model, x)
    small = prunefx.reconfigure(
        model,
        prunefx.masks.random(graph, 0.5, exact_only=True, seed=0),
        graph=graph,
        emit="module",
        optimizer=opt,
    )
    own = {id(p) for p in small.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(id(p) in own for p in params)
    assert len(params) == len(own)
    for p in params:
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    small.train()
    opt.zero_grad()
    small(x).square().mean().backward()
    opt.step()  # trains on


def test_emitted_model_holds_the_state_tensors() -> None:
    """Tied tensors stay tied and the result shares no storage with the input model."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(16, 8)
            self.c = nn.Linear(16, 8)
            self.c.weight = self.b.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h) + self.c(h)

    model = Tied().eval()
    x = torch.randn(4, 8)
    small = prunefx.reconfigure(model, {"a": _half(16)}, example_inputs=x, emit="module")
    assert type(small) is Tied and small.c.weight is small.b.weight and small.b.in_features == 8
    ours = {t.data_ptr() for t in (*small.parameters(), *small.buffers())}
    theirs = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not ours & theirs
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, {"a": _half(16)}, example_inputs=x)
    assert max_rel_diff(_run(small, x), _run(ref, x)) <= 1e-5


def test_modes_and_guessed_inputs() -> None:
    """Without example inputs prunefx guesses meta ones; the check runs on real ones of that
    shape. A model in training mode stays in training mode, and GoogLeNet's training-only
    auxiliary heads are pruned with it."""
    model = torchvision.models.googlenet(init_weights=False, aux_logits=True).train()
    graph = prunefx.trace(model)
    assert graph.example_inputs[0].device.type == "meta"
    small = prunefx.reconfigure(
        model, prunefx.masks.random(graph, 0.5, exact_only=True, seed=0), graph=graph, emit="module"
    )
    assert (
        type(small) is type(model) and small.training and all(m.training for m in small.modules())
    )
    out = small(torch.randn(2, 3, 224, 224))
    assert out.aux_logits1.shape == (2, 1000) and out.aux_logits2.shape == (2, 1000)


def test_attention_heads_are_pruned() -> None:
    """torchvision's ViT: nn.MultiheadAttention with fewer heads becomes prunefx's
    MultiheadAttention (same parameter names); everything else keeps its class."""
    model = build("vit_b_16")
    x = example_input("vit_b_16")
    graph = prunefx.trace(model, x)
    heads = [g for g in graph.groups if g.prunable and g.exact and "self_attention" in g.name]
    assert heads, [g.name for g in graph.groups]
    mask = {g.name: torch.arange(g.size) % 3 != 0 for g in heads}
    small = prunefx.reconfigure(model, mask, graph=graph, emit="module")
    assert type(small) is type(model)
    attn = small.encoder.layers[0].self_attention
    assert isinstance(attn, pnn.MultiheadAttention) and attn.num_heads < 12
    assert not _sizes_disagree(small)
    assert small.state_dict().keys() == model.state_dict().keys()
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, graph=graph)
    assert max_rel_diff(_run(small, x), _run(ref, x)) <= 1e-4


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_b_16"])
def test_export_frontend(name: str) -> None:
    """The emitter reads only the sliced tensors, so an aten graph (every parameter a
    get_attr, no call_module to copy attributes from) emits the same class too; ViT's
    attention, decomposed by torch.export, becomes prunefx's MultiheadAttention when it
    loses heads."""
    model = build(name)
    x = example_input(name)
    graph = prunefx.trace(model, x, frontend="export")
    assert graph.frontend == "export"
    mask = prunefx.masks.random(graph, 0.5, exact_only=True, seed=0)
    small = prunefx.reconfigure(model, mask, graph=graph, emit="module")
    assert type(small) is type(model) and not _sizes_disagree(small)
    assert small.state_dict().keys() == model.state_dict().keys()
    ref = copy.deepcopy(model)
    prunefx.apply_mask(ref, mask, graph=graph)
    assert max_rel_diff(_run(small, x), _run(ref, x)) <= 1e-4
    # heads pruned (when the front-end exposes them as a group) <=> attention rebuilt
    heads = any("self_attention" in key for key in mask)
    assert heads == any(isinstance(m, pnn.MultiheadAttention) for m in small.modules())


def test_export_frontend_names_the_module() -> None:
    """Without submodule calls in the graph to compare with, the traceback names the model's
    module whose forward fed a torch.nn layer the wrong size."""
    model = _Net(_ReshapeHead()).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = prunefx.trace(model, x, frontend="export")
    with pytest.raises(
        prunefx.ReconfigureError, match=r"module 'head' \(_ReshapeHead\).*raised in 'head\.fc'"
    ):
        prunefx.reconfigure(model, {"conv": _half(64)}, graph=graph, emit="module")


def test_emit_argument_is_checked() -> None:
    with pytest.raises(prunefx.MaskError, match="emit must be"):
        prunefx.reconfigure(nn.Linear(2, 2), {}, example_inputs=torch.randn(1, 2), emit="modules")
