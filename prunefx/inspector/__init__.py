"""The graph inspector: see the groups, the costs and the reasons (``prunefx.inspect``).

One concern per file:

- ``costs.py``: per-node FLOPs (FlopCounterMode, node by node) and activation bytes;
- ``tables.py``: the frozen rows: ``LayerRow``, ``GroupRow``, ``Totals``;
- ``render.py``: rich tables and number formats;
- ``explain.py``: the coupling path of a group (``Explanation``);
- ``compare.py``: before/after a mask (``Comparison``);
- ``nxgraph.py``: the networkx view;
- ``graphviz.py`` and ``html.py``: the graph picture and the HTML page;
- ``report.py``: ``inspect`` and the ``Inspector`` tying them together.
"""

from prunefx.inspector.compare import Comparison, Delta, LayerChange
from prunefx.inspector.explain import Explanation, Step
from prunefx.inspector.nxgraph import NODE_ATTRIBUTES
from prunefx.inspector.report import InspectError, Inspector, inspect
from prunefx.inspector.tables import GroupRow, LayerRow, MemberRow, Totals

__all__ = [
    "inspect", "Inspector", "InspectError", "LayerRow", "GroupRow", "MemberRow", "Totals", "Explanation", "Step",
    "Comparison", "Delta", "LayerChange", "NODE_ATTRIBUTES",
]
