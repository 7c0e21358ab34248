"""Pass infrastructure: the state passes edit, the Pass protocol and the Pipeline.

The state starts as a *copy* of the traced graph: passes never touch the input model or its
traced graph. ``node_map`` maps each node of the traced graph to its copy, so passes can read
the analysis (keyed by traced nodes) while editing the copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from prunefx.plan import PrunePlan

__all__ = ["RewriteState", "Pass", "Pipeline"]


@dataclass
class RewriteState:
    plan: PrunePlan
    sources: tuple[fx.GraphModule, ...]  # traced graphs: the main mode first, then the other
    graphs: tuple[fx.Graph, ...]  # their copies, edited by the passes
    node_map: dict[fx.Node, fx.Node]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical name -> new tensor
    modules: dict[str, nn.Module] = field(default_factory=dict)  # call_module target -> new module
    result: fx.GraphModule | None = None
    origin: dict | None = None  # the input model's channel layout, if it was reconfigured before
    inputs: tuple = ()  # example inputs of the analysis (shapes and dtypes are recorded)
    log: list[str] = field(default_factory=list)
    _source_tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, plan: PrunePlan, origin: dict | None = None, inputs: tuple = ()) -> RewriteState:
        sources = plan.analysis.traced.graphs
        node_map: dict[fx.Node, fx.Node] = {}
        graphs = []
        for source in sources:
            graph = fx.Graph()
            graph.output(graph.graph_copy(source.graph, node_map))
            graph._codegen = copy.deepcopy(source.graph._codegen)  # export: called like the model (pytree specs)
            graphs.append(graph)
        return cls(plan, sources, tuple(graphs), node_map, origin=origin, inputs=inputs)

    @property
    def source(self) -> fx.GraphModule:
        """The main traced graph (the input model's current train/eval mode)."""
        return self.sources[0]

    @property
    def graph(self) -> fx.Graph:
        return self.graphs[0]

    def source_nodes(self) -> Iterator[fx.Node]:
        for gm in self.sources:
            yield from gm.graph.nodes

    def source_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the traced graphs, by canonical name."""
        if self._source_tensors is None:
            aliases = self.plan.analysis.aliases
            out: dict[str, torch.Tensor] = {}
            for name, t in self.plan.analysis.traced.named_tensors():
                out.setdefault(aliases.get(name, name), t)
            self._source_tensors = out
        return self._source_tensors


@dataclass(frozen=True)
class Pass:
    """A rewrite step. Subclasses implement ``run`` and may check ``verify``."""

    def run(self, state: RewriteState) -> None:
        raise NotImplementedError(type(self).__name__)

    def verify(self, state: RewriteState) -> None:
        """Post-condition on the result of ``run``; raise AssertionError when broken."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Pipeline:
    passes: Sequence[Pass]

    def run(self, state: RewriteState) -> RewriteState:
        for p in self.passes:
            p.run(state)
            p.verify(state)
        return state
