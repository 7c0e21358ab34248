"""Stage 3 of the pipeline: channel analysis.

Every channel slot gets an integer id. Walking the graph in order, an explicit per-op rule
table (``prunefx.analysis.rules``) maps the ids of each node's inputs to the ids of its output
(concat joins id lists, split/slicing cut them, flatten repeats each id H*W times, permutes
permute them) and *unites* ids that must stay aligned (residual add/mul with broadcasting, a
module called twice, depthwise conv in/out) in a union-find. A rule that cannot map an input
*pins* its ids, with a reason naming the node and its source line: nothing unknown is ever
passed through.

Parameters and buffers are *members*: (tensor, dim, ids along that dim, role). After the
walk, channel groups fall out as the classes that share the same set of members
(``prunefx.analysis.groups``).

The result is an immutable ``ChannelAnalysis``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from prunefx.analysis.layout import Factor, Layout, reshape_blocks
from prunefx.analysis.unionfind import UnionFind
from prunefx.shapes import Shapes
from prunefx.tracing import Traced

__all__ = ["Role", "Member", "Note", "ChannelAnalysis", "Analyzer", "analyze", "empty_like_shape"]


class Role(enum.Enum):
    WRITE = "write"  # zeroing it zeroes the channel (conv out-dim, bias, BN affine, layer scale)
    READ = "read"  # it consumes the channel (conv/linear in-dim)
    STAT = "stat"  # sliced with the channel but not zeroed by apply_mask (running stats)


@dataclass(frozen=True, eq=False)
class Member:
    tensor: str  # canonical qualified name of a parameter or buffer
    dim: int
    ids: np.ndarray  # 1-D: channel id at each index along `dim`
    role: Role
    node: fx.Node  # first node that touched it


@dataclass(frozen=True, eq=False)
class Note:
    """Why some ids are pinned, or why removing them is not exact."""

    ids: np.ndarray
    node: fx.Node | None
    why: str


@dataclass(frozen=True, eq=False)
class ChannelAnalysis:
    traced: Traced
    shapes: Shapes
    uf: UnionFind
    layouts: Mapping[fx.Node, Any]  # Layout, None (non-tensor) or a nested aggregate of them
    members: tuple[Member, ...]
    pins: tuple[Note, ...]
    inexact: tuple[Note, ...]
    module_outputs: Mapping[str, np.ndarray]  # module name -> ids of its output channels
    aliases: Mapping[str, str]  # every parameter/buffer name -> canonical name
    sources: Mapping[str, Any] = field(default_factory=dict)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return self.uf.find(ids)


Rule = Callable[["Analyzer", fx.Node], Any]


class Analyzer:
    """Mutable state of one analysis run; rules call its methods."""

    def __init__(self, traced: Traced, shapes: Shapes) -> None:
        self.traced = traced
        self.shapes = shapes
        self.modules = traced.modules
        self.uf = UnionFind()
        self.layouts: dict[fx.Node, Any] = {}
        self._members: dict[tuple[str, int], Member] = {}
        self._tensor_ids: dict[tuple[str, int], np.ndarray] = {}
        self.pins: list[Note] = []
        self.inexacts: list[Note] = []
        self.grids: list[Factor] = []
        self.module_outputs: dict[str, np.ndarray] = {}
        named = traced.named_tensors()
        self.aliases = _aliases(named)
        self._tensors = dict(named)

    # ---- reading the graph -------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]  # type: ignore[index]

    def value(self, arg: Any) -> Any:
        """Layout (or aggregate of layouts) of a node argument; None for non-tensors."""
        if isinstance(arg, fx.Node):
            return self.layouts.get(arg)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg) if not hasattr(arg, "_fields") else tuple(self.value(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.value(v) for k, v in arg.items()}
        return None

    def shape(self, arg: Any) -> Any:
        return self.shapes[arg] if isinstance(arg, fx.Node) else None

    def where(self, node: fx.Node | None) -> str:
        return self.traced.where(node) if node is not None else "model"

    # ---- ids -----------------------------------------------------------------
    def fresh(self, count: int) -> np.ndarray:
        return self.uf.fresh(count)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union(a, b)

    def pin(self, ids: np.ndarray | None, node: fx.Node | None, why: str) -> None:
        if ids is not None and np.size(ids):
            self.pins.append(Note(np.asarray(ids).ravel(), node, why))

    def pin_value(self, value: Any, node: fx.Node | None, why: str) -> None:
        for lay in _layouts_in(value):
            for f in lay.factors:
                self.pin(f.ids, node, why)

    def mark_inexact(self, ids: np.ndarray | None, node: fx.Node | None, why: str) -> None:
        if ids is not None and np.size(ids):
            self.inexacts.append(Note(np.asarray(ids).ravel(), node, why))

    def lookup(self, tensor: str) -> torch.Tensor:
        """The parameter or buffer called ``tensor`` (in any traced graph)."""
        return self._tensors[tensor]

    def persistent(self, tensor: str) -> bool:
        """Whether ``tensor`` is a parameter or a buffer saved in the state_dict."""
        owner, _, leaf = tensor.rpartition(".")
        module = self.modules.get(owner)
        return module is None or leaf not in module._non_persistent_buffers_set

    def canonical(self, tensor: str) -> str:
        return self.aliases.get(tensor, tensor)

    def tensor_ids(self, tensor: str, dim: int, size: int) -> np.ndarray:
        """Persistent ids of ``tensor``'s ``dim`` (the same on every call and every alias)."""
        key = (self.canonical(tensor), dim)
        ids = self._tensor_ids.get(key)
        if ids is None:
            ids = self._tensor_ids[key] = self.fresh(size)
        return ids

    def member(self, tensor: str, dim: int, ids: np.ndarray, role: Role, node: fx.Node) -> None:
        """Record that index i of ``tensor``'s ``dim`` holds channel ``ids[i]``."""
        key = (self.canonical(tensor), dim)
        old = self._members.get(key)
        if old is None:
            self._members[key] = Member(key[0], dim, np.asarray(ids), role, node)
            return
        self.unify(old.ids, ids)  # the same tensor seen twice (shared module, tied weight)
        if role is Role.WRITE and old.role is not Role.WRITE:
            self._members[key] = Member(old.tensor, dim, old.ids, Role.WRITE, old.node)

    def forget(self, tensor: str, dims: Iterable[int]) -> None:
        """No member for these dims of ``tensor``: the only op reading it treats them as fixed
        sizes, never channels (a convolution's kernel), so they form no group of their own.
        Their ids stay (pinned by that op)."""
        for d in dims:
            self._members.pop((self.canonical(tensor), d), None)

    def set_role(self, tensor: str, dim: int, role: Role) -> None:
        key = (self.canonical(tensor), dim)
        old = self._members.get(key)
        if old is not None:
            self._members[key] = Member(old.tensor, dim, old.ids, role, old.node)

    def param_layout(self, tensor: str, node: fx.Node, roles: Mapping[int, Role]) -> Layout:
        """Layout of a parameter/buffer: one factor per dim of size > 1 listed in ``roles``;
        dims not listed carry no ids (fixed size)."""
        t = self.lookup(tensor)
        factors = []
        for d, role in sorted(roles.items()):
            if t.shape[d] > 1 or len(roles) == 1:
                ids = self.tensor_ids(tensor, d, t.shape[d])
                self.member(tensor, d, ids, role, node)
                factors.append(Factor((d,), ids))
        return Layout(tuple(factors), True)

    # ---- layout algebra ----------------------------------------------------
    def simplify(self, f: Factor) -> Factor:
        """Drop axes along which all ids are in one class; keep at least one axis."""
        if len(f.dims) == 1 or f.ids.size == 0:  # an empty slice (Phi-3's q[..., rotary_dim:]) stays as it is
            return f
        roots = self.uf.find(f.ids)
        keep = [k for k in range(roots.ndim) if not _constant_along(roots, k)]
        if not keep:
            keep = [next((k for k in range(roots.ndim) if roots.shape[k] > 1), 0)]
        if len(keep) < roots.ndim:
            index = tuple(slice(None) if k in keep else 0 for k in range(roots.ndim))
            roots = roots[index]
        out = Factor(tuple(f.dims[k] for k in keep), roots)
        if len(out.dims) > 1:
            self.grids.append(out)
        return out

    def axis_ids(self, lay: Layout | None, dim: int) -> np.ndarray | None:
        """1-D ids along ``dim``; a grid factor is collapsed (each slice along ``dim`` becomes
        one class) so that a per-channel parameter can index it."""
        f = lay.on(dim) if lay is not None else None
        if f is None:
            return None
        if len(f.dims) == 1:
            return f.ids
        rows = np.moveaxis(f.ids, f.axis(dim), 0).reshape(f.ids.shape[f.axis(dim)], -1)
        self.unify(rows[:, :1], rows)
        return self.uf.find(rows[:, 0])

    def drop_dim(self, lay: Layout, dim: int) -> tuple[Layout, np.ndarray | None]:
        """Remove ``dim`` from the layout (a contraction over it). Returns the layout of the
        remaining dims (not renumbered) and the 1-D ids along ``dim``."""
        f = lay.on(dim)
        if f is None:
            return lay, None
        rest = [g for g in lay.factors if g is not f]
        if len(f.dims) == 1:
            return Layout(tuple(rest), lay.zero), f.ids
        k = f.axis(dim)
        moved = np.moveaxis(f.ids, k, -1)
        self.unite_lines(f.ids, [k])  # every slice along the other dims becomes one class
        along = self.uf.find(np.moveaxis(f.ids, k, 0).reshape(f.ids.shape[k], -1)[:, 0])
        kept = self.simplify(Factor(tuple(d for d in f.dims if d != dim), self.uf.find(moved[..., 0])))
        return Layout((*rest, kept), lay.zero), along

    def broadcast(self, node: fx.Node, operands: Sequence[tuple[Layout, Sequence[int]]], out_shape: Sequence[int]) -> tuple[Factor, ...]:
        """Factors of an elementwise result: ids meeting on a dim are united; ids meeting a
        fixed-size (id-less) dim of another operand are pinned."""
        nd = len(out_shape)
        aligned: list[tuple[Layout, tuple[int, ...]]] = []
        for lay, shp in operands:
            off = nd - len(shp)
            if off:
                lay = lay.shift({d: d + off for d in lay.dims})
            aligned.append((lay, (1,) * off + tuple(shp)))
        fixed = {d for d in range(nd) if out_shape[d] > 1 and any(shp[d] > 1 and lay.on(d) is None for lay, shp in aligned)}
        comps: list[tuple[set[int], list[Factor]]] = []
        for lay, _ in aligned:
            for f in lay.factors:
                if not self._hold_fixed(f, fixed & set(f.dims), node):
                    continue  # pinned to a fixed size: the result's dim carries no ids
                dims = set(f.dims)
                hit = [c for c in comps if c[0] & dims]
                for c in hit:
                    comps.remove(c)
                    dims |= c[0]
                comps.append((dims, [f] + [g for c in hit for g in c[1]]))
        out = []
        for dims, facs in comps:
            u = sorted(dims)
            grids = [_expand(f, u, out_shape) for f in facs]
            for g in grids[1:]:
                self.unify(grids[0], g)
            out.append(self.simplify(Factor(tuple(u), np.ascontiguousarray(grids[0]))))
        return tuple(sorted(out, key=lambda f: f.dims))

    def _hold_fixed(self, f: Factor, fixed: set[int], node: fx.Node) -> bool:
        """``f`` meets tensors of a fixed size along ``fixed``: those dims cannot shrink. A
        factor on those dims only is pinned; a grid (heads x head_dim, say) keeps its other
        dims prunable by uniting each line along the fixed dims (a head is kept or removed
        whole, so the head dim keeps its size: rotary tables, per-position scales). Returns
        whether the factor still carries channels."""
        if not fixed:
            return True
        d = min(fixed)
        if fixed == set(f.dims):
            self.pin(f.ids, node, f"combined with a fixed-size tensor along dim {d}")
            return False
        self.unite_lines(f.ids, [f.axis(k) for k in sorted(fixed)])
        return True

    def unite_lines(self, ids: np.ndarray, axes: Sequence[int]) -> None:
        """Unite the ids of each line along ``axes`` of a grid (one line per index of its
        other axes): a head kept or removed whole, so those axes never change size."""
        lines = np.moveaxis(ids, list(axes), list(range(-len(axes), 0))).reshape(-1, int(np.prod([ids.shape[a] for a in axes])))
        self.unify(lines[:, :1], lines)

    def reshape(self, node: fx.Node, lay: Layout, src: Sequence[int], dst: Sequence[int]) -> Layout:
        """Layout after a reshape that keeps element order (view, flatten, squeeze, ...)."""
        blocks = reshape_blocks(list(src), list(dst))
        owner = {d: b for b, (ins, _) in enumerate(blocks) for d in ins}
        spans: list[list[int]] = []  # merged block ranges that factors span
        for f in lay.factors:
            lo, hi = min(owner[d] for d in f.dims), max(owner[d] for d in f.dims)
            for s in [s for s in spans if not (s[1] < lo or s[0] > hi)]:
                spans.remove(s)
                lo, hi = min(lo, s[0]), max(hi, s[1])
            spans.append([lo, hi])
        out: list[Factor] = []
        for lo, hi in sorted(spans):
            ins = [d for b in range(lo, hi + 1) for d in blocks[b][0]]
            outs = [d for b in range(lo, hi + 1) for d in blocks[b][1]]
            facs = [f for f in lay.factors if f.dims[0] in ins]
            for extra in facs[1:]:
                self.pin(extra.ids, node, "reshape merges two independent channel dims")
            if not outs:
                self.pin(facs[0].ids, node, "reshape removes a channel dim")
                continue
            grid = _expand(facs[0], ins, src).reshape([dst[d] for d in outs])
            out.append(self.simplify(Factor(tuple(outs), np.ascontiguousarray(grid))))
        return Layout(tuple(out), lay.zero)

    def force_products(self) -> None:
        """Make every grid factor vary along at most one axis, so that any mask keeps a
        product of index sets (a reshape of the pruned tensor stays valid). A grid still
        varying along several axes is united along all but its innermost varying axis
        (the channel-shuffle constraint: the same column of every group goes together)."""
        for f in self.grids:
            roots = self.uf.find(f.ids)
            varying = [k for k in range(roots.ndim) if not _constant_along(roots, k)]
            if len(varying) > 1:
                inner = varying[-1]
                cols = np.moveaxis(f.ids, inner, -1).reshape(-1, f.ids.shape[inner])
                self.unify(cols[:1], cols)

    # ---- result ------------------------------------------------------------
    def finish(self) -> ChannelAnalysis:
        self.force_products()
        return ChannelAnalysis(
            traced=self.traced,
            shapes=self.shapes,
            uf=self.uf,
            layouts=self.layouts,
            members=tuple(self._members.values()),
            pins=tuple(self.pins),
            inexact=tuple(self.inexacts),
            module_outputs=self.module_outputs,
            aliases=self.aliases,
            sources=self.traced.sources,
        )


def _aliases(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in named_tensors}


def _constant_along(a: np.ndarray, axis: int) -> bool:
    return a.shape[axis] <= 1 or bool((a == a.take([0], axis=axis)).all())


def _expand(f: Factor, dims: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The factor's ids broadcast over ``dims`` (sizes taken from ``shape``)."""
    view = [f.ids.shape[f.axis(d)] if d in f.dims else 1 for d in dims]
    return np.broadcast_to(f.ids.reshape(view), [shape[d] for d in dims])


def _layouts_in(value: Any) -> list[Layout]:
    if isinstance(value, Layout):
        return [value]
    if isinstance(value, (list, tuple)):
        return [lay for v in value for lay in _layouts_in(v)]
    if isinstance(value, dict):
        return [lay for v in value.values() for lay in _layouts_in(v)]
    return []


def empty_like_shape(shape: Any, zero: bool = False) -> Any:
    """A fixed-size (id-less) layout for every tensor in a shape tree."""
    if isinstance(shape, torch.Size):
        return Layout((), zero)
    if isinstance(shape, (list, tuple)):
        return tuple(empty_like_shape(s, zero) for s in shape)
    if isinstance(shape, dict):
        return {k: empty_like_shape(v, zero) for k, v in shape.items()}
    return None


def analyze(traced: Traced, shapes: Shapes) -> ChannelAnalysis:
    """Run every rule over the graph, in order."""
    from prunefx.analysis import rules  # the rule table imports this module

    a = Analyzer(traced, shapes)
    for node in traced.nodes():  # both train/eval graphs share one union-find
        a.layouts[node] = rules.apply(a, node)
    return a.finish()

