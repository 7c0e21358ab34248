"""The op table (prunefx.ops): one record per op, every spelling in exactly one record, and
the tables the analysis and the passes use derived from it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import prunefx
from prunefx import ops
from prunefx.analysis import rules
from prunefx.ops import OpSpec, OpTable
from prunefx.passes import fix_shape_args, size_values


def test_every_spelling_maps_to_exactly_one_record() -> None:
    table = ops.table()
    seen: dict[tuple[str, object], str] = {}
    for spec in table.specs:
        for kind, key in spec.spellings():
            assert seen.setdefault((kind, key), spec.name) == spec.name, f"{kind} {key!r}: {seen[(kind, key)]} and {spec.name}"
    assert {k for k, _ in seen} == {"function", "method", "module", "operator"}
    assert len({s.name for s in table.specs}) == len(table.specs), "two records share a name"


def test_an_operator_registered_after_the_table_is_found_by_name() -> None:
    """Custom operators (transformers' grouped_mm_fallback) exist once their library is
    imported, maybe after the table was built: records name them by schema."""
    table = OpTable((OpSpec("twice", rules.identity, operators=("prunefx_test::twice",)),))

    @torch.library.custom_op("prunefx_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.prunefx_test.twice.default, (graph.placeholder("x"),))
    assert table.lookup(node, {}).name == "twice"
    other = graph.call_function(torch.ops.aten.roll.default, (node, 1))
    assert table.lookup(other, {}) is None


def test_a_spelling_claimed_twice_is_refused() -> None:
    a = OpSpec("a", rules.identity, functions=(torch.roll,))
    b = OpSpec("b", rules.unknown, functions=(torch.roll,))
    with pytest.raises(ValueError, match="claimed by op records 'a' and 'b'"):
        OpTable((a, b))


def test_no_dispatch_table_outside_the_records() -> None:
    """The old per-file tables are gone: the passes and the analysis read the records."""
    import prunefx.masks.cost as cost
    import prunefx.train.branches as branches

    for module, names in ((rules, ("FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "accepts_empty")),
                          (fix_shape_args, ("_FUNCTIONS", "_METHODS")), (size_values, ("SHAPE_CONSUMERS",)),
                          (cost, ("_WEIGHT_FUNCTIONS", "_WEIGHT_MODULES")), (branches, ("_BROADCASTING", "_BROADCASTING_METHODS"))):
        for name in names:
            assert not hasattr(module, name), f"{module.__name__}.{name} still exists"


def test_every_spelling_of_an_op_behaves_alike() -> None:
    """The Python and aten spellings of an op share one record, so they share every property."""
    aten = torch.ops.aten
    for python, lowered in ((torch.add, aten.add.Tensor), (torch.nn.functional.linear, aten.linear.default),
                            (torch.nn.functional.conv2d, aten.conv2d.default), (torch.cat, aten.cat.default),
                            (torch.roll, aten.roll.default), (torch.nn.functional.scaled_dot_product_attention,
                                                              aten.scaled_dot_product_attention.default)):
        assert ops.table().by_function[python] is ops.table().by_function[lowered]
    assert ops.table().by_method["view"] is ops.table().by_function[aten.view.default]
    assert ops.table().module(nn.Conv2d).weight_flops and ops.table().by_function[aten.addmm.default].weight_flops
    assert ops.table().by_method["add_"].foldable and not ops.table().by_method["add_"].pure  # a mutation is never dead code


def test_size_arguments_are_fixed_by_their_record() -> None:
    table = ops.table()
    for spec in table.specs:
        if spec.size_args:
            assert spec.fix is not None, f"{spec.name}: size arguments but no fix"
        if spec.fix is not None:
            assert not spec.modules, f"{spec.name}: fix handlers rewrite call arguments, not modules"


def test_exported_cnn_uses_only_known_ops() -> None:
    """Every aten op of an exported ResNet and MobileNetV3 has a record: nothing is pinned as unknown."""
    for model in (torchvision.models.resnet18(), torchvision.models.mobilenet_v3_small()):
        graph = prunefx.trace(model.eval(), torch.randn(2, 3, 32, 32), frontend="export")
        unknown = {str(n.target) for n in graph.module.graph.nodes if n.op == "call_function" and ops.lookup(n, {}) is None}
        assert not unknown, unknown


class Rolled(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.roll(torch.relu(self.bn(self.a(x))), 1, self.dims))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_roll_along_space_keeps_channels_and_along_channels_pins_them(frontend: str) -> None:
    """The record added for ``torch.roll`` / ``aten.roll.default`` (one entry in records.py)."""
    x = torch.randn(2, 3, 8, 8)
    spatial = Rolled(dims=2).eval()
    with torch.no_grad():
        spatial.bn.running_mean.uniform_(-1, 1)
        spatial.bn.running_var.uniform_(0.5, 2)
    graph = prunefx.trace(spatial, x, frontend=frontend)
    group = graph.group_of("a")
    assert group.prunable and group.exact and group.size == 8
    mask = {group.name: torch.arange(8) % 2 == 0}
    ref = prunefx.apply_mask(copy.deepcopy(spatial), mask, graph=graph)
    small = prunefx.reconfigure(spatial, mask, graph=graph)
    torch.testing.assert_close(small(x), ref(x), atol=1e-5, rtol=1e-5)

    across = prunefx.trace(Rolled(dims=1).eval(), x, frontend=frontend).group_of("a")
    assert not across.prunable and "roll" in across.reason, across.reason


class Transposed(nn.Module):
    """A Linear written as ``x @ weight.T`` (Falcon's FalconLinear), the transpose spelled four ways."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.w2 = nn.Parameter(torch.randn(4, 16))

    def _t(self, w: torch.Tensor) -> torch.Tensor:
        return w.adjoint() if self.spelling == "adjoint" else getattr(w, self.spelling)

    def forward(self, x):
        return torch.relu(x @ self._t(self.w1)) @ self._t(self.w2)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("spelling", ["T", "mT", "mH", "adjoint"])
def test_transposed_weights_keep_their_channels(spelling: str, frontend: str) -> None:
    """``w.T`` (aten ``numpy_T``), ``w.mT``, ``w.mH`` and ``w.adjoint()``: the hidden channels
    between the two products are one exact group (they were pinned as an op without a rule)."""
    model, x = Transposed(spelling), torch.randn(3, 8)
    graph = prunefx.trace(model, (x,), frontend=frontend)
    hidden = [g for g in graph.groups if g.size == 16 and g.prunable]
    assert len(hidden) == 1 and hidden[0].exact, [(g.name, g.size, g.reason) for g in graph.groups]
    mask = {hidden[0].name: torch.arange(16) % 3 != 0}
    ref = prunefx.apply_mask(copy.deepcopy(model), mask, graph=graph)
    small = prunefx.reconfigure(model, mask, graph=graph)
    assert small.w1.shape == (10, 8) and small.w2.shape == (4, 10)
    for inp in (x, torch.randn(5, 8)):
        torch.testing.assert_close(small(inp), ref(inp), atol=1e-5, rtol=1e-5)
