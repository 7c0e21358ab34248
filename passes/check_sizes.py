"""CheckSizes: every view, reshape and expand of the rewritten graph asks for the planned shape.

``FixShapeArgs`` rewrites the size arguments and ``FreezeStaleSizes`` then freezes stale size
reads; their combination is what runs. This pass evaluates each size argument of the new
graph (literals, and the size arithmetic left to run, under the pruned shapes) and compares
it with the shape the plan gives the node (``-1`` infers its dim; arguments whose value is
not known before run time are not judged). A mismatch is a prunefx bug that would hand back
a model that fails in that reshape, or reshapes wrongly: it is refused with a
ReconfigureError naming the node and its source line, and nothing is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from prunefx import ops
from prunefx.errors import ReconfigureError
from prunefx.passes import fix_shape_args as fix
from prunefx.passes.base import Pass, RewriteState
from prunefx.passes.size_values import SizeValues

__all__ = ["CheckSizes"]


def _asked(new: fx.Node, values: SizeValues) -> tuple[Any, ...] | None:
    """The sizes a view/reshape/expand node asks for, evaluated (None: not a size list)."""
    if len(new.args) < 2:
        return None
    sizes, _ = fix.size_args(new.args)
    value = values(sizes) if isinstance(sizes, fx.Node) else tuple(values(s) for s in sizes)
    return value if isinstance(value, tuple) else None


@dataclass(frozen=True)
class CheckSizes(Pass):
    def run(self, state: RewriteState) -> None:
        planned = state.plan.new_shapes
        values = SizeValues({new: planned[old] for old, new in state.node_map.items() if old in planned})
        modules = state.plan.analysis.traced.modules
        for node in state.source_nodes():
            spec = ops.lookup(node, modules)
            if spec is None or spec.fix is not fix.size_list or not isinstance(planned.get(node), torch.Size):
                continue
            asked, want = _asked(state.node_map[node], values), planned[node]
            if asked is None or any(a is None for a in asked):
                continue
            if not fix.is_shape(asked, want):
                raise ReconfigureError(
                    f"prunefx rewrote the sizes of {state.plan.analysis.traced.where(node)} to {list(asked)}, but the "
                    f"pruned tensor needs {list(want)}: this is a prunefx bug, please report it with the model; "
                    "the model was not changed (pin the group that reaches this node to prune the rest)"
                )
