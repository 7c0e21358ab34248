"""``Inspector.compare``: what a mask did, layer by layer and in total.

The rule: both models are inspected on the same example inputs and their rows are matched by
fx node name (the reconfigured GraphModule keeps the traced model's code, so its nodes keep
their names); a node present on one side only is shown with ``-`` on the other.

Example::

    >>> import torch, torchvision, prunefx
    >>> model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    >>> report = prunefx.inspect(model, x)
    >>> diff = report.compare(prunefx.masks.magnitude(report.graph, 0.5))
    >>> diff.flops.after < diff.flops.before
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from torch import nn

from prunefx.inspector.render import human, human_bytes, shorten, to_text
from prunefx.inspector.tables import LayerRow, Totals

__all__ = ["Delta", "LayerChange", "Comparison", "compare_rows"]


@dataclass(frozen=True)
class Delta:
    """A number before and after (None where the node does not exist or has no value)."""

    before: int | None
    after: int | None

    @property
    def ratio(self) -> float | None:
        """after / before, or None when either is missing or before is 0."""
        if self.before is None or self.after is None or self.before == 0:
            return None
        return self.after / self.before

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def text(self, fmt=human) -> str:
        """'64 → 32', or '64' when unchanged."""
        a, b = fmt(self.before), fmt(self.after)
        return a if not self.changed else f"{a} → {b}"


@dataclass(frozen=True)
class LayerChange:
    """One node before and after."""

    name: str  # fx node name
    layer: str  # module qualified name for module calls, else the node name
    kind: str
    channels: Delta
    params: Delta
    flops: Delta
    memory: Delta

    @property
    def changed(self) -> bool:
        return any(d.changed for d in (self.channels, self.params, self.flops, self.memory))


@dataclass(frozen=True, eq=False)
class Comparison:
    """Before/after numbers for a reconfigured model (``small``)."""

    before: Totals
    after: Totals
    layers: tuple[LayerChange, ...]
    small: nn.Module

    @property
    def params(self) -> Delta:
        return Delta(self.before.params, self.after.params)

    @property
    def flops(self) -> Delta:
        return Delta(self.before.flops, self.after.flops)

    @property
    def memory(self) -> Delta:
        return Delta(self.before.memory, self.after.memory)

    @property
    def channels(self) -> Delta:
        """Channel slots over all groups."""
        return Delta(self.before.channels, self.after.channels)

    def layer(self, name: str) -> LayerChange:
        """The change of node or module ``name``."""
        for c in self.layers:
            if name in (c.name, c.layer):
                return c
        raise KeyError(f"no layer or node named {name!r} in the comparison")

    def totals_table(self) -> Table:
        table = Table(title="Before → after", title_justify="left", header_style="bold")
        for col in ("", "before", "after", "ratio"):
            table.add_column(col, justify="right" if col else "left")
        for label, d, fmt in (("parameters", self.params, human), ("FLOPs", self.flops, human),
                              ("activations", self.memory, human_bytes), ("channel slots", self.channels, human)):
            r = d.ratio
            table.add_row(label, fmt(d.before), fmt(d.after), "-" if r is None else f"{r:.1%}")
        return table

    def table(self, limit: int | None = 30, *, changed_only: bool = True) -> Table:
        """Per-layer before → after (only the layers that changed, by default)."""
        rows = [c for c in self.layers if c.changed or not changed_only]
        shown = rows if limit is None else rows[:limit]
        table = Table(title=f"Layers{' that changed' if changed_only else ''} ({len(rows)})", title_justify="left", header_style="bold")
        table.add_column("layer", no_wrap=True)
        table.add_column("op", no_wrap=True)
        for col in ("channels", "params", "FLOPs", "FLOPs kept", "act."):
            table.add_column(col, justify="right", no_wrap=True)
        for c in shown:
            kept = c.flops.ratio
            table.add_row(escape(shorten(c.layer)), escape(shorten(c.kind, 16)), c.channels.text(), c.params.text(), c.flops.text(),
                          "" if kept is None or not c.flops.changed else f"{kept:.0%}", c.memory.text(human_bytes))
        if len(shown) < len(rows):
            table.caption = f"… {len(rows) - len(shown)} more rows: comparison.table(limit=None)"
        return table

    def __rich__(self) -> RenderableType:
        return Group(self.totals_table(), Text(""), self.table())

    def __str__(self) -> str:
        return to_text(self.__rich__())

    def __repr__(self) -> str:
        r = self.flops.ratio
        return f"Comparison(params {self.params.before:,} -> {self.params.after:,}, FLOPs {self.flops.before:,} -> {self.flops.after:,}" + (f" ({r:.1%}))" if r is not None else ")")


def compare_rows(before: tuple[LayerRow, ...], after: tuple[LayerRow, ...], tb: Totals, ta: Totals, small: nn.Module) -> Comparison:
    """Match ``before`` and ``after`` rows by node name (nodes with a tensor output only)."""
    b = {r.name: r for r in before if r.is_tensor}
    a = {r.name: r for r in after if r.is_tensor}
    changes = []
    for name in [*b, *(n for n in a if n not in b)]:
        x, y = b.get(name), a.get(name)
        ref = x if x is not None else y
        assert ref is not None
        changes.append(LayerChange(
            name=name, layer=ref.label, kind=ref.kind,
            channels=Delta(x.channels if x else None, y.channels if y else None),
            params=Delta(x.params if x else None, y.params if y else None),
            flops=Delta(x.flops if x else None, y.flops if y else None),
            memory=Delta(x.memory if x else None, y.memory if y else None),
        ))
    return Comparison(tb, ta, tuple(changes), small)
