"""The graph picture: Graphviz DOT source from the inspector's rows, and SVG from ``dot``.

Drawn: every node with a tensor output, and the model output; size arithmetic (``x.shape``,
``getitem`` on sizes) is left out, it carries no channels. Colours: one fill colour per
channel group (the group of the node's first output channel), white for nodes with no
tracked channels. Pinned groups are grey with a dashed red border; approximate groups keep
their colour with a bold amber border. Each SVG node has ``id="n_<fx node name>"`` and a
tooltip (``<title>``) with its op, shape, group and costs.

``dot`` comes from the Debian/Ubuntu package ``graphviz`` (``apt-get install graphviz``);
without it ``render_svg`` returns no picture and says so.

Example::

    >>> import torch, prunefx
    >>> report = prunefx.inspect(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), torch.randn(1, 3, 8, 8))
    >>> report.to_dot().splitlines()[0]
    'digraph prunefx {'
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prunefx.inspector.render import format_shape, human, human_bytes
from prunefx.inspector.tables import GroupRow, LayerRow

__all__ = ["Svg", "to_dot", "render_svg", "group_colors", "is_dense", "drawn", "tooltip", "PINNED_FILL", "INSTALL_HINT"]

# 20 light colours, far enough apart that neighbouring groups are told apart
PALETTE = (
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#bc80bd", "#ccebc5",
    "#ffed6f", "#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#e5c494", "#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3",
)
PINNED_FILL = "#d9d9d9"
PINNED_BORDER = "#b22222"
APPROX_BORDER = "#d48806"
# dot's network simplex and crossing minimisation take minutes on DenseNet-121's 433 nodes
# and 967 edges (every dense layer concatenates all earlier ones); bounded, it takes ~2 s.
FAST_LAYOUT = ", nslimit=0.2, nslimit1=0.2, mclimit=0.05, splines=false"
INSTALL_HINT = "install Graphviz to get the graph picture: apt-get install graphviz (Debian/Ubuntu), brew install graphviz (macOS)"


@dataclass(frozen=True)
class Svg:
    """The rendered picture, or why there is none."""

    svg: str | None
    problem: str | None = None
    seconds: float = 0.0


def group_colors(groups: Sequence[GroupRow]) -> dict[str, str]:
    """Fill colour of each group (pinned groups are grey)."""
    return {g.name: (PINNED_FILL if not g.prunable else PALETTE[i % len(PALETTE)]) for i, g in enumerate(groups)}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def drawn(layers: Sequence[LayerRow]) -> list[LayerRow]:
    """The rows the picture shows."""
    return [r for r in layers if r.is_tensor or r.op == "output"]


def tooltip(r: LayerRow, groups: Mapping[str, GroupRow]) -> str:
    lines = [f"{r.label} ({r.op} {r.target})", f"output {format_shape(r.output_shape)}"]
    if r.channels is not None:
        lines.append(f"channels {r.channels}")
    if r.group:
        g = groups[r.group]
        lines.append(f"group {g.name} ({g.state}, size {g.size})" + (f" +{len(r.groups) - 1} more" if len(r.groups) > 1 else ""))
    if r.params or r.flops:
        lines.append(f"params {human(r.params)}, FLOPs {human(r.flops)}, act. {human_bytes(r.memory)}")
    return "\n".join(lines)


def is_dense(nodes: int, edges: int) -> bool:
    """Graphs that get the bounded layout (straight edges): many fan-ins, or very large."""
    return edges > 1.5 * nodes or nodes > 1500


def to_dot(layers: Sequence[LayerRow], groups: Mapping[str, GroupRow]) -> str:
    colors = group_colors(list(groups.values()))
    rows = drawn(layers)
    shown = {r.name for r in rows}
    edges = [(i, r.name) for r in rows for i in dict.fromkeys(r.inputs) if i in shown]
    out = [
        "digraph prunefx {",
        '  graph [rankdir=TB, nodesep=0.15, ranksep=0.25, bgcolor="transparent", fontname="Helvetica"'
        + (FAST_LAYOUT if is_dense(len(rows), len(edges)) else "") + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, height=0.3, margin="0.08,0.03", '
        'fillcolor="#ffffff", color="#555555"];',
        '  edge [color="#888888", arrowsize=0.5];',
    ]
    for r in rows:
        attrs = {"id": f"n_{r.name}", "tooltip": tooltip(r, groups),
                 "label": f"{r.label}\n{r.kind} {format_shape(r.output_shape)}" if r.op != "output" else "output"}
        g = groups.get(r.group) if r.group else None
        if g is not None:
            attrs["fillcolor"] = colors[g.name]
            if not g.prunable:
                attrs.update(style="rounded,filled,dashed", color=PINNED_BORDER, penwidth="1.6")
            elif not g.exact:
                attrs.update(color=APPROX_BORDER, penwidth="2.2")
        out.append(f"  {_q(r.name)} [" + ", ".join(f"{k}={_q(v)}" for k, v in attrs.items()) + "];")
    out += [f"  {_q(u)} -> {_q(v)};" for u, v in edges]
    out.append("}")
    return "\n".join(out) + "\n"


def render_svg(dot_source: str, timeout: float = 120.0) -> Svg:
    """Run ``dot -Tsvg``; the ``<svg>`` element, or no picture and the reason."""
    import time

    exe = shutil.which("dot")
    if exe is None:
        return Svg(None, f"Graphviz's `dot` is not installed; {INSTALL_HINT}")
    start = time.perf_counter()
    try:
        done = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Svg(None, f"`dot` took longer than {timeout:g} s on this graph; pass a larger timeout to to_html()")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return Svg(None, f"`dot` failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()[:500]}", seconds)
    text = done.stdout.decode("utf-8", errors="replace")
    start_tag = text.find("<svg")
    return Svg(text[start_tag:] if start_tag >= 0 else None, None if start_tag >= 0 else "`dot` returned no <svg>", seconds)
