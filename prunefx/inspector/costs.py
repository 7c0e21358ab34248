"""Per-node costs: FLOPs and activation memory of every node of a traced graph.

The rule: a node's FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts while
that node runs, i.e. the difference of the counter's total before and after the node. The
graph runs once, node by node, on meta tensors (parameters swapped for meta copies, as
``prunefx.count_flops`` does), so the per-node numbers add up exactly to
``prunefx.count_flops(model, x)``. A node's activation memory is the number of bytes of
the tensors it outputs (``numel * element_size``, summed over a tuple output).

When a meta kernel is missing (a data-dependent op), a deep copy of the graph runs again on
the real example inputs under ``torch.no_grad()`` (the model itself is never run).

Example::

    >>> import torch, prunefx
    >>> from prunefx.inspector.costs import node_costs
    >>> g = prunefx.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8))
    >>> {n.name: c.flops for n, c in node_costs(g).items()}  # 2 * 8*6*6 outputs * 3*3*3 MACs
    {'input_1': 0, '_0': 15552, 'output': 0}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode

from prunefx.flops import flop_counter
from prunefx.graph import PruneGraph
from prunefx.shapes import _MetaShapeProp, _to_meta, _TrackingShapeProp

__all__ = ["NodeCost", "node_costs", "tensor_bytes"]


@dataclass(frozen=True)
class NodeCost:
    """What one node costs: FLOPs counted while it ran, bytes of its output tensors."""

    flops: int
    memory: int


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (a tensor or a nested tuple/list/dict of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


class _Recorder:
    """Mixin for the shape interpreters: the FLOP counter's total around each node."""

    counter: FlopCounterMode
    costs: dict[fx.Node, NodeCost]

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)  # type: ignore[misc]
        self.costs[n] = NodeCost(int(self.counter.get_total_flops() - before), tensor_bytes(out))
        return out


class _MetaCosts(_Recorder, _MetaShapeProp):
    pass


class _RealCosts(_Recorder, _TrackingShapeProp):
    pass


def _run(prop: _Recorder, inputs: tuple[Any, ...]) -> dict[fx.Node, NodeCost]:
    prop.costs = {}
    with flop_counter() as counter:
        prop.counter = counter
        prop.propagate(*inputs)  # type: ignore[attr-defined]
    return prop.costs


def node_costs(graph: PruneGraph) -> dict[fx.Node, NodeCost]:
    """FLOPs and output bytes of every node of ``graph.module`` on ``graph.example_inputs``."""
    gm = graph.module
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False))
    }
    try:
        with _reparametrize_module(gm, meta), torch.no_grad():
            return _run(_MetaCosts(gm), _to_meta(graph.flat_inputs))
    except Exception:
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in graph.flat_inputs):
            raise  # shape propagation ran on the same meta inputs: unreachable in practice
    # a missing meta kernel: shapes fell back to real inputs too, on a copy (in training mode
    # the model's own BatchNorm layers would update their running statistics)
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        costs = _run(_RealCosts(twin), copy.deepcopy(graph.flat_inputs))
    original = dict(zip(twin.graph.nodes, gm.graph.nodes, strict=True))
    return {original[n]: c for n, c in costs.items()}
