"""FixShapeArgs: rewrite constants in node arguments that encode channel counts.

Symbolic tracing freezes attributes read in ``forward`` into literals (``x.view(-1, self.c)``,
``torch.split(x, [16, 16], 1)``, ``F.conv2d(..., groups=self.g)``). Each literal that names a
size of a pruned dim is recomputed from the plan:

    view/reshape/expand sizes   -> new output size of that dim (-1 and dynamic sizes untouched)
    split/chunk                 -> torch.split with the new size of every piece
    x[..., a:b] / x[..., i]     -> a' = #kept before a, b' = #kept before b, i' = #kept before i
    narrow(d, s, n)             -> s' = #kept before s, n' = #kept in [s, s + n)
    F.conv*(groups=g)           -> g' = C_out' / (C_out / g)
    F.group_norm(G)             -> G' = C' / (C / G)
    F.layer_norm(shape)         -> the new trailing sizes
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from prunefx import nn as pnn
from prunefx import ops
from prunefx.passes.base import Pass, RewriteState
from prunefx.passes.size_values import SizeValues

__all__ = [
    "FixShapeArgs", "size_list", "unflatten", "split_args", "getitem", "narrow", "conv_groups", "group_norm",
    "layer_norm", "window_attention", "select_args", "slice_args", "attention_scale", "size_args", "is_shape",
]


def size_args(args: Sequence[Any]) -> tuple[Any, bool]:
    """The size arguments of a ``view``/``reshape``/``expand`` call (its args after the
    tensor) and whether they come packed in one value (a list, a tuple or a node holding
    the whole shape) rather than as varargs."""
    packed = len(args) == 2 and isinstance(args[1], (list, tuple, fx.Node))
    return (args[1] if packed else args[1:]), packed


def is_shape(value: Any, shape: Sequence[int]) -> bool:
    """``value`` (evaluated sizes) asks for ``shape``, up to a ``-1`` that infers its dim."""
    return isinstance(value, tuple) and len(value) == len(shape) \
        and all(v == -1 or v == s for v, s in zip(value, shape, strict=True))


def _sizes(state: RewriteState, node_sizes: Sequence[Any], new_sizes: Sequence[Any], new_shape: Sequence[int], offset: int = 0) -> list[Any]:
    """Each size argument must equal the pruned size of its dim: a literal that does not is
    replaced, and so is a size computed at run time (``x.size(1) // 2``) whose value under
    the pruned shapes would not (``-1`` is left to infer)."""
    evaluate = SizeValues(state.plan.new_shapes)
    before = SizeValues(state.plan.analysis.shapes.of)
    out = list(new_sizes)
    for i, s in enumerate(node_sizes):
        want = int(new_shape[i + offset])
        if isinstance(s, bool) or s == -1:
            continue
        if isinstance(s, int) and s != want:
            out[i] = want
        elif isinstance(s, fx.Node) and evaluate(s) != want:
            out[i] = _rescaled(s, new_sizes[i], want, evaluate, before) or want
    return out


def _rescaled(size: fx.Node, copy: Any, want: int, evaluate: SizeValues, before: SizeValues) -> fx.Node | None:
    """``batch * heads`` (a run-time size times a literal, as attention computes the
    merged batch-and-heads dim) becomes ``batch * heads'``: the run-time factor stays
    dynamic instead of being frozen to the example's value. Only a factor that pruning
    leaves as it was: a stale one (``C * 3`` with C pruned, VOLO's fold) is frozen to its
    original value in the new product by ``FreezeStaleSizes``, which would scale it twice."""
    if size.target is not operator.mul or len(size.args) != 2 or not isinstance(copy, fx.Node):
        return None
    (dyn, lit), (dyn_copy, _) = _split_literal(size.args), _split_literal(copy.args)
    value = evaluate(dyn)
    if not isinstance(lit, int) or not isinstance(value, int) or value <= 0 or want % value or before(dyn) != value:
        return None
    with copy.graph.inserting_after(copy):
        return copy.graph.call_function(operator.mul, (dyn_copy, want // value))


def _split_literal(args: Sequence[Any]) -> tuple[Any, Any]:
    """(the run-time operand, the literal) of a binary size product."""
    return (args[1], args[0]) if isinstance(args[0], int) else (args[0], args[1])


def size_list(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    if len(node.args) < 2:
        return
    new_shape = state.plan.new_shapes[node]
    sizes, packed = size_args(node.args)
    if isinstance(sizes, fx.Node):
        if isinstance(SizeValues(state.plan.analysis.shapes.of)(sizes), tuple):
            # the whole shape as one value (timm's `x.reshape(y.shape)`, MaxViT's `x.shape[:-1] + (-1,)`):
            # right if it is the pruned shape, up to a -1 that infers its dim
            if not is_shape(SizeValues(state.plan.new_shapes)(sizes), new_shape):
                new.args = (new.args[0], [int(d) for d in new_shape])
            return
        sizes, packed = node.args[1:], False  # one size as a node: `x.view(n)`
    copies = new.args[1] if packed else new.args[1:]  # the copy's args: nodes of the new graph
    fixed = _sizes(state, sizes, copies, new_shape)
    if fixed != list(copies):
        new.args = (new.args[0], type(copies)(fixed)) if packed else (new.args[0], *fixed)


def unflatten(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    dim, sizes = node.args[1], node.args[2]
    if isinstance(dim, int) and isinstance(sizes, (list, tuple)):
        dim = dim % len(state.plan.analysis.shapes[node.args[0]])
        fixed = _sizes(state, sizes, new.args[2], state.plan.new_shapes[node], offset=dim)
        new.args = (new.args[0], dim, type(sizes)(fixed))


def split_args(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    x = node.args[0]
    nd = len(state.plan.analysis.shapes[x])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim % nd
    old = [s[dim] for s in state.plan.analysis.shapes[node]]
    fresh = [int(s[dim]) for s in state.plan.new_shapes[node]]
    if old == fresh:
        return
    with new.graph.inserting_before(new):
        rep = new.graph.call_function(torch.split, (new.args[0], fresh, dim))
    new.replace_all_uses_with(rep)
    new.graph.erase_node(new)
    state.node_map[node] = rep


def _prefix(kept: np.ndarray, i: int) -> int:
    return int(kept[:i].sum())


def getitem(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    src, index = node.args
    value = state.plan.analysis.layouts.get(src)
    shape = state.plan.analysis.shapes[src]
    if not isinstance(shape, torch.Size):
        return
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = len(shape) - (len(items) - 1 - items.count(None))
        expanded = items[:k] + [slice(None)] * fill + items[k + 1 :]
    else:
        expanded = items
    out, dim, changed = [], 0, False
    for it in expanded:
        if it is None:
            out.append(it)
            continue
        kept = state.plan.kept_along(value, shape[dim], dim)
        if not kept.all() and isinstance(it, int):
            it, changed = _prefix(kept, it % shape[dim]), True
        elif not kept.all() and isinstance(it, slice) and it != slice(None):
            start, stop, _ = it.indices(shape[dim])
            it, changed = slice(_prefix(kept, start), _prefix(kept, max(stop, start))), True
        out.append(it)
        dim += 1
    if changed:
        new.args = (new.args[0], tuple(out) if isinstance(index, tuple) or len(out) > 1 else out[0])


def narrow(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    x, dim, start, length = node.args[:4]
    shape = state.plan.analysis.shapes[x]
    dim = dim % len(shape)
    kept = state.plan.kept_along(state.plan.analysis.layouts.get(x), shape[dim], dim)
    if not kept.all():
        new.args = (new.args[0], dim, _prefix(kept, start), int(kept[start : start + length].sum()))


def _set_arg(new: fx.Node, index: int, name: str, value: Any) -> None:
    if len(new.args) > index:
        args = list(new.args)
        args[index] = value
        new.args = tuple(args)
    else:
        new.kwargs = {**new.kwargs, name: value}


def conv_groups(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return
    n = len(state.plan.analysis.shapes[node.args[1]]) - 2  # spatial dims: the weight's kernel dims
    old_y, new_y = state.plan.analysis.shapes[node], state.plan.new_shapes[node]
    cdim = len(old_y) - n - 1
    if old_y[cdim] != new_y[cdim]:
        _set_arg(new, 6, "groups", int(new_y[cdim]) // (old_y[cdim] // groups))


def group_norm(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    groups = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
    old_c, new_c = state.plan.analysis.shapes[node.args[0]][1], state.plan.new_shapes[node.args[0]][1]
    if old_c != new_c:
        _set_arg(new, 1, "num_groups", int(new_c) // (old_c // groups))


def layer_norm(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    x_new = state.plan.new_shapes[node.args[0]]
    _set_arg(new, 1, "normalized_shape", tuple(int(s) for s in x_new[len(x_new) - len(shape):]))


def window_attention(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    """Call prunefx's shifted_window_attention (attention width from qkv_weight) with the
    new number of heads."""
    qkv = node.args[1] if len(node.args) > 1 else node.kwargs["qkv_weight"]
    heads = node.args[5] if len(node.args) > 5 else node.kwargs["num_heads"]
    old_rows, new_rows = state.plan.analysis.shapes[qkv][0], state.plan.new_shapes[qkv][0]
    head_dim = old_rows // 3 // heads
    new.target = pnn.shifted_window_attention
    _set_arg(new, 5, "num_heads", int(new_rows) // 3 // head_dim)


def select_args(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    """``aten.select.int(x, dim, i)``: i' = #kept before i."""
    x, dim, index = node.args[0], node.args[1], node.args[2]
    shape = state.plan.analysis.shapes[x]
    dim = dim % len(shape)
    kept = state.plan.kept_along(state.plan.analysis.layouts.get(x), shape[dim], dim)
    if not kept.all():
        new.args = (new.args[0], dim, _prefix(kept, index % shape[dim]))


def slice_args(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    """``aten.slice.Tensor(x, dim, start, end, step)``: start' = #kept before start,
    end' = #kept before end."""
    x = node.args[0]
    dim, start, end = (node.args[i] if len(node.args) > i else d for i, d in ((1, 0), (2, None), (3, None)))
    shape = state.plan.analysis.shapes[x]
    if any(isinstance(v, fx.Node) for v in (dim, start, end)):
        return
    dim = dim % len(shape)
    kept = state.plan.kept_along(state.plan.analysis.layouts.get(x), shape[dim], dim)
    if not kept.all():
        lo, hi, _ = slice(start, end).indices(shape[dim])
        new.args = (new.args[0], dim, _prefix(kept, lo), _prefix(kept, max(hi, lo)), *new.args[4:])


def attention_scale(state: RewriteState, node: fx.Node, new: fx.Node) -> None:
    """``scaled_dot_product_attention`` without ``scale`` divides by sqrt(E) of the query:
    when pruning shrinks E, pass the original scale explicitly."""
    if (node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")) is not None:
        return
    q = node.args[0]
    old_e, new_e = state.plan.analysis.shapes[q][-1], state.plan.new_shapes[q][-1]
    if old_e != new_e:
        _set_arg(new, 6, "scale", float(old_e) ** -0.5)


@dataclass(frozen=True)
class FixShapeArgs(Pass):
    def run(self, state: RewriteState) -> None:
        modules = state.plan.analysis.traced.modules
        for node in list(state.source_nodes()):
            spec = ops.lookup(node, modules)
            if spec is not None and spec.fix is not None:
                spec.fix(state, node, state.node_map[node])
