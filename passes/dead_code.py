"""EliminateDeadCode: remove nodes whose value nobody uses.

fx's own ``eliminate_dead_code`` treats in-place tensor methods (``x.add_(y)``) as pure; here
they, and every call_module (a module may have side effects such as BatchNorm statistics), are
kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from prunefx.passes.base import Pass, RewriteState

__all__ = ["EliminateDeadCode"]


def _removable(node: fx.Node) -> bool:
    if node.users or node.op in ("placeholder", "output", "call_module"):
        return False
    if node.op == "call_method" and str(node.target).endswith("_"):
        return False
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") or node.kwargs.get("inplace") or "assert" in name:
            return False
    return True


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    def run(self, state: RewriteState) -> None:
        for graph in state.graphs:
            for node in reversed(list(graph.nodes)):
                if _removable(node):
                    state.log.append(f"removed dead node {node.name}")
                    graph.erase_node(node)
