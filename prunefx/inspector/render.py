"""Text rendering of the inspector's rows with rich: number formats and tables.

Wide models stay readable: names are shortened from the left (the end of a qualified name
says the most), long tables stop at ``limit`` rows with a line saying how many are left and
how to see them, and ``str()`` renders without colour at a fixed width.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from prunefx.inspector.tables import GroupRow, LayerRow, Totals

__all__ = [
    "human", "human_bytes", "format_shape", "shorten", "state_style", "to_text",
    "summary_table", "groups_table", "layers_table", "reasons_table",
]

NAME_WIDTH = 40
STATE_STYLE = {"prunable": "green", "approximate": "yellow", "pinned": "red"}


def human(n: float | int | None) -> str:
    """1234567 -> '1.23M' (K, M, G, T: powers of 1000)."""
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB' (powers of 1024)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} GiB"


def format_shape(shape: Any) -> str:
    """(1, 64, 8, 8) -> '1×64×8×8'; nested outputs as (a, b); non-tensors as '-'."""
    if shape is None:
        return "-"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {format_shape(v)}" for k, v in shape.items()) + "}"
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return "×".join(str(d) for d in shape) if shape else "scalar"
    return "(" + ", ".join(format_shape(s) for s in shape) + ")"


def shorten(name: str, width: int = NAME_WIDTH) -> str:
    """Cut a long name from the left: 'encoder.layers.encoder_layer_11.mlp.0' -> '…layer_11.mlp.0'."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1:]


def state_style(state: str) -> str:
    return STATE_STYLE.get(state, "")


def to_text(renderable: RenderableType, width: int = 120) -> str:
    """Plain text (no colour) of a rich renderable."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, soft_wrap=False).print(renderable)
    return buf.getvalue().rstrip("\n")


def _more(table: Table, left: int, how: str) -> None:
    if left > 0:
        table.caption = f"… {left} more rows: {how}"


def summary_table(title: str, t: Totals) -> Table:
    table = Table.grid(padding=(0, 2))
    table.title = escape(title)
    table.title_justify = "left"
    table.add_column(style="bold")
    table.add_column()
    table.add_row("nodes / layers", f"{t.nodes} / {t.layers}")
    table.add_row("channel groups", Text.assemble(
        f"{t.groups}: ", (f"{t.exact} prunable", "green"), ", ",
        (f"{t.prunable - t.exact} approximate", "yellow"), ", ", (f"{t.pinned} pinned", "red")))
    table.add_row("channels", f"{t.prunable_channels:,} of {t.channels:,} prunable")
    table.add_row("parameters", f"{t.params:,} ({human(t.params)})")
    table.add_row("FLOPs", f"{t.flops:,} ({human(t.flops)})")
    table.add_row("activations", f"{human_bytes(t.memory)} (sum of node outputs)")
    return table


def groups_table(rows: Sequence[GroupRow], limit: int | None = 25, sort: str = "graph") -> Table:
    """One row per group: size, state, members, FLOPs share, reason."""
    if sort not in ("graph", "flops", "size"):
        raise ValueError(f"sort must be 'graph', 'flops' or 'size', got {sort!r}")
    ordered = list(rows)
    if sort == "flops":
        ordered.sort(key=lambda g: -g.flops)
    elif sort == "size":
        ordered.sort(key=lambda g: -g.size)
    shown = ordered if limit is None else ordered[:limit]
    table = Table(title=f"Channel groups ({len(rows)})", title_justify="left", header_style="bold")
    table.add_column("group", no_wrap=True, min_width=min(NAME_WIDTH, max((len(g.name) for g in shown), default=5)))
    for col in ("size", "state", "members", "modules", "FLOPs share"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True, min_width=max(len(col), 11 if col == "state" else 0))
    table.add_column("reason (report.reasons_table())", overflow="ellipsis", no_wrap=True, max_width=34)
    for g in shown:
        table.add_row(
            escape(shorten(g.name)), str(g.size), Text(g.state, style=state_style(g.state)), str(len(g.members)),
            str(len(g.modules)), f"{g.flops_share:.1%}", escape(g.reason or ""),
        )
    _more(table, len(ordered) - len(shown), "report.groups_table(limit=None)")
    return table


def layers_table(rows: Sequence[LayerRow], limit: int | None = 30, *, all_nodes: bool = False) -> Table:
    """One row per node with a tensor output (every node with ``all_nodes``)."""
    chosen = [r for r in rows if all_nodes or r.is_tensor]
    shown = chosen if limit is None else chosen[:limit]
    table = Table(title=f"Layers ({len(chosen)})", title_justify="left", header_style="bold")
    table.add_column("layer", no_wrap=True)
    table.add_column("op", no_wrap=True)
    table.add_column("input", no_wrap=True)
    table.add_column("output", no_wrap=True)
    table.add_column("ch", justify="right")
    table.add_column("params", justify="right")
    table.add_column("FLOPs", justify="right")
    table.add_column("act.", justify="right")
    table.add_column("group", no_wrap=True)
    for r in shown:
        first_in = next((s for s in r.input_shapes if s is not None), None)
        group = shorten(r.group, 28) + (f" +{len(r.groups) - 1}" if len(r.groups) > 1 else "") if r.group else "-"
        table.add_row(
            escape(shorten(r.label)), escape(shorten(r.kind, 18)), escape(format_shape(first_in)), escape(format_shape(r.output_shape)),
            "-" if r.channels is None else str(r.channels), human(r.params) if r.params else "",
            human(r.flops) if r.flops else "", human_bytes(r.memory) if r.memory else "", escape(group),
        )
    _more(table, len(chosen) - len(shown), "report.layers_table(limit=None)")
    return table


def reasons_table(rows: Iterable[GroupRow], limit: int | None = 10) -> Table:
    """Why groups are pinned or approximate: one line per distinct reason, with its groups."""
    by_reason: dict[str, list[GroupRow]] = {}
    for g in rows:
        if g.reason:
            by_reason.setdefault(g.reason, []).append(g)
    items = sorted(by_reason.items(), key=lambda kv: (kv[1][0].prunable, -len(kv[1])))
    shown = items if limit is None else items[:limit]
    table = Table(title="Why groups are pinned or approximate", title_justify="left", header_style="bold")
    table.add_column("groups", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for reason, groups in shown:
        names = ", ".join(shorten(g.name, 30) for g in groups[:3]) + (f" +{len(groups) - 3}" if len(groups) > 3 else "")
        table.add_row(Text(names, style=state_style(groups[0].state)), escape(reason))
    _more(table, len(items) - len(shown), "report.reasons_table(limit=None)")
    return table


def report_renderable(title: str, t: Totals, groups: Sequence[GroupRow], layers: Sequence[LayerRow], *,
                      group_limit: int | None = 25, layer_limit: int | None = 30, blocks: RenderableType | None = None) -> Group:
    parts: list[RenderableType] = [summary_table(title, t), Text("")]
    if any(g.reason for g in groups):
        parts += [reasons_table(groups), Text("")]
    if blocks is not None:
        parts += [blocks, Text("")]
    if group_limit != 0:
        parts += [groups_table(groups, group_limit), Text("")]
    if layer_limit != 0:
        parts.append(layers_table(layers, layer_limit))
    return Group(*parts)
