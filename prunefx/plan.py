"""The pruning plan: what the rewrite passes need, derived from the analysis and a Keep.

- ``index[tensor][dim]``: indices kept along ``dim`` of each parameter/buffer that shrinks
  (``torch.index_select`` order = original order);
- ``new_shapes[node]``: each node's output shape after pruning (same nesting as
  ``Shapes``); a dim carrying a grid factor keeps the indices whose slice holds a kept slot;
- ``kept_along(node, dim)``: bool per index of a node's output along ``dim``, for passes that
  rewrite slice bounds and split sizes.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from prunefx import ops
from prunefx.analysis.layout import Layout
from prunefx.analysis.propagate import ChannelAnalysis
from prunefx.errors import MaskError
from prunefx.mask import Keep

__all__ = ["PrunePlan", "make_plan"]


@dataclass(frozen=True, eq=False)
class PrunePlan:
    analysis: ChannelAnalysis
    keep: Keep
    index: Mapping[str, Mapping[int, torch.Tensor]]
    new_shapes: Mapping[fx.Node, Any]
    kept_ids: np.ndarray  # keep flag of every channel id (its root's), looked up by indexing

    def kept_along(self, value: Layout | None, size: int, dim: int) -> np.ndarray:
        """Bool per index along ``dim`` of a tensor with layout ``value``."""
        f = value.on(dim) if isinstance(value, Layout) else None
        if f is None:
            return np.ones(size, dtype=bool)
        kept = self.kept_ids[f.ids]
        k = f.axis(dim)
        other = tuple(a for a in range(kept.ndim) if a != k)
        return kept.any(axis=other) if other else kept

    def shape_of(self, old: Any, value: Any) -> Any:
        if isinstance(old, torch.Size):
            if not isinstance(value, Layout) or not value.factors:
                return old
            return torch.Size(int(self.kept_along(value, old[d], d).sum()) if value.on(d) is not None else old[d] for d in range(len(old)))
        if isinstance(old, (list, tuple)):
            vals = value if isinstance(value, (list, tuple)) else [None] * len(old)
            return tuple(self.shape_of(o, v) for o, v in zip(old, vals, strict=False))
        if isinstance(old, dict):
            return {k: self.shape_of(v, value.get(k) if isinstance(value, dict) else None) for k, v in old.items()}
        return old


def make_plan(analysis: ChannelAnalysis, keep: Keep) -> PrunePlan:
    kept_ids = keep.of(analysis.uf.find(np.arange(analysis.uf.size)))  # one find for every id
    index: dict[str, dict[int, torch.Tensor]] = {}
    kept_of: dict[int, torch.Tensor | None] = {}  # members often share their ids (a norm's weight, bias, statistics)
    for m in analysis.members:
        if id(m.ids) not in kept_of:
            kept = kept_ids[m.ids]
            kept_of[id(m.ids)] = None if kept.all() else torch.from_numpy(np.flatnonzero(kept))
        idx = kept_of[id(m.ids)]
        if idx is not None:
            index.setdefault(m.tensor, {})[m.dim] = idx
    plan = PrunePlan(analysis, keep, index, {}, kept_ids)
    new_shapes = {node: plan.shape_of(analysis.shapes[node], analysis.layouts.get(node)) for node in analysis.traced.nodes()}
    modules = analysis.traced.modules
    for node in analysis.traced.nodes():
        if _emptied(analysis.shapes[node], new_shapes[node]):
            _check_consumers_accept_empty(analysis, node, modules)
    return PrunePlan(analysis, keep, index, new_shapes, kept_ids)


def _emptied(old: Any, new: Any) -> bool:
    if isinstance(old, torch.Size):
        return any(a > 0 and b == 0 for a, b in zip(old, new, strict=True))
    if isinstance(old, (list, tuple)):
        return any(_emptied(o, n) for o, n in zip(old, new, strict=False))
    return False


def _check_consumers_accept_empty(analysis: ChannelAnalysis, node: fx.Node, modules: dict) -> None:
    """A mask can keep channels of a group and still empty one split piece of it. That is
    fine where the piece is unused or only concatenated/added/activated, and refused where
    a 0-channel tensor would break (pooling, norms) or silently change a layer (a conv
    reading 0 channels returns 0 channels, not its bias)."""
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            continue  # a piece of a tuple: judged at its own node
        spec = ops.lookup(user, modules)
        if spec is None or not spec.empty_ok:
            raise MaskError(
                f"the mask removes every channel of {analysis.traced.where(node)}, which "
                f"{analysis.traced.where(user)} cannot take; keep at least one of them"
            )
