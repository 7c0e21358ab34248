"""The inspector's data: one row per graph node (``LayerRow``), one per channel group
(``GroupRow``) and the model's ``Totals``, all frozen.

How each column is derived:

- ``channels``: the size of the output's primary channel dim as the channel analysis tracks
  it (dim 1 of a conv output, the last dim of a Linear's or of a token stream; a flatten
  counts C*H*W features); ``None`` when the output has no tracked channel dim.
- ``groups``: the channel groups the output's tracked dims belong to, primary dim first, in
  channel order (a concatenation spans several); ``group`` is the first.
- ``params``: parameters a node holds, each tensor counted once, at its first use (a module
  called twice carries its parameters on the first call only; a ``get_attr`` node carries
  the parameter it reads).
- ``flops`` / ``memory``: see ``prunefx.flops.node_costs``.
- A group's ``layers`` are the nodes holding one of its members (a producer writing its
  channels, a consumer reading them, a norm carrying them); its ``flops`` are those layers'
  FLOPs, the cost that shrinks when the group is pruned. Groups overlap (a conv reads one
  group and writes another), so the shares do not add up to 100%.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from prunefx.analysis.groups import GroupTable
from prunefx.analysis.layout import Layout
from prunefx.flops import NodeCost
from prunefx.graph import PruneGraph

__all__ = ["LayerRow", "GroupRow", "MemberRow", "Totals", "NodeIndex", "build_index", "layer_rows", "group_rows", "totals"]

Shape = Any  # tuple[int, ...] for a tensor, a nested tuple/dict of them, or None


@dataclass(frozen=True)
class LayerRow:
    """One node of the traced graph."""

    name: str  # fx node name (unique)
    label: str  # what tables show: the module's name for a module call ("layer1.0.relu #2" for
    # its second call), else the node name
    op: str  # placeholder, get_attr, call_module, call_function, call_method, output
    target: str  # module qualified name, function or method name, attribute path
    kind: str  # module class (Conv2d), function (add, cat) or method name (flatten)
    inputs: tuple[str, ...]  # names of the nodes it reads
    input_shapes: tuple[Shape, ...]
    output_shape: Shape
    channels: int | None
    params: int
    flops: int
    memory: int  # bytes of the output tensors
    groups: tuple[str, ...]
    source: str | None  # user source line that created the node

    @property
    def group(self) -> str | None:
        """The group of the output's first channel, or None."""
        return self.groups[0] if self.groups else None

    @property
    def is_tensor(self) -> bool:
        return self.output_shape is not None and self.op != "output"


@dataclass(frozen=True)
class MemberRow:
    """A parameter or buffer dim spanned by a group: ``role`` is write (produces the
    channels), read (consumes them) or stat (running statistics, sliced alike)."""

    tensor: str
    dim: int
    role: str


@dataclass(frozen=True)
class GroupRow:
    """One channel group and what it costs."""

    name: str
    size: int
    prunable: bool
    exact: bool
    reason: str | None
    members: tuple[MemberRow, ...]
    modules: tuple[str, ...]  # modules (or top-level tensors) owning a member, in member order
    layers: tuple[str, ...]  # nodes holding a member
    flops: int  # FLOPs of those layers
    flops_share: float  # flops / total FLOPs

    @property
    def state(self) -> str:
        """"prunable", "approximate" (prunable, not exact) or "pinned"."""
        if not self.prunable:
            return "pinned"
        return "prunable" if self.exact else "approximate"


@dataclass(frozen=True)
class Totals:
    """Whole-model numbers."""

    nodes: int
    layers: int  # call_module / call_function / call_method nodes with a tensor output
    groups: int
    prunable: int
    exact: int  # prunable and exact
    pinned: int
    channels: int  # channel slots over all groups
    prunable_channels: int
    params: int  # every parameter of the model, counted once
    flops: int
    memory: int  # bytes of every node output, summed (not a peak)


@dataclass(frozen=True, eq=False)
class NodeIndex:
    """Lookups the inspector needs from the analysis: the group roots each node's output
    holds, and the nodes holding each tensor. Built once per Inspector."""

    roots: dict[fx.Node, np.ndarray]  # union-find roots of the output's channels, primary dim first
    channels: dict[fx.Node, int | None]  # size of the primary channel dim
    groups: GroupTable
    tensor_nodes: dict[str, tuple[fx.Node, ...]]  # canonical tensor name -> nodes holding it

    def groups_of(self, node: fx.Node) -> tuple[str, ...]:
        roots = self.roots.get(node)
        if roots is None or roots.size == 0:
            return ()
        uniq, first = np.unique(roots, return_index=True)
        found = (self.groups.group_of(int(r)) for r in uniq[np.argsort(first)])
        return tuple(dict.fromkeys(g.name for g in found if g is not None))


def _layouts(value: Any) -> Iterator[Layout]:
    if isinstance(value, Layout):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _layouts(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _layouts(v)


def _factors(graph: PruneGraph, node: fx.Node, first_call: bool) -> list[np.ndarray]:
    """Channel ids of the node's output, one array per factor, the *primary* channel dim
    first: the module's output channels for a module's first call (as ``graph.group_of``
    sees them), otherwise the factors from the last dim down (a token stream (N, L, C)
    tracks L too, after a class-token cat, but its channels are C)."""
    factors = sorted((f for lay in _layouts(graph.analysis.layouts.get(node)) for f in lay.factors), key=lambda f: -max(f.dims))
    own = graph.analysis.module_outputs.get(node.target) if first_call else None
    if own is not None:
        factors.sort(key=lambda f: f.ids is not own)
    return [f.ids.ravel() for f in factors]


def _roots(graph: PruneGraph, ids: list[np.ndarray]) -> np.ndarray:
    if not ids:
        return np.zeros(0, dtype=np.int64)
    return graph.analysis.uf.find(np.concatenate(ids))


def _tensor_nodes(graph: PruneGraph) -> dict[str, tuple[fx.Node, ...]]:
    aliases = graph.analysis.aliases
    modules = dict(graph.module.named_modules())
    out: dict[str, list[fx.Node]] = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            names = [n for n, _ in (*m.named_parameters(prefix=node.target, remove_duplicate=False),
                                    *m.named_buffers(prefix=node.target, remove_duplicate=False))]
            for name in names:
                out.setdefault(aliases.get(name, name), []).append(node)
        elif node.op == "get_attr":
            name = aliases.get(str(node.target), str(node.target))
            out.setdefault(name, []).extend([node, *node.users])
    return {k: tuple(dict.fromkeys(v)) for k, v in out.items()}


def build_index(graph: PruneGraph) -> NodeIndex:
    roots, channels, seen = {}, {}, set()
    for node in graph.module.graph.nodes:
        first_call = node.op == "call_module" and node.target not in seen
        seen.add(node.target)
        ids = _factors(graph, node, first_call)
        roots[node] = _roots(graph, ids)
        channels[node] = int(ids[0].size) if ids else None
    return NodeIndex(roots, channels, graph._table, _tensor_nodes(graph))


def _shape(s: Any) -> Shape:
    if isinstance(s, torch.Size):
        return tuple(s)
    if isinstance(s, (list, tuple)):
        return tuple(_shape(v) for v in s)
    if isinstance(s, dict):
        return {k: _shape(v) for k, v in s.items()}
    return None


def _target(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _kind(node: fx.Node, modules: dict[str, torch.nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return {"placeholder": "input", "output": "output", "get_attr": "tensor"}.get(node.op, _target(node))


def layer_rows(graph: PruneGraph, index: NodeIndex, costs: dict[fx.Node, NodeCost]) -> tuple[LayerRow, ...]:
    modules = dict(graph.module.named_modules())
    seen: set[int] = set()  # parameters already counted

    def params_of(node: fx.Node) -> int:
        if node.op == "call_module":
            tensors = list(modules[node.target].parameters())
        elif node.op == "get_attr":
            t = graph.module.get_parameter(node.target) if _is_param(graph, node) else None
            tensors = [t] if t is not None else []
        else:
            return 0
        fresh = [t for t in tensors if id(t) not in seen]
        seen.update(id(t) for t in fresh)
        return sum(t.numel() for t in fresh)

    calls: dict[str, int] = {}
    rows = []
    for node in graph.module.graph.nodes:
        label = node.name
        if node.op == "call_module":
            calls[node.target] = k = calls.get(node.target, 0) + 1
            label = node.target if k == 1 else f"{node.target} #{k}"
        cost = costs.get(node, NodeCost(0, 0))
        loc = graph.traced.sources.get(node)
        inputs = node.all_input_nodes
        rows.append(LayerRow(
            name=node.name, label=label, op=node.op, target=_target(node), kind=_kind(node, modules),
            inputs=tuple(n.name for n in inputs),
            input_shapes=tuple(_shape(graph.shapes.of.get(n)) for n in inputs),
            output_shape=_shape(graph.shapes.of.get(node)) if node.op != "output" else None,
            channels=index.channels[node] if node.op != "output" else None,
            params=params_of(node), flops=cost.flops, memory=cost.memory if node.op != "output" else 0,
            groups=index.groups_of(node) if node.op != "output" else (),
            source=str(loc) if loc is not None else None,
        ))
    return tuple(rows)


def _is_param(graph: PruneGraph, node: fx.Node) -> bool:
    try:
        graph.module.get_parameter(str(node.target))
    except AttributeError:
        return False
    return True


def _owner(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def group_rows(graph: PruneGraph, index: NodeIndex, costs: dict[fx.Node, NodeCost], total_flops: int) -> tuple[GroupRow, ...]:
    rows = []
    for g in graph.groups:
        # the raw members: ChannelGroup.members also builds index maps, which cost ~0.5 s on a ViT
        members = tuple(MemberRow(m.tensor, m.dim, m.role.value) for m, _ in g._members)
        layers = tuple(dict.fromkeys(n for m in members for n in index.tensor_nodes.get(m.tensor, ())))
        flops = sum(costs[n].flops for n in layers if n in costs)
        rows.append(GroupRow(
            name=g.name, size=g.size, prunable=g.prunable, exact=g.exact, reason=g.reason, members=members,
            modules=tuple(dict.fromkeys(_owner(m.tensor) for m in members)),
            layers=tuple(n.name for n in layers), flops=flops, flops_share=flops / total_flops if total_flops else 0.0,
        ))
    return tuple(rows)


def totals(layers: tuple[LayerRow, ...], groups: tuple[GroupRow, ...], params: int) -> Totals:
    prunable = [g for g in groups if g.prunable]
    return Totals(
        nodes=len(layers),
        layers=sum(r.op.startswith("call_") and r.output_shape is not None for r in layers),
        groups=len(groups), prunable=len(prunable), exact=sum(g.exact for g in prunable),
        pinned=len(groups) - len(prunable),
        channels=sum(g.size for g in groups), prunable_channels=sum(g.size for g in prunable),
        params=params,
        flops=sum(r.flops for r in layers), memory=sum(r.memory for r in layers),
    )

