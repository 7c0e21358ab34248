"""Size reads of pruned dims: ``x.shape[1]``, ``x.size(-1) // heads``, ...

Symbolic tracing keeps ``x.size()`` / ``x.shape`` and the Python arithmetic on them as nodes,
so they are recomputed at run time from the pruned tensors. That is right where the value is
the size of a pruned dim (a view of the pruned tensor) and wrong anywhere else: in
``x.sum(1) / x.shape[1]`` or an attention scale ``(C // heads) ** -0.5`` the masked model
uses the original size. ``SizeValues`` evaluates such integer nodes under the original and
the pruned shapes; ``FreezeStaleSizes`` replaces a *stale* one (its value changes) by its
original value in every use that is not a shape argument (``FixShapeArgs`` handles those).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from prunefx import ops
from prunefx.passes.base import Pass, RewriteState

__all__ = ["SizeValues", "FreezeStaleSizes"]

_ARITH = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.pow, operator.neg,
    math.ceil, math.floor, math.trunc,  # fx wraps math's functions: VOLO's ``math.ceil(H / stride)``
}



class SizeValues:
    """Value of integer-valued nodes under a map of tensor shapes (None when unknown)."""

    def __init__(self, shapes: Mapping[fx.Node, Any]) -> None:
        self.shapes = shapes
        self._memo: dict[fx.Node, Any] = {}

    def __call__(self, arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        if arg not in self._memo:
            self._memo[arg] = self._eval(arg)
        return self._memo[arg]

    def _eval(self, n: fx.Node) -> Any:
        if isinstance(self.shapes.get(n), torch.Size) or n.op not in ("call_method", "call_function"):
            return None
        if n.op == "call_method" and n.target == "size":
            shape = self.shapes.get(n.args[0])
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return None if shape is None else tuple(shape) if dim is None else shape[dim]
        if n.target is torch.ops.aten.sym_size.int:  # the export front-end's x.size(d)
            shape = self.shapes.get(n.args[0])
            return None if shape is None else shape[n.args[1]]
        if n.op == "call_method" and n.target == "dim":
            shape = self.shapes.get(n.args[0])
            return None if shape is None else len(shape)
        if n.target is getattr and n.args[1] == "shape":
            shape = self.shapes.get(n.args[0])
            return None if shape is None else tuple(shape)
        if n.target is operator.getitem:
            seq = self(n.args[0])
            return seq[n.args[1]] if isinstance(seq, tuple) and not isinstance(n.args[1], fx.Node) else None
        if n.target in _ARITH:
            values = [self(a) for a in n.args]
            if any(v is None for v in values):
                return None
            return n.target(*values)
        return None


def _is_shape_use(user: fx.Node) -> bool:
    """Integer arguments of this node are sizes (FixShapeArgs rewrites them)."""
    spec = ops.lookup(user, {})
    return spec is not None and spec.size_args


@dataclass(frozen=True)
class FreezeStaleSizes(Pass):
    def run(self, state: RewriteState) -> None:
        old = SizeValues(state.plan.analysis.shapes.of)
        new = SizeValues(state.plan.new_shapes)
        source_of = {copy: traced for traced, copy in state.node_map.items()}
        for node in list(state.source_nodes()):
            before = old(node)
            if before is None or new(node) == before or not isinstance(before, (int, float)):
                continue
            stale = state.node_map.get(node)
            if stale is None or stale.graph is None:
                continue
            for user in list(stale.users):
                if _is_shape_use(user) or old(source_of.get(user)) is not None:
                    continue  # a shape argument, or more size arithmetic (judged on its own)
                user.args = map_arg(user.args, lambda n, s=stale, v=before: v if n is s else n)
                user.kwargs = map_arg(user.kwargs, lambda n, s=stale, v=before: v if n is s else n)
                state.log.append(f"{user.name}: froze {stale.name} to its original value {before}")
