"""Cost of a model on given inputs: FLOPs (``torch.utils.flop_counter``), activation bytes
and parameters, from one meta-tensor interpreter.

``node_costs(gm, inputs)`` is that interpreter: the graph runs once, node by node, on meta
tensors (parameters and buffers swapped for meta copies for the duration, so a large model
costs no arithmetic and no memory), and a node's FLOPs are what ``FlopCounterMode`` counts
while it runs (the counter's total before and after it); its memory is the bytes of the
tensors it outputs. Shape-preserving modules are skipped (FlopCounterMode counts no FLOPs
for them). When a meta kernel is missing (a data-dependent op), a deep copy of the graph
runs on the real inputs under ``torch.no_grad()`` instead (never the model itself: in
training mode its BatchNorm layers would update their running statistics).

Every count in prunefx comes from it: ``count_flops`` sums it, and a traced graph computes
it once and keeps it (``PruneGraph.node_costs``) for the inspector, the cost model of
``prunefx.masks`` and ``shrink``.

``flop_counter()`` is the ``FlopCounterMode`` it uses: torch's formulas plus the grouped
matmul of a mixture of experts (``aten._grouped_mm``, transformers' ``grouped_mm_fallback``),
which torch has no formula for: ``2 * S * K * N`` for ``S`` rows of ``K`` channels and
``N`` outputs.

Example::

    >>> import torch, prunefx
    >>> g = prunefx.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8))
    >>> {n.name: c.flops for n, c in g.node_costs.items()}  # 2 * 8*6*6 outputs * 3*3*3 MACs
    {'input_1': 0, '_0': 15552, 'output': 0}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode

from prunefx.shapes import _meta_state, _MetaShapeProp, _to_meta, _TrackingShapeProp
from prunefx.tracing import attributes_restored
from prunefx.wrappers import unwrap_compiled

__all__ = ["NodeCost", "count_flops", "count_params", "flop_counter", "node_costs", "tensor_bytes"]


def _grouped_mm_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Each of the S rows of ``x`` (S, K) meets one expert's (K, N) matrix."""
    return 2 * int(x_shape[0]) * int(x_shape[1]) * int(w_shape[-1])


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts grouped matmuls."""
    extra: dict[Any, Any] = {}
    for namespace, name in (("aten", "_grouped_mm"), ("transformers", "grouped_mm_fallback")):
        packet = getattr(getattr(torch.ops, namespace, None), name, None) if hasattr(torch.ops, namespace) else None
        if packet is not None:
            extra[packet] = _grouped_mm_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


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


def node_costs(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[fx.Node, NodeCost]:
    """FLOPs and output bytes of every node of ``gm`` on ``inputs`` (its placeholders' values)."""
    try:
        with torch.no_grad():  # the interpreter reads the model's tensors as meta ones
            return _run(_MetaCosts(gm), _to_meta(inputs))
    except Exception:
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
            raise  # nothing real to fall back to
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        costs = _run(_RealCosts(twin), copy.deepcopy(inputs))
    original = dict(zip(twin.graph.nodes, gm.graph.nodes, strict=True))
    return {original[n]: c for n, c in costs.items()}


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs of ``model(*example_inputs)`` as counted by FlopCounterMode."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    model = unwrap_compiled(model)[0]  # (torch.compile's wrapper: the model inside, not compiled to count it)
    try:
        if isinstance(model, fx.GraphModule):
            gm = model
        else:
            with attributes_restored(model):  # fx would leave its constants on the model
                gm = fx.symbolic_trace(model)
    except Exception:  # not traceable: run the module itself on meta tensors
        with _reparametrize_module(model, _meta_state(model)), torch.no_grad(), flop_counter() as counter:
            model(*_to_meta(inputs))
        return int(counter.get_total_flops())
    return sum(c.flops for c in node_costs(gm, inputs).values())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
