"""What a mask costs: FLOPs and parameters of the reconfigured model, estimated without
building it, and measured by building it.

The estimate takes each node's FLOPs from the graph's one meta-tensor pass
(``PruneGraph.node_costs``, the interpreter of ``prunefx.count_flops``). A node that uses a parameter W (a conv or linear
module's weight; for a module with several, the largest; for ``F.conv2d(x, self.w)``, the
``get_attr`` it reads) costs ``F_n = positions_n * numel(W)`` (``2 N H_out W_out |W|`` for a
conv, ``2 tokens |W|`` for a linear), and channel pruning leaves ``positions_n`` alone, so

    F'_n = F_n * numel'(W) / numel(W),    numel'(W) = prod_d kept_d(W)

where ``kept_d(W)`` counts the indices along dim d whose channel the mask keeps (dims that
no group touches keep their size). Parameters: ``P' = sum_W numel'(W)``. Both are exact for
CNNs made of convolutions and linear layers. Attention is exact too:

- a product of activations (``matmul``/``bmm``, ``scaled_dot_product_attention``) costs a
  product of its sizes, each linear: ``F'_n = F_n * prod_d kept_d / size_d`` over the
  output's dims and the contracted one (the heads, a pruned head width), where ``kept_d``
  counts the indices along d whose channel any kept cell holds (masks keep products of index
  sets). SDPA's two products (scores over the q/k width E, values over the v width Ev) are
  weighted ``E : Ev``;
- ``nn.MultiheadAttention`` (self-attention, one in-projection) splits into its projections,
  ``8 B L E^2`` FLOPs that scale with ``in_proj_weight`` like a linear layer, and its score
  and value products, the rest, which scale with the heads it keeps (``in_proj_weight``'s
  rows).

Any other node without parameters is counted as unchanged, and any other module is scaled
by its largest parameter: those are the estimate's approximations (``CostModel.exact`` says
whether there are any), which ``to_budget`` corrects by measuring real reconfigurations
(``measure_cost``).

Example::

    >>> costs = CostModel.of(graph)                       # one meta-tensor pass
    >>> costs.estimate(prunefx.masks.magnitude(graph, 0.5))  # milliseconds
    Cost(flops=..., params=..., flops_ratio=..., params_ratio=...)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from prunefx import ops
from prunefx.flops import count_flops, count_params
from prunefx.graph import PruneGraph
from prunefx.mask import resolve_mask

__all__ = ["Cost", "CostModel", "estimate_cost", "measure_cost"]


@dataclass(frozen=True)
class Cost:
    """FLOPs and parameters of a (pruned) model, and their fractions of the original's."""

    flops: int
    params: int
    flops_ratio: float
    params_ratio: float


def _scales_exactly(gm: fx.GraphModule, node: fx.Node) -> bool:
    """FLOPs of convolutions, linear layers and products scale exactly with the size of their
    weight (the op records' ``weight_flops``); anything else is estimated."""
    spec = ops.lookup(node, {str(node.target): gm.get_submodule(str(node.target))} if node.op == "call_module" else {})
    return spec is not None and spec.weight_flops


def _weight_of(gm: fx.GraphModule, node: fx.Node, params: dict[str, torch.Tensor], derived: dict[fx.Node, set[str]]) -> str | None:
    """The parameter whose size a node's FLOPs scale with: the largest one it uses."""
    if node.op == "call_module":
        names = [f"{node.target}.{n}" for n, _ in gm.get_submodule(str(node.target)).named_parameters()]
    else:
        names = sorted({n for a in node.all_input_nodes for n in derived.get(a, ())})
    names = [n for n in names if n in params]
    return max(names, key=lambda n: params[n].numel()) if names else None


def _parameter_derived(gm: fx.GraphModule, params: dict[str, torch.Tensor]) -> dict[fx.Node, set[str]]:
    """Nodes computed from parameters alone (``get_attr`` and ops on them): the parameters."""
    derived: dict[fx.Node, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if str(node.target) in params:
                derived[node] = {str(node.target)}
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and all(a in derived for a in node.all_input_nodes):
            derived[node] = set().union(*(derived[a] for a in node.all_input_nodes))
    return derived


Scaled = tuple[float, tuple[np.ndarray, ...]]  # FLOPs and, per dim they scale with, roots (size, rest)


def _dims_of(uf: Any, lay: Any, dims: Any) -> list[np.ndarray]:
    """Per tracked dim of ``lay`` among ``dims``: its union-find roots as (size along the dim,
    the other cells of its factor)."""
    out = []
    for d in dims:
        f = lay.on(d)
        if f is not None:
            moved = np.moveaxis(uf.find(f.ids), f.axis(d), 0)
            out.append(moved.reshape(moved.shape[0], -1))
    return out


def _product_terms(graph: PruneGraph, node: fx.Node, flops: float) -> list[Scaled] | None:
    """The scaled terms of a product of activations (see the module docstring), or None."""
    from prunefx.analysis.layout import Layout

    spec = ops.lookup(node, {})
    if spec is None or spec.name not in ("matmul", "scaled_dot_product_attention"):
        return None
    layouts, uf = graph.analysis.layouts, graph.analysis.uf
    out, x = layouts.get(node), layouts.get(node.args[0]) if node.args else None
    shape, xs = graph.shapes.tensor(node), graph.shapes.tensor(node.args[0]) if node.args else None
    if not (isinstance(out, Layout) and isinstance(x, Layout) and shape is not None and xs is not None):
        return None
    nd = len(shape)
    if spec.name == "matmul":
        if len(xs) < 2:
            return None
        return [(flops, tuple(_dims_of(uf, out, range(nd)) + _dims_of(uf, x, [len(xs) - 1])))]
    e, ev = int(xs[-1]), int(shape[-1])  # SDPA: scores over E, values over Ev
    rest = _dims_of(uf, out, range(nd - 1))
    return [(flops * e / (e + ev), tuple(rest + _dims_of(uf, x, [len(xs) - 1]))),
            (flops * ev / (e + ev), tuple(rest + _dims_of(uf, out, [nd - 1])))]


def _attention_module_terms(graph: PruneGraph, node: fx.Node, m: Any, flops: float) -> tuple[float, list[Scaled]] | None:
    """``nn.MultiheadAttention`` as self-attention: (its projections' FLOPs, which scale with
    ``in_proj_weight``; the score and value products, scaled by the heads it keeps)."""
    if not isinstance(m, torch.nn.MultiheadAttention) or not m._qkv_same_embed_dim or len(node.args) < 3:
        return None
    if not (node.args[0] is node.args[1] is node.args[2]):
        return None
    xs = graph.shapes.tensor(node.args[0])
    if xs is None or len(xs) != 3:
        return None
    tokens, width = int(xs[0]) * int(xs[1]), int(m.in_proj_weight.shape[0]) // 3
    proj = 8.0 * tokens * width * int(m.in_proj_weight.shape[1])
    rows = next((r for mb in graph.analysis.members if mb.tensor == f"{node.target}.in_proj_weight" and mb.dim == 0
                 for r in [graph.analysis.uf.find(mb.ids)]), None)
    if proj > flops:
        return None
    heads = () if rows is None else (rows.reshape(-1, 1),)
    return proj, [(flops - proj, heads)]


@dataclass(frozen=True, eq=False)
class CostModel:
    """The per-parameter FLOPs and per-dim channel ids a cost estimate needs (see module doc)."""

    graph: PruneGraph
    flops: int  # of the original model
    params: int
    fixed_flops: int  # of nodes that use no parameter and do not scale
    scaled: tuple[Scaled, ...]  # products of activations (attention): FLOPs times kept fractions
    approximate_flops: int  # of nodes whose FLOPs are not exactly proportional to their weight
    names: tuple[str, ...]  # canonical parameter names
    numel: np.ndarray
    weight_flops: np.ndarray  # FLOPs of the nodes that scale with each parameter
    row_tensor: np.ndarray  # per (parameter, dim) touched by a group: index into names
    row_size: np.ndarray
    row_roots: tuple[np.ndarray, ...]  # union-find roots of each index along that dim

    @classmethod
    def of(cls, graph: PruneGraph) -> CostModel:
        gm = graph.module
        aliases = graph.analysis.aliases
        canon = lambda n: aliases.get(n, n)  # noqa: E731
        params: dict[str, torch.Tensor] = {}
        for n, p in gm.named_parameters(remove_duplicate=False):
            params.setdefault(canon(n), p)
        names = tuple(params)
        index = {n: i for i, n in enumerate(names)}
        numel = np.array([params[n].numel() for n in names], dtype=np.float64)

        weight_flops = np.zeros(len(names), dtype=np.float64)
        fixed = approximate = 0
        all_params = dict(gm.named_parameters(remove_duplicate=False))
        derived = _parameter_derived(gm, all_params)
        node_flops = {n: c.flops for n, c in graph.node_costs.items() if c.flops}
        scaled: list[Scaled] = []
        for node, f in node_flops.items():
            w = _weight_of(gm, node, all_params, derived)
            attention = _attention_module_terms(graph, node, gm.get_submodule(str(node.target)), f) if node.op == "call_module" else None
            products = _product_terms(graph, node, f) if w is None else None
            if attention is not None and w is not None:
                weight_flops[index[canon(w)]] += attention[0]
                scaled += attention[1]
            elif products is not None:
                scaled += products
            elif w is None:
                fixed += f
                approximate += f
            else:
                weight_flops[index[canon(w)]] += f
                if not _scales_exactly(gm, node):
                    approximate += f

        rows_t, rows_s, rows_r = [], [], []
        uf = graph.analysis.uf
        for m in graph.analysis.members:
            i = index.get(m.tensor)
            if i is None:  # a buffer: neither FLOPs nor parameters
                continue
            rows_t.append(i)
            rows_s.append(len(m.ids))
            rows_r.append(uf.find(m.ids))
        return cls(
            graph=graph, flops=int(sum(node_flops.values())), params=int(numel.sum()), fixed_flops=int(fixed),
            scaled=tuple(scaled), approximate_flops=int(approximate),
            names=names, numel=numel, weight_flops=weight_flops, row_tensor=np.array(rows_t, dtype=np.int64),
            row_size=np.array(rows_s, dtype=np.float64), row_roots=tuple(rows_r),
        )

    @property
    def exact(self) -> bool:
        """True when every FLOP comes from a conv/linear whose cost is proportional to its
        weight, so the FLOPs estimate is exact."""
        return self.approximate_flops == 0

    def estimate(self, mask: Mapping[str, Any], *, policy: str = "union") -> Cost:
        """Estimated cost of ``reconfigure(model, mask)`` (any mask ``reconfigure`` accepts)."""
        return self.estimate_flags(resolve_mask(self.graph, mask, policy).flags)

    def flags_of(self, keep: Mapping[str, np.ndarray]) -> np.ndarray:
        """Keep flag per union-find root from per-group keep arrays (unvalidated fast path)."""
        flags = np.ones(self.graph.analysis.uf.size, dtype=bool)
        for name, k in keep.items():
            flags[self.graph.group(name).slots] = k
        return flags

    def estimate_flags(self, flags: np.ndarray) -> Cost:
        kept = np.array([flags[r].sum() for r in self.row_roots], dtype=np.float64)
        ratio = np.ones(len(self.names), dtype=np.float64)
        np.multiply.at(ratio, self.row_tensor, kept / np.maximum(self.row_size, 1))
        flops = self.fixed_flops + float((self.weight_flops * ratio).sum())
        for f, dims in self.scaled:
            flops += f * float(np.prod([flags[r].any(axis=1).mean() for r in dims]))
        params = float((self.numel * ratio).sum())
        return Cost(int(round(flops)), int(round(params)), flops / max(self.flops, 1), params / max(self.params, 1))


def estimate_cost(graph: PruneGraph, mask: Mapping[str, Any], *, policy: str = "union") -> Cost:
    """Estimated FLOPs/parameters after ``reconfigure(model, mask)``, without building it."""
    return CostModel.of(graph).estimate(mask, policy=policy)


def measure_cost(graph: PruneGraph, mask: Mapping[str, Any], *, policy: str = "union", reference: Cost | None = None) -> Cost:
    """Actual FLOPs/parameters of ``reconfigure(model, mask)``: reconfigures (on the traced
    model's graph) and counts with ``prunefx.count_flops`` on ``graph.example_inputs``."""
    from prunefx.reconfigure import reconfigure  # the rewrite stage sits after mask sources

    small = reconfigure(graph.module, mask, graph=graph, policy=policy)
    flops, params = count_flops(small, graph.flat_inputs), count_params(small)
    if reference is None:
        reference = Cost(sum(c.flops for c in graph.node_costs.values()), count_params(graph.module), 1.0, 1.0)
    return Cost(flops, params, flops / max(reference.flops, 1), params / max(reference.params, 1))
