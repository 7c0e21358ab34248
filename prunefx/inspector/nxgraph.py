"""``Inspector.to_networkx``: the traced graph as a ``networkx.DiGraph``.

One graph node per fx node (keyed by the fx node name), one edge per data dependency
(``u -> v`` when node ``v`` reads the output of ``u``), so the graph is a DAG in fx order.

Node attributes (every node has all of them):

==========  ================================================================================
op          fx opcode: placeholder, get_attr, call_module, call_function, call_method, output
target      module qualified name, function or method name, or attribute path
kind        module class (``Conv2d``), function (``add``) or method (``flatten``)
shape       output shape as a tuple of ints; a tuple of shapes for a tuple output; None
            for non-tensors and the output node
channels    number of tracked channel indices of the output, or None
group       channel group of the output's first channel, or None
groups      every group of the output's channels (a cat spans several), tuple of str
state       "prunable", "approximate" or "pinned": the state of ``group``, or None
flops       int, FLOPs counted by FlopCounterMode while the node ran
params      int, parameters the node holds (each tensor counted once, at its first use)
memory      int, bytes of the node's output tensors
source      "file.py:line `code`" of the user line that created the node, or None
==========  ================================================================================

Edge attribute ``shape``: the shape of the value flowing along it (the source's ``shape``).
Graph attributes: ``name`` (model class), ``flops``, ``params``, ``memory`` (totals).

Example::

    >>> import networkx as nx, torch, torchvision, prunefx
    >>> g = prunefx.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)).to_networkx()
    >>> nx.is_directed_acyclic_graph(g), g.nodes["layer1_0_conv1"]["group"]
    (True, 'layer1.0.conv1')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx

from prunefx.inspector.tables import GroupRow, LayerRow, Totals

__all__ = ["NODE_ATTRIBUTES", "to_networkx"]

NODE_ATTRIBUTES = ("op", "target", "kind", "shape", "channels", "group", "groups", "state", "flops", "params", "memory", "source")


def to_networkx(name: str, layers: Sequence[LayerRow], groups: Mapping[str, GroupRow], totals: Totals) -> nx.DiGraph:
    g = nx.DiGraph(name=name, flops=totals.flops, params=totals.params, memory=totals.memory)
    for r in layers:
        state = groups[r.group].state if r.group is not None else None
        g.add_node(r.name, op=r.op, target=r.target, kind=r.kind, shape=r.output_shape, channels=r.channels,
                   group=r.group, groups=r.groups, state=state, flops=r.flops, params=r.params, memory=r.memory,
                   source=r.source)
    shapes = {r.name: r.output_shape for r in layers}
    for r in layers:
        for i in r.inputs:
            g.add_edge(i, r.name, shape=shapes.get(i))
    return g
