"""``Inspector.explain(name)``: why a module's channels are coupled to others, or pinned.

The rule: a group's channels flow along the graph from the nodes that produce them (a conv
writing its output rows) through pass-through ops (norms, activations, pools, reshapes) to
the nodes that read them (a conv's input columns). Channels of *different* producers become
one group at the nodes that force them to stay aligned; those are the coupling steps:

- ``unites``: an elementwise op (add, mul, where, ...) with two inputs carrying the group:
  a residual add makes the block's output and its shortcut one channel set;
- ``concatenates``: a cat that carries the group on together with other channels, so every
  reader of the cat reads this group at an offset (DenseNet's dense connections);
- ``ties``: a grouped or depthwise convolution, whose output group k reads input group k;
- ``shared``: a module with parameters called more than once, whose parameters hold every
  call's channels.

The notes that pin the group (``pins``: the node and source line of e.g. "model output", an
op with no channel rule) or make it approximate (``approximates``: a LayerNorm or softmax
over the channels) come from the channel analysis.

Example::

    >>> import torch, torchvision, prunefx
    >>> report = prunefx.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> why = report.explain("layer1.0.conv2")
    >>> [s.target for s in why.couplings]
    ['add', 'add']
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from prunefx.analysis.propagate import Note
from prunefx.graph import PruneGraph
from prunefx.inspector.render import shorten, state_style, to_text
from prunefx.inspector.tables import GroupRow, NodeIndex

__all__ = ["Step", "Explanation", "explain_group", "COUPLING_ROLES"]

COUPLING_ROLES = ("unites", "concatenates", "ties", "shared")
_CAT = (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack)
_ELEMENTWISE = {operator.add: "adds", operator.iadd: "adds", torch.add: "adds", operator.mul: "multiplies",
                operator.imul: "multiplies", torch.mul: "multiplies", operator.sub: "subtracts", torch.sub: "subtracts"}


@dataclass(frozen=True)
class Step:
    """One node on the group's path. ``role`` is produces, passes, unites, concatenates,
    ties, shared, reads (from the data flow), or pins / approximates (analysis notes)."""

    node: str
    op: str
    target: str
    role: str
    detail: str
    inputs: tuple[str, ...]  # input nodes carrying the group's channels
    source: str | None  # user source line

    @property
    def couples(self) -> bool:
        return self.role in COUPLING_ROLES

    def __str__(self) -> str:
        where = f"  at {self.source}" if self.source else ""
        return f"{self.role:12} {self.node} ({self.op} {self.target}): {self.detail}{where}"


@dataclass(frozen=True)
class Explanation:
    """Why the channels of ``query`` are coupled or pinned. ``str()`` reads as a report;
    the fields hold the same facts as data."""

    query: str
    group: GroupRow
    other_groups: tuple[str, ...]  # further groups of the query's output (after a split)
    steps: tuple[Step, ...]  # every node on the group's path, graph order
    notes: tuple[Step, ...]  # what pins the group or makes it approximate

    @property
    def couplings(self) -> tuple[Step, ...]:
        """The steps that join this group's channels to other modules' (see module doc)."""
        return tuple(s for s in self.steps if s.couples)

    @property
    def producers(self) -> tuple[Step, ...]:
        """The steps that write the group's channels first (a conv, a Linear, a parameter)."""
        return tuple(s for s in self.steps if s.role == "produces")

    @property
    def readers(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.role == "reads")

    @property
    def coupled_modules(self) -> tuple[str, ...]:
        """Other modules holding a member of the group."""
        own = self.query
        return tuple(m for m in self.group.modules if m != own)

    def chain_table(self, limit: int | None = None) -> Table:
        """Every step, graph order."""
        table = Table(title=f"Path of group '{escape(self.group.name)}'", title_justify="left", header_style="bold")
        for col in ("role", "node", "op", "detail", "source"):
            table.add_column(col, overflow="fold", no_wrap=col in ("role", "node"))
        shown = self.steps if limit is None else self.steps[:limit]
        for s in shown:
            table.add_row(Text(s.role, style="bold" if s.couples else ""), escape(shorten(s.node, 32)), escape(shorten(s.target, 24)),
                          escape(s.detail), escape(s.source or ""))
        if len(shown) < len(self.steps):
            table.caption = f"… {len(self.steps) - len(shown)} more steps: explanation.chain_table(limit=None)"
        return table

    def __rich__(self) -> RenderableType:
        g = self.group
        head = Text.assemble(
            (self.query, "bold"), " -> group ", (f"'{g.name}'", "bold"), f": {g.size} channels, ",
            (g.state, state_style(g.state)), f"; {len(g.members)} members in {len(g.modules)} modules, ",
            f"{g.flops_share:.1%} of the FLOPs",
        )
        parts: list[RenderableType] = [head]
        if self.other_groups:
            parts.append(Text(f"  (its output also spans {', '.join(self.other_groups)})"))
        for s in self.notes:
            parts.append(Text.assemble((f"  {s.role} by ", state_style(g.state)), f"{s.node}: {s.detail}",
                                       f"\n    at {s.source}" if s.source else ""))
        if g.reason and not self.notes:
            parts.append(Text(f"  {g.reason}"))
        if self.producers:
            parts.append(Text("  produced by: " + ", ".join(_label(s) for s in self.producers)))
        if self.couplings:
            parts.append(Text("  coupled by:"))
            for s in self.couplings:
                parts.append(Text.assemble("    ", (f"{s.role} ", "bold"), f"{s.node} ({s.target}): {s.detail}",
                                           f"\n      at {s.source}" if s.source else ""))
        else:
            parts.append(Text("  coupled by: nothing (no add, cat, grouped conv or shared module joins it to other channels)"))
        if self.readers:
            names = [_label(s) for s in self.readers]
            parts.append(Text("  read by: " + ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")))
        if self.coupled_modules:
            mods = self.coupled_modules
            parts.append(Text("  modules in the group: " + ", ".join(mods[:10]) + (f" and {len(mods) - 10} more" if len(mods) > 10 else "")))
        return Group(*parts)

    def __str__(self) -> str:
        return to_text(self.__rich__(), width=160)


def _label(s: Step) -> str:
    return s.target if s.op == "call_module" else s.node


def _target(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _notes(graph: PruneGraph, slots: np.ndarray, notes: Sequence[Note], role: str) -> list[Step]:
    out: dict[tuple[str, str], Step] = {}
    for note in notes:
        if not np.isin(graph.analysis.uf.find(note.ids), slots).any():
            continue
        node = note.node
        name = node.name if node is not None else "model"
        key = (name, note.why)
        if key not in out:
            loc = graph.traced.sources.get(node) if node is not None else None
            out[key] = Step(name, node.op if node is not None else "-", _target(node) if node is not None else "-",
                            role, note.why, (), str(loc) if loc is not None else None)
    return list(out.values())


def explain_group(graph: PruneGraph, index: NodeIndex, group: GroupRow, query: str, other_groups: tuple[str, ...] = ()) -> Explanation:
    """The path of ``group`` through ``graph`` and what pins it (see the module doc)."""
    g = next(x for x in graph.groups if x.name == group.name)
    slots = g.slots
    carries = {n: bool(np.isin(r, slots).any()) for n, r in index.roots.items()}
    writers: set[fx.Node] = set()
    readers: set[fx.Node] = set()
    for m in group.members:
        holders = index.tensor_nodes.get(m.tensor, ())
        (writers if m.role != "read" else readers).update(holders)
    modules = dict(graph.module.named_modules())
    calls: dict[str, int] = {}
    for n in graph.module.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    steps: list[Step] = []
    for node in graph.module.graph.nodes:
        if node.op == "output":
            continue
        ins = tuple(x for x in node.all_input_nodes if carries.get(x))
        role, detail = _classify(node, ins, carries.get(node, False), node in writers, node in readers, modules, calls)
        if role is None:
            continue
        loc = graph.traced.sources.get(node)
        steps.append(Step(node.name, node.op, _target(node), role, detail, tuple(x.name for x in ins),
                          str(loc) if loc is not None else None))
    notes = _notes(graph, slots, graph.analysis.pins, "pinned") + _notes(graph, slots, graph.analysis.inexact, "approximate")
    return Explanation(query, group, other_groups, tuple(steps), tuple(notes))


def _classify(node: fx.Node, ins: tuple[fx.Node, ...], carries: bool, writes: bool, reads: bool,
              modules: dict, calls: dict[str, int]) -> tuple[str | None, str]:
    names = " + ".join(x.name for x in ins)
    if carries:
        if node.op == "call_module" and calls.get(node.target, 0) > 1 and (writes or reads):
            return "shared", f"{type(modules[node.target]).__name__} called {calls[node.target]} times: every call's channels share its parameters"
        if node.op == "call_function" and node.target in _CAT:
            others = [x.name for x in node.all_input_nodes if x not in ins]
            with_ = f" with {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}" if others else " with itself"
            return "concatenates", f"joins {names}{with_}: readers of the result read these channels at an offset"
        if len(ins) >= 2:
            verb = _ELEMENTWISE.get(node.target, "combines") if node.op == "call_function" else "combines"
            return "unites", f"{verb} {names}: their channels must stay aligned, so they form one group"
        mod = modules.get(node.target) if node.op == "call_module" else None
        if ins and isinstance(mod, torch.nn.modules.conv._ConvNd) and mod.groups > 1:
            return "ties", f"{type(mod).__name__} with groups={mod.groups}: output group k reads input group k"
        if not ins:
            if node.op == "get_attr":
                return "produces", "a parameter or buffer added to the channels"
            return "produces", (f"{type(mod).__name__} writes these channels" if mod is not None else "writes these channels")
        return "passes", (type(mod).__name__ if mod is not None else _target(node)) + (" (scales them)" if writes else "")
    if ins and (reads or writes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        return "reads", f"{type(mod).__name__ if mod is not None else _target(node)} reads these channels"
    return None, ""
