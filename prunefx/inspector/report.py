"""``prunefx.inspect`` and its result, the ``Inspector``: the analysis made visible.

    report = prunefx.inspect(model, x)
    print(report)                     # summary, why groups are pinned, groups, layers
    report.explain("layer1.0.conv3")  # the ops that couple (or pin) these channels
    report.compare(mask_or_small)     # before/after per layer and in total
    report.to_networkx()              # the graph with costs and groups on its nodes
    report.to_html("model.html")      # graph picture (graphviz) + tables, one file

The Inspector runs the analysis once (``prunefx.trace``) and the graph once more on meta
tensors under FlopCounterMode for the per-node costs; everything after that reads the frozen
rows (``tables.py``).

Example::

    >>> import torch, torchvision, prunefx
    >>> report = prunefx.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> report.totals.flops == prunefx.count_flops(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    True
    >>> report.group("layer1.0.conv1").state
    'prunable'
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx
from rich.console import RenderableType
from rich.table import Table
from torch import nn

from prunefx.errors import PruneFxError
from prunefx.graph import PruneGraph, trace
from prunefx.inspector import render
from prunefx.inspector.blocks import BlockRow, block_rows, blocks_table
from prunefx.inspector.compare import Comparison, compare_rows
from prunefx.inspector.explain import Explanation, explain_group
from prunefx.inspector.nxgraph import to_networkx
from prunefx.inspector.tables import (
    GroupRow,
    LayerRow,
    Totals,
    build_index,
    group_rows,
    layer_rows,
    totals,
)
from prunefx.wrappers import unwrapped

__all__ = ["Inspector", "InspectError", "inspect"]


class InspectError(PruneFxError):
    """A name the inspector does not know, or an argument it cannot compare with."""


class Inspector:
    """What prunefx sees in a model: per-layer and per-group rows, totals, and views of them.

    Attributes: ``model``, ``graph`` (the ``PruneGraph``), ``layers`` (a ``LayerRow`` per fx
    node, graph order), ``groups`` (a ``GroupRow`` per channel group, graph order),
    ``blocks`` (a ``BlockRow`` per layer of a transformers model: heads, KV heads, MLP
    channels and their groups; empty for other models), ``totals`` (``Totals``). Build it with ``prunefx.inspect``.
    """

    def __init__(self, model: nn.Module, graph: PruneGraph) -> None:
        self.model = model
        self.graph = graph
        self._index = build_index(graph)
        costs = graph.node_costs
        self.layers: tuple[LayerRow, ...] = layer_rows(graph, self._index, costs)
        self.totals: Totals = totals(self.layers, (), 0)  # FLOPs total, needed for the shares
        self.groups: tuple[GroupRow, ...] = group_rows(graph, self._index, costs, self.totals.flops)
        self.totals = totals(self.layers, self.groups, sum(p.numel() for p in model.parameters()))
        self.blocks: tuple[BlockRow, ...] = block_rows(model, graph, self.layers, self.groups)
        self._groups_by_name = {g.name: g for g in self.groups}
        self._layers_by_name = {r.name: r for r in self.layers}
        self._modules = {r.target: r for r in reversed(self.layers) if r.op == "call_module"}  # first call wins

    @property
    def name(self) -> str:
        return type(self.model).__name__

    # ---- lookups ---------------------------------------------------------------------
    def layer(self, name: str) -> LayerRow:
        """The row of fx node ``name`` or of the (first) call of module ``name``."""
        row = self._layers_by_name.get(name) or self._modules.get(name)
        if row is None:
            raise InspectError(f"{self.name} has no node or called module named '{name}'{self._closest(name)}")
        return row

    def group(self, name: str) -> GroupRow:
        """The row of group ``name``, or of the group holding module ``name``'s output channels."""
        if name in self._groups_by_name:
            return self._groups_by_name[name]
        return self._groups_by_name[self._resolve(name)[0]]

    # ---- text --------------------------------------------------------------------------
    def groups_table(self, limit: int | None = 25, sort: str = "graph") -> Table:
        """Channel groups as a rich Table; ``sort`` is "graph", "flops" or "size"."""
        return render.groups_table(self.groups, limit, sort)

    def layers_table(self, limit: int | None = 30, *, all_nodes: bool = False) -> Table:
        """Layers (nodes with a tensor output; every node with ``all_nodes``) as a rich Table."""
        return render.layers_table(self.layers, limit, all_nodes=all_nodes)

    def blocks_table(self, limit: int | None = None) -> Table:
        """A transformers model's blocks: heads, KV heads, head dim, MLP channels and the
        groups that prune them, per layer (``prunefx.inspector.blocks``)."""
        return blocks_table(self.blocks, limit)

    def reasons_table(self, limit: int | None = None) -> Table:
        """Each distinct reason for pinned/approximate groups, with the groups it applies to."""
        return render.reasons_table(self.groups, limit)

    def render(self, width: int = 120, *, groups: int | None = 25, layers: int | None = 30) -> str:
        """The report as plain text, ``groups`` / ``layers`` rows at most (None: all)."""
        return render.to_text(self.renderable(groups=groups, layers=layers), width)

    def renderable(self, *, groups: int | None = 25, layers: int | None = 30) -> RenderableType:
        """The report for ``rich.print`` / ``Console.print`` (with colour); 0 rows leaves a table out."""
        return render.report_renderable(f"prunefx inspect: {self.name}", self.totals, self.groups, self.layers,
                                        blocks=self.blocks_table() if self.blocks else None,
                                        group_limit=groups, layer_limit=layers)

    def __rich__(self) -> RenderableType:
        return self.renderable()

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        t = self.totals
        return (f"Inspector({self.name}: {t.nodes} nodes, {t.groups} groups ({t.exact} prunable, "
                f"{t.prunable - t.exact} approximate, {t.pinned} pinned), {t.params:,} params, {t.flops:,} FLOPs)")

    # ---- views -------------------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """The graph with costs and groups on its nodes (attributes: ``prunefx.inspector.nxgraph``)."""
        return to_networkx(self.name, self.layers, self._groups_by_name, self.totals)

    def explain(self, name: str) -> Explanation:
        """Why the channels of ``name`` (a module, a group or an fx node) are coupled to
        other modules' or pinned: the ops on their path and the analysis notes."""
        group, *others = self._resolve(name)
        return explain_group(self.graph, self._index, self._groups_by_name[group], name, tuple(others))

    def compare(self, small_or_mask: nn.Module | Mapping[str, Any], *, policy: str = "union") -> Comparison:
        """Before/after per layer and in total, for a model returned by ``prunefx.reconfigure``
        or for a mask (the model is then reconfigured with it, the original left as it is)."""
        from prunefx.reconfigure import reconfigure

        if isinstance(small_or_mask, nn.Module):
            small = small_or_mask
        elif isinstance(small_or_mask, Mapping):
            small = reconfigure(self.model, small_or_mask, graph=self.graph, policy=policy)
        else:
            raise InspectError(f"compare() takes a model returned by prunefx.reconfigure or a mask "
                               f"{{name: bool tensor}}, got {type(small_or_mask).__name__}")
        after = inspect(small, self.graph.example_inputs, example_kwargs=self.graph.example_kwargs or None)
        return compare_rows(self.layers, after.layers, self.totals, after.totals, small)

    def to_dot(self) -> str:
        """Graphviz source of the graph picture (nodes coloured by group)."""
        from prunefx.inspector.graphviz import to_dot

        return to_dot(self.layers, self._groups_by_name)

    def to_html(self, path: str | None = None, *, timeout: float = 120.0) -> str:
        """A self-contained HTML page: graph picture (needs graphviz's ``dot``), node
        details on hover and click, and the tables. Also written to ``path`` if given."""
        from prunefx.inspector.html import page

        html = page(self, fragment=False, timeout=timeout)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(html)
        return html

    def _repr_html_(self) -> str:
        from prunefx.inspector.html import page

        return page(self, fragment=True)

    # ---- name resolution -------------------------------------------------------------
    def _resolve(self, name: str) -> list[str]:
        """Group names for ``name``: a group, a module with output channels, or an fx node."""
        if name in self._groups_by_name:
            return [name]
        if name in self.graph.analysis.module_outputs:
            found = [g.name for g in self.graph.groups_of(name)]
            if found:
                return found
            raise InspectError(f"the output channels of module '{name}' belong to no channel group: no parameter "
                               "holds them (e.g. a parameter-free module whose output is only reduced away)")
        row = self._layers_by_name.get(name) or self._modules.get(name)
        if row is not None:
            if row.groups:
                return list(row.groups)
            raise InspectError(f"node '{row.name}' ({row.op} {row.target}) has no tracked output channels "
                               f"(output {render.format_shape(row.output_shape)}): explain one of its inputs "
                               f"({', '.join(row.inputs) or 'none'}) instead")
        children = [m for m in self._modules if m.startswith(name + ".")]
        if children:
            listed = ", ".join(children[:5]) + (" ..." if len(children) > 5 else "")
            raise InspectError(f"'{name}' is a container module, it has no channels of its own: explain one of its "
                               f"layers, e.g. {listed}")
        raise InspectError(f"{self.name} has no module, group or node named '{name}'{self._closest(name)}")

    def _closest(self, name: str) -> str:
        pool: Iterable[str] = (*self._groups_by_name, *self._modules, *self._layers_by_name)
        close = difflib.get_close_matches(name, list(dict.fromkeys(pool)), n=3, cutoff=0.5)
        return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def inspect(model: nn.Module, example_inputs: Any = None, *, graph: PruneGraph | None = None,
            example_kwargs: dict[str, Any] | None = None, frontend: str = "auto",
            leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None) -> Inspector:
    """Trace ``model`` (or reuse ``graph = prunefx.trace(model, ...)``) and collect, for every
    node and every channel group, shapes, channels, parameters, FLOPs, activation memory and
    why it is pinned. ``example_inputs``, ``example_kwargs`` and ``frontend`` as for
    ``prunefx.trace``.
    """
    model = unwrapped(model, "prunefx.inspect")  # (torch.compile's wrapper: the model inside)
    if graph is None:
        graph = trace(model, example_inputs, example_kwargs=example_kwargs, frontend=frontend,
                      leaf_modules=leaf_modules, concrete_args=concrete_args)
    return Inspector(model, graph)
