"""EliminateDeadCode: remove the nodes the rewrite left without users.

Only pure size arithmetic is ever removed (``x.size()``, ``x.shape``, ``getitem`` on sizes,
integer operators): that is what the other passes orphan when they replace a size by a
literal. Any other node without users stays: in a traced user model it may be an in-place
mutation (MViT-v2 adds relative positions in place inside an fx-wrapped helper whose result
nobody uses; removing that call silently changed its output), and fx's own
``eliminate_dead_code`` treats in-place methods as pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from prunefx import ops
from prunefx.passes.base import Pass, RewriteState

__all__ = ["EliminateDeadCode"]



def _removable(node: fx.Node) -> bool:
    if node.users or node.op not in ("call_function", "call_method"):
        return False
    spec = ops.lookup(node, {})
    return spec is not None and spec.pure


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    def run(self, state: RewriteState) -> None:
        for graph in state.graphs:
            for node in reversed(list(graph.nodes)):
                if _removable(node):
                    state.log.append(f"removed dead node {node.name}")
                    graph.erase_node(node)
