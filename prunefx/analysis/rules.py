"""The channel rule table: how each op maps the channel ids of its inputs to its output.

One function per kind of op; the tables at the bottom (``MODULE_RULES``, ``FUNCTION_RULES``,
``METHOD_RULES``) say which op uses which rule. An op found in no table goes to ``unknown``,
which pins every channel id it touches (reason: node + source line) and gives its output a
fixed size: unknown ops stop propagation, they never pass channels through.

Conventions: ``a`` is the Analyzer, ``node`` the fx node. A rule returns the output value:
a ``Layout`` for a tensor, None for a non-tensor, or a tuple of them for tuple outputs.
Each rule also decides the ``zero`` flag of its output (see ``layout.py``), and a layer that
*reads* channels whose masked values are not zero marks them inexact.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from prunefx import ops
from prunefx.analysis.layout import Factor, Layout
from prunefx.analysis.propagate import Analyzer, Role, empty_like_shape

__all__ = ["apply", "unknown"]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tensor_args(a: Analyzer, node: fx.Node) -> list[fx.Node]:
    return [x for x in (*node.args, *node.kwargs.values()) if isinstance(x, fx.Node) and isinstance(a.layouts.get(x), Layout)]


def _not_zero_reader(a: Analyzer, node: fx.Node, lay: Layout | None, ids: np.ndarray | None) -> None:
    if ids is not None and lay is not None and not lay.zero:
        a.mark_inexact(ids, node, "reads channels whose masked values are not zero (an op before it maps 0 to a "
                       "non-zero constant), so removing them drops that constant")


def _only_on(a: Analyzer, node: fx.Node, lay: Layout, allowed: set[int], why: str) -> Layout:
    """Keep factors that lie entirely on ``allowed`` dims; pin every other factor."""
    kept = []
    for f in lay.factors:
        if set(f.dims) <= allowed:
            kept.append(f)
        else:
            a.pin(f.ids, node, why)
    return Layout(tuple(kept), lay.zero)


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


# ---------------------------------------------------------------------------------------
# generic rules
# ---------------------------------------------------------------------------------------
def unknown(a: Analyzer, node: fx.Node) -> Any:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_module":
        target = f"{type(a.module(node)).__name__} module"
    inputs = [a.value(x) for x in (*node.args, *node.kwargs.values())]
    a.pin_value(inputs, node, f"prunefx has no channel rule for {target}")
    return empty_like_shape(a.shape(node), zero=False)


def metadata(a: Analyzer, node: fx.Node) -> Any:
    """x.size(), x.shape, x.dim(): values that are recomputed at run time, so they follow
    the pruned tensor."""
    if isinstance(a.shape(node), torch.Size):
        return unknown(a, node)
    return None


def identity(a: Analyzer, node: fx.Node) -> Any:
    return a.value(node.args[0])


def placeholder(a: Analyzer, node: fx.Node) -> Any:
    return empty_like_shape(a.shape(node), zero=True)


def output(a: Analyzer, node: fx.Node) -> Any:
    def pin(arg: Any) -> None:
        if isinstance(arg, fx.Node):
            a.pin_value(a.value(arg), arg, "model output")
        elif isinstance(arg, (list, tuple)):
            for x in arg:
                pin(x)
        elif isinstance(arg, dict):
            for x in arg.values():
                pin(x)

    pin(node.args[0])
    return None


def get_attr(a: Analyzer, node: fx.Node) -> Any:
    shape = a.shape(node)
    if not isinstance(shape, torch.Size):
        return None
    is_param = isinstance(a.lookup(node.target), nn.Parameter)
    if not is_param and a.traced.frontend == "export" and not a.persistent(node.target):
        # a table the model derives from its config (rotary inv_freq, position ids, lifted
        # constants): its sizes are fixed, like an input's
        return Layout((), False)
    if not node.users:
        # read by no node (export lists every parameter; DINOv2's mask_token serves only a
        # bool_masked_pos the example did not pass): no group of its own, it is kept whole
        return Layout((), is_param)
    role = Role.WRITE if is_param else Role.STAT
    lay = a.param_layout(node.target, node, {d: role for d in range(len(shape)) if shape[d] > 1})
    return lay.with_zero(is_param)


# ---- elementwise -------------------------------------------------------------------------
ADD, MUL, DIV, NONZERO = "add", "mul", "div", "nonzero"


def elementwise(kind: str) -> Callable[[Analyzer, fx.Node], Any]:
    def rule(a: Analyzer, node: fx.Node) -> Any:
        out_shape = a.shape(node)
        args = [*node.args[:2], *(v for k, v in node.kwargs.items() if k in ("input", "other"))]
        operands = [(a.value(x), a.shape(x)) for x in args if isinstance(x, fx.Node) and isinstance(a.value(x), Layout)]
        scalars = [x for x in args if isinstance(x, (int, float, bool))]
        if not isinstance(out_shape, torch.Size):
            return unknown(a, node) if operands else None
        factors = a.broadcast(node, operands, out_shape)
        out_dims = {d for f in factors for d in f.dims}
        nd = len(out_shape)

        def covers(lay: Layout, shp: Sequence[int]) -> bool:
            off = nd - len(shp)
            return lay.zero and out_dims <= {d + off for d in lay.dims}

        if kind == ADD:
            zero = all(covers(lay, shp) for lay, shp in operands) and all(v == 0 for v in scalars)
        elif kind == NONZERO:
            zero = False
        elif kind == MUL:
            zero = any(covers(lay, shp) for lay, shp in operands) or any(v == 0 for v in scalars)
        else:  # division: zero numerator, over a divisor that is not zero there
            first, second = node.args[0], _arg(node, 1, "other")
            zero = isinstance(first, fx.Node) and isinstance(a.value(first), Layout) and covers(a.value(first), a.shape(first))
            divisor = a.value(second) if isinstance(second, fx.Node) else None
            if isinstance(divisor, Layout) and divisor.zero:  # x/0 or 0/0 in the masked model: inf or NaN, not zero
                for f in divisor.factors:
                    a.mark_inexact(f.ids, node, "divides by channels that are zero in the masked model (x/0 or 0/0 there)")
                zero = False
        return Layout(factors, zero)

    return rule


def where(a: Analyzer, node: fx.Node) -> Any:
    cond, x, y = node.args[:3]
    operands = [(a.value(v), a.shape(v)) for v in (cond, x, y) if isinstance(v, fx.Node) and isinstance(a.value(v), Layout)]
    factors = a.broadcast(node, operands, a.shape(node))
    zero = all(isinstance(v, fx.Node) and a.value(v).zero for v in (x, y))
    return Layout(factors, zero)


def unary(zero_preserving: bool) -> Callable[[Analyzer, fx.Node], Any]:
    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = a.value(node.args[0]) if node.args else a.value(node.kwargs.get("input"))
        if not isinstance(x, Layout):
            return unknown(a, node) if isinstance(a.shape(node), torch.Size) else None
        return x.with_zero(x.zero and zero_preserving)

    return rule


def _elementwise_input(a: Analyzer, node: fx.Node) -> Layout | None:
    x = a.value(node.args[0]) if node.args else a.value(node.kwargs.get("input"))
    return x if isinstance(x, Layout) else None


def threshold(a: Analyzer, node: fx.Node) -> Any:
    """``F.threshold``/``nn.Threshold``: x where x > threshold, else ``value``; so 0 stays 0
    only when the threshold is negative or the value is 0."""
    if node.op == "call_module":
        m = a.module(node)
        th, value = m.threshold, m.value
    else:
        th, value = _arg(node, 1, "threshold"), _arg(node, 2, "value")
    x = _elementwise_input(a, node)
    if x is None or not isinstance(th, (int, float)) or not isinstance(value, (int, float)):
        return unknown(a, node)
    return x.with_zero(x.zero and (th < 0 or value == 0))


def hardtanh(a: Analyzer, node: fx.Node) -> Any:
    """``F.hardtanh``/``nn.Hardtanh`` (ReLU6 is one): a clamp to [min_val, max_val], so 0 stays
    0 only when the range holds it."""
    if node.op == "call_module":
        m = a.module(node)
        lo, hi = m.min_val, m.max_val
    else:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    x = _elementwise_input(a, node)
    if x is None or not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        return unknown(a, node)
    return x.with_zero(x.zero and lo <= 0 <= hi)


def alpha_dropout(a: Analyzer, node: fx.Node) -> Any:
    """Alpha dropout (SELU networks) sets dropped units to a negative constant and then
    shifts every unit: in training 0 does not stay 0; in evaluation it is the identity."""
    training = a.module(node).training if node.op == "call_module" else _arg(node, 2, "training", False)
    x = _elementwise_input(a, node)
    if x is None or not isinstance(training, bool):
        return unknown(a, node)
    return x.with_zero(x.zero and not training)


def pole_at_zero(a: Analyzer, node: fx.Node) -> Any:
    """log, rsqrt, reciprocal: not finite at 0. Where the masked model holds zeros, it holds
    inf there, and inf * 0 or inf - inf downstream is NaN, which no pruned model reproduces
    (the analysis tracks zeros, not infinities, so the group is approximate from here on)."""
    x = _elementwise_input(a, node)
    if x is None:
        return unknown(a, node) if isinstance(a.shape(node), torch.Size) else None
    if x.zero:
        _maps_zero_to_infinity(a, node, x)
    return x.with_zero(False)


def _maps_zero_to_infinity(a: Analyzer, node: fx.Node, lay: Layout) -> None:
    for f in lay.factors:
        a.mark_inexact(f.ids, node, "maps channels that are zero in the masked model to inf (log, rsqrt, "
                       "reciprocal or a negative power of 0 there)")


def clamp(a: Analyzer, node: fx.Node) -> Any:
    lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    x = a.value(node.args[0])
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node) or not isinstance(x, Layout):
        return unknown(a, node)
    keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return x.with_zero(x.zero and keeps_zero)


def power(a: Analyzer, node: fx.Node) -> Any:
    x, e = node.args[0], _arg(node, 1, "exponent")
    if not isinstance(x, fx.Node) or isinstance(e, fx.Node):
        return unknown(a, node)
    lay = a.value(x)
    if not isinstance(lay, Layout):
        return unknown(a, node) if isinstance(a.shape(node), torch.Size) else None
    if lay.zero and isinstance(e, (int, float)) and e < 0:
        _maps_zero_to_infinity(a, node, lay)
    return lay.with_zero(lay.zero and isinstance(e, (int, float)) and e > 0)


def like(zero: bool) -> Callable[[Analyzer, fx.Node], Any]:
    def rule(a: Analyzer, node: fx.Node) -> Any:
        return a.value(node.args[0]).with_zero(zero)

    return rule


# ---- shape ops -------------------------------------------------------------------------
def reshape(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    return a.reshape(node, a.value(x), a.shape(x), a.shape(node))


def reshape_as(a: Analyzer, node: fx.Node) -> Any:
    out = reshape(a, node)
    other = node.args[1]
    factors = a.broadcast(node, [(out, a.shape(node)), (a.value(other), a.shape(other))], a.shape(node))
    return Layout(factors, out.zero)


def _permutation(node: fx.Node, nd: int) -> list[int]:
    dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
    return [_norm_dim(d, nd) for d in (dims or node.kwargs["dims"])]


def _transposition(node: fx.Node, nd: int) -> list[int]:
    d0, d1 = _norm_dim(_arg(node, 1, "dim0"), nd), _norm_dim(_arg(node, 2, "dim1"), nd)
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _reversal(node: fx.Node, nd: int) -> list[int]:
    return list(range(nd))[::-1]


def _last_two_swapped(node: fx.Node, nd: int) -> list[int]:
    perm = list(range(nd))
    if nd >= 2:
        perm[-2], perm[-1] = perm[-1], perm[-2]
    return perm


def _movedim(node: fx.Node, nd: int) -> list[int]:
    src, dst = node.args[1], node.args[2]
    src = [_norm_dim(s, nd) for s in ([src] if isinstance(src, int) else src)]
    dst = [_norm_dim(d, nd) for d in ([dst] if isinstance(dst, int) else dst)]
    rest = iter(d for d in range(nd) if d not in src)
    perm: list[int] = [-1] * nd
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    return [p if p >= 0 else next(rest) for p in perm]


def permute_by(order: Callable[[fx.Node, int], list[int]]) -> Callable[[Analyzer, fx.Node], Any]:
    """A dim permutation; ``order(node, ndim)`` reads it from the node's arguments."""

    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = node.args[0]
        return a.value(x).permute(order(node, len(a.shape(x))))

    return rule


permute = permute_by(_permutation)
transpose = permute_by(_transposition)
reverse_dims = permute_by(_reversal)
matrix_transpose = permute_by(_last_two_swapped)
movedim = permute_by(_movedim)


def expand(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay = a.value(x)
    operands = [(lay, a.shape(x))]
    if len(node.args) == 2 and isinstance(node.args[1], fx.Node) and isinstance(a.shape(node.args[1]), torch.Size):  # expand_as
        other = node.args[1]
        operands.append((a.value(other), a.shape(other)))
    return Layout(a.broadcast(node, operands, a.shape(node)), lay.zero)


def repeat(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    reps = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
    if any(isinstance(r, fx.Node) for r in reps):
        return unknown(a, node)
    off = len(reps) - len(shape)
    factors = []
    for f in lay.factors:
        tiles = [reps[d + off] for d in f.dims]
        factors.append(Factor(tuple(d + off for d in f.dims), np.tile(f.ids, tiles)))
    return Layout(tuple(factors), lay.zero)


def cat(a: Analyzer, node: fx.Node) -> Any:
    tensors = _arg(node, 0, "tensors")
    out_shape = a.shape(node)
    nd = len(out_shape)
    dim = _norm_dim(_arg(node, 1, "dim", 0), nd)
    tensors = [t for t in tensors if a.shape(t)[dim] > 0] or list(tensors)  # empty pieces add nothing
    grid = _cat_grids(a, node, tensors, dim)
    if grid is not None:
        return grid
    tracked = any(a.value(t).on(dim) is not None for t in tensors)
    pieces, others = [], []
    for t in tensors:
        lay, shape = a.value(t), a.shape(t)
        ids = a.axis_ids(lay, dim)
        if ids is None and tracked:
            ids = a.fresh(shape[dim])
            a.pin(ids, node, "a fixed-size input of this concatenation")
        if ids is not None:
            pieces.append(ids)
        rest = Layout(tuple(f for f in lay.factors if dim not in f.dims), lay.zero)
        # other dims must align across inputs: broadcast them against the output (with the
        # concatenated dim seen as size 1, so it never conflicts)
        others.append((rest, tuple(1 if d == dim else s for d, s in enumerate(shape))))
    base = tuple(1 if d == dim else s for d, s in enumerate(out_shape))
    factors = a.broadcast(node, others, base)
    zero = all(a.value(t).zero for t in tensors)
    if not tracked:  # no input has channels on the joined dim: neither does the result
        return Layout(factors, zero)
    joined = Factor((dim,), np.concatenate(pieces))
    return Layout(tuple(sorted((*factors, joined), key=lambda f: f.dims)), zero)


def _cat_grids(a: Analyzer, node: fx.Node, tensors: Sequence[fx.Node], dim: int) -> Layout | None:
    """Pieces of one grid factor (heads x head_dim, say) concatenated along one of its dims,
    as rotary embeddings do with ``cat((-x2, x1), -1)``: the grids are joined along that axis,
    so the other dims (the heads) stay separate channels. A piece with channels on fewer of
    the grid's dims joins too: partial rotary (Phi, StableLM, GPT-NeoX) concatenates the
    rotated dims, whose layout kept only the heads (the rotation pinned each head's rotated
    dims together), with the untouched rest of the head, ``cat((q_rot, q_pass), -1)``; each
    element of such a piece belongs to its head. A piece without any channel on the grid's
    dims gets pinned ids. None when no piece is a grid on ``dim`` or a piece has channels
    off the grid."""
    lays = [a.value(t) for t in tensors]
    if not all(isinstance(lay, Layout) for lay in lays):
        return None
    grid = next((f.dims for lay in lays if (f := lay.on(dim)) is not None and len(f.dims) > 1), None)
    if grid is None:
        return None
    k = grid.index(dim)
    pieces = []
    for t, lay in zip(tensors, lays, strict=True):
        shape = tuple(a.shape(t)[d] for d in grid)
        f = lay.on(dim)
        if f is not None:
            if f.dims != grid or len(lay.factors) > 1:
                return None
            pieces.append(f.ids)
        elif not lay.factors:  # fixed-size on every dim of the grid
            ids = a.fresh(shape[k])
            a.pin(ids, node, "a fixed-size input of this concatenation")
            pieces.append(_spread(ids, k, shape))
        elif len(lay.factors) == 1 and len(lay.factors[0].dims) == 1 and lay.factors[0].dims[0] in grid:
            pieces.append(_spread(lay.factors[0].ids, grid.index(lay.factors[0].dims[0]), shape))
        else:
            return None
    joined = a.simplify(Factor(grid, np.concatenate(pieces, axis=k)))
    return Layout((joined,), all(lay.zero for lay in lays))


def _spread(ids: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """1-D ``ids`` laid along ``axis`` of a grid of ``shape``, repeated along its other axes."""
    return np.broadcast_to(np.expand_dims(ids, [i for i in range(len(shape)) if i != axis]), shape)


def stack(a: Analyzer, node: fx.Node) -> Any:
    tensors = _arg(node, 0, "tensors")
    out_shape = a.shape(node)
    nd = len(out_shape)
    dim = _norm_dim(_arg(node, 1, "dim", 0), nd)
    operands = []
    for t in tensors:
        lay = a.value(t)
        shifted = lay.shift({d: d + (d >= dim) for d in lay.dims})
        operands.append((shifted, tuple(1 if d == dim else s for d, s in enumerate(out_shape))))
    factors = a.broadcast(node, operands, tuple(1 if d == dim else s for d, s in enumerate(out_shape)))
    return Layout(factors, all(a.value(t).zero for t in tensors))


def split(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    outs = a.shape(node)
    dim = _norm_dim(_arg(node, 2, "dim", 0), len(shape))
    f = lay.on(dim)
    result, start = [], 0
    for piece in outs:
        n = piece[dim]
        if f is None:
            result.append(lay)
        else:
            k = f.axis(dim)
            ids = np.take(f.ids, np.arange(start, start + n), axis=k)
            others = tuple(g for g in lay.factors if g is not f)
            result.append(Layout(tuple(sorted((*others, Factor(f.dims, ids)), key=lambda g: g.dims)), lay.zero))
        start += n
    return tuple(result)


def getitem(a: Analyzer, node: fx.Node) -> Any:
    src, index = node.args
    value = a.value(src)
    if not isinstance(value, Layout):  # indexing an aggregate (split outputs, x.shape, ...)
        if isinstance(value, (tuple, list)) and isinstance(index, int):
            return value[index]
        if isinstance(value, dict):
            return value.get(index)
        if isinstance(a.shape(node), torch.Size):
            return unknown(a, node)
        return None
    return _index_tensor(a, node, value, a.shape(src), index)


def _index_tensor(a: Analyzer, node: fx.Node, lay: Layout, shape: Sequence[int], index: Any) -> Any:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items) or any(
        isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)) for i in items
    ):
        return unknown(a, node)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = len(shape) - (len(items) - 1 - items.count(None))
        items[k : k + 1] = [slice(None)] * fill
    factors = {f: f.ids for f in lay.factors}
    dims_of = {f: list(f.dims) for f in lay.factors}
    out_dim = 0
    in_dim = 0
    mapping: dict[int, int] = {}
    dropped: list[tuple[Factor, int, int]] = []
    for it in items:
        if it is None:
            out_dim += 1
            continue
        f = lay.on(in_dim)
        if isinstance(it, int):
            if f is not None:
                dropped.append((f, in_dim, it))
            in_dim += 1
            continue
        # a slice
        if f is not None and it != slice(None):
            k = f.axis(in_dim)
            if it.step not in (None, 1) and len(f.dims) > 1:
                # one axis of a grid (interleaved rotary's x[..., 0::2] over each head's dims):
                # each line along it is kept or removed whole, so the slice never changes
                a.unite_lines(factors[f], [k])
            elif it.step not in (None, 1):
                a.pin(f.ids, node, "strided slice of a channel dim")
            factors[f] = np.take(factors[f], np.arange(shape[in_dim])[it], axis=k)
        mapping[in_dim] = out_dim
        in_dim += 1
        out_dim += 1
    nd_out = len(a.shape(node))
    for d in range(in_dim, len(shape)):
        mapping[d] = d - in_dim + out_dim
    # An integer index into a channel dim selects one channel: pin it (it cannot be removed).
    # Into one axis of a grid (the q/k/v axis of a packed projection) it selects a slice of
    # the other axes: that axis keeps its size, so each line along it is kept or removed whole.
    for f, d, i in dropped:
        k = dims_of[f].index(d)
        ids = factors[f]
        if len(dims_of[f]) > 1:
            a.unite_lines(ids, [k])
        else:
            a.pin(np.take(ids, [i], axis=k), node, "integer index into a channel dim")
        factors[f] = np.take(ids, i, axis=k)
        dims_of[f].remove(d)
    out = []
    for f in lay.factors:
        if not dims_of[f]:
            continue
        new = Factor(tuple(mapping[d] for d in dims_of[f]), factors[f])
        out.append(a.simplify(new) if len(new.dims) > 1 else new)
    assert all(d < nd_out for f in out for d in f.dims)
    return Layout(tuple(sorted(out, key=lambda f: f.dims)), lay.zero)


def narrow(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    dim, start, length = (_arg(node, 1, "dim"), _arg(node, 2, "start"), _arg(node, 3, "length"))
    if any(isinstance(v, fx.Node) for v in (dim, start, length)):
        return unknown(a, node)
    dim = _norm_dim(dim, len(shape))
    index = tuple([slice(None)] * dim + [slice(start, start + length)])
    return _index_tensor(a, node, lay, shape, index)


def reduction(kind: str, dim_at: int = 1) -> Callable[[Analyzer, fx.Node], Any]:
    """A reduction over ``dim`` (argument ``dim_at``, ``keepdim`` right after it)."""

    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = node.args[0]
        lay, shape = a.value(x), a.shape(x)
        if not isinstance(lay, Layout) or not isinstance(a.shape(node), torch.Size):
            return unknown(a, node)
        nd = len(shape)
        dims = _arg(node, dim_at, "dim")
        keepdim = bool(_arg(node, dim_at + 1, "keepdim", False))
        if dims is None:
            reduced = set(range(nd))
        else:
            reduced = {_norm_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims)}
        out_lay = lay
        for f in list(lay.factors):
            hit = reduced & set(f.dims)
            if not hit:
                continue
            if set(f.dims) <= reduced:  # all of this factor's channels are mixed together
                out_lay = Layout(tuple(g for g in out_lay.factors if g is not f), out_lay.zero)
                if not (kind == "sum" and lay.zero):
                    a.mark_inexact(f.ids, node, f"{kind} over channels: its result depends on how many channels there are")
                continue
            for d in sorted(hit, reverse=True):
                out_lay, _ = a.drop_dim(out_lay, d)
        if not keepdim:
            mapping = {d: d - sum(1 for r in reduced if r < d) for d in range(nd) if d not in reduced}
            out_lay = out_lay.shift(mapping)
        zero = lay.zero and kind in ("sum", "mean", "amax", "amin", "norm")
        return out_lay.with_zero(zero)

    return rule


_VECTOR_NORM = reduction("norm", dim_at=2)


def linalg_norm(a: Analyzer, node: fx.Node) -> Any:
    """``torch.linalg.norm(x, ord, dim)``: a vector norm (one ``dim``, or every element when
    ``ord`` is None) and the Frobenius norm reduce like ``vector_norm``. Another matrix norm
    (two dims: spectral, nuclear, largest column sum, ...) is no reduction of channels: no
    rule (PEFT's DoRA takes ``torch.linalg.norm(weight, dim=1)``)."""
    order, dims = _arg(node, 1, "ord"), _arg(node, 2, "dim")
    shape = a.shape(node.args[0])
    matrix = (isinstance(dims, (tuple, list)) and len(dims) == 2) or (
        dims is None and order is not None and isinstance(shape, torch.Size) and len(shape) == 2)
    if matrix and order not in (None, "fro"):
        return unknown(a, node)
    return _VECTOR_NORM(a, node)


def reduction_with_indices(kind: str) -> Callable[[Analyzer, fx.Node], Any]:
    """``x.max(dim)`` / ``x.min(dim)``: a ``torch.return_types`` pair (values, indices), each
    with the layout ``amax``/``amin`` over ``dim`` gives (over a non-channel dim, the channels
    survive). Indices are positions along ``dim``: a zeroed channel does not make them zero.
    ``x.max()`` is one tensor (a full reduction); ``torch.max(x, y)`` is ``torch.maximum``."""
    values, pairwise = reduction("amax" if kind == "max" else "amin"), elementwise(ADD)

    class _SeenAsValues:
        """The analyzer, with the pair node shaped like its values, for the reduction rule."""

        def __init__(self, a: Analyzer, node: fx.Node) -> None:
            self._a, self._node = a, node

        def shape(self, arg: Any) -> Any:
            return self._a.shape(arg)[0] if arg is self._node else self._a.shape(arg)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._a, name)

    def rule(a: Analyzer, node: fx.Node) -> Any:
        other = _arg(node, 1, "dim")
        if isinstance(other, fx.Node):
            return pairwise(a, node)
        out = a.shape(node)
        if not isinstance(out, tuple) or isinstance(out, torch.Size) or len(out) != 2:
            return values(a, node)
        lay = values(_SeenAsValues(a, node), node)  # type: ignore[arg-type]
        return (lay, lay.with_zero(False)) if isinstance(lay, Layout) else (lay, lay)

    return rule


_RETURN_FIELDS = {"values": 0, "indices": 1}  # torch.return_types of max/min/sort/topk/...


# tensor attributes that are a transpose (``weight.T`` in ``x @ self.weight.T``); the
# conjugating ones only change values (zero stays zero)
_TRANSPOSING = {"T": _reversal, "H": _reversal, "mT": _last_two_swapped, "mH": _last_two_swapped}


def attribute(a: Analyzer, node: fx.Node) -> Any:
    """``getattr(x, name)``: ``.values``/``.indices`` of a ``torch.return_types`` pair is that
    element of its layout; ``x.T``/``.mT`` (and conjugating ``.H``/``.mH``) permute its dims;
    anything else (``x.shape``, ``x.dtype``) is metadata."""
    value, name = a.value(node.args[0]), node.args[1]
    if isinstance(value, tuple) and name in _RETURN_FIELDS and len(value) > _RETURN_FIELDS[name]:
        return value[_RETURN_FIELDS[name]]
    if isinstance(value, Layout) and name in _TRANSPOSING:
        return value.permute(_TRANSPOSING[name](node, len(a.shape(node.args[0]))))
    return metadata(a, node)


def spatial(nspatial: int | None, zero_preserving: bool = True) -> Callable[[Analyzer, fx.Node], Any]:
    """Pooling, upsampling, padding: per-channel along one channel dim, mixing spatial dims."""

    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = node.args[0] if node.args else node.kwargs["input"]
        lay, shape = a.value(x), a.shape(x)
        nd = len(shape)
        n = nspatial if nspatial is not None else nd - 2
        if node.op == "call_module":
            n = _module_spatial_dims(a.module(node), nd)
        cdim = nd - n - 1
        out = _only_on(a, node, lay, set(range(cdim + 1)) - ({0} if cdim > 0 else set()), "spatial dims of a pooling/resize/pad")
        out_shape = a.shape(node)
        if not isinstance(out_shape, torch.Size):  # return_indices=True: (values, indices)
            return (out, Layout((), False))
        return out.with_zero(out.zero and zero_preserving)

    return rule


def pad(a: Analyzer, node: fx.Node) -> Any:
    """``F.pad(x, pad)`` / ``aten.pad`` / ``aten.constant_pad_nd``: ``pad`` lists (before,
    after) amounts for the last dims, innermost first. Channels on a padded dim are pinned;
    every other dim (including a channels-last dim padded by (0, 0)) keeps its channels."""
    x, amounts = node.args[0], _arg(node, 1, "pad")
    lay, shape = a.value(x), a.shape(x)
    if not isinstance(lay, Layout) or not isinstance(amounts, (list, tuple)):
        return unknown(a, node)
    nd = len(shape)
    padded = {nd - 1 - i for i in range(len(amounts) // 2) if any(not isinstance(v, int) or v != 0 for v in amounts[2 * i : 2 * i + 2])}
    out = _only_on(a, node, lay, set(range(nd)) - padded, "a padded dim")
    value = _arg(node, 2, "value", 0) if node.target is torch.ops.aten.constant_pad_nd.default else _arg(node, 3, "value", 0)
    return out.with_zero(out.zero and value in (0, None))


def _module_spatial_dims(m: nn.Module, nd: int) -> int:
    for n, kinds in ((1, ("1d",)), (2, ("2d",)), (3, ("3d",))):
        if type(m).__name__.endswith(kinds):
            return n
    if isinstance(m, (nn.Upsample,)):
        return nd - 2
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return len(m.padding) // 2
    return nd - 2


def softmax(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    dim = _arg(node, 1, "dim")
    if node.op == "call_module":
        dim = a.module(node).dim
    if dim is None:
        return unknown(a, node)
    f = lay.on(_norm_dim(dim, len(shape)))
    if f is not None:
        a.mark_inexact(f.ids, node, "softmax over channels: every output depends on every channel")
    return lay.with_zero(False)


def normalize(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    f = lay.on(_norm_dim(_arg(node, 2, "dim", 1), len(shape)))
    if f is not None:
        a.mark_inexact(f.ids, node, "F.normalize over channels divides by their norm")
    return lay


# ---------------------------------------------------------------------------------------
# layers with weights
# ---------------------------------------------------------------------------------------
def _conv_core(
    a: Analyzer, node: fx.Node, x: Layout, xshape: Sequence[int], nspatial: int,
    w_out: np.ndarray | None, w_in: np.ndarray | None, groups: int, transposed: bool, w_shape: Sequence[int],
) -> tuple[Layout, np.ndarray | None]:
    """Channel ids of a convolution's output; unites/pins its input ids.

    Grouped convolutions prune whole groups: the input and output channels of one group
    form one slot, so every remaining group keeps its size and ``groups`` shrinks."""
    cdim = len(xshape) - nspatial - 1
    x = _only_on(a, node, x, {cdim}, "a convolution mixes these dims")
    x_in = a.axis_ids(x, cdim)
    if groups == 1:
        if w_in is not None and x_in is not None:
            a.unify(x_in, w_in)
            _not_zero_reader(a, node, x, x_in)
        elif x_in is not None:
            a.pin(x_in, node, "convolution weight has a fixed number of input channels")
        elif w_in is not None:
            a.pin(w_in, node, "convolution input has a fixed number of channels")
        out = w_out
    else:
        rows = (w_in if transposed else w_out)  # the per-group-stacked dim of the weight
        if rows is None:
            a.pin(x_in, node, "grouped convolution with a fixed weight")
            return Layout((), True), None
        grid = rows.reshape(groups, -1)
        a.unify(grid[:, :1], grid)
        if x_in is not None:
            xg = x_in.reshape(groups, -1)
            a.unify(xg[:, :1], xg)
            a.unify(xg[:, 0], grid[:, 0])
        else:
            a.pin(grid, node, "grouped convolution reads a fixed number of channels")
        if transposed:
            per_group_out = w_shape[1]
            out = np.repeat(a.uf.find(grid[:, 0]), per_group_out)
        else:
            out = w_out
    if out is None:
        return Layout((), True), None
    return Layout((Factor((cdim,), out),), True), out


_CONV_SPATIAL = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def conv_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    n = next(v for k, v in _CONV_SPATIAL.items() if isinstance(m, k))
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    w = f"{node.target}.weight"
    wshape = m.weight.shape
    if m.groups == 1:
        roles = {0: Role.READ, 1: Role.WRITE} if transposed else {0: Role.WRITE, 1: Role.READ}
        ids = {d: a.tensor_ids(w, d, wshape[d]) for d in (0, 1)}
        for d, role in roles.items():
            a.member(w, d, ids[d], role, node)
        w_out, w_in = (ids[1], ids[0]) if transposed else (ids[0], ids[1])
    else:
        stacked = a.tensor_ids(w, 0, wshape[0])
        a.member(w, 0, stacked, Role.WRITE, node)
        a.pin(a.tensor_ids(w, 1, wshape[1]), node, "within-group channel index of a grouped convolution")
        w_out, w_in = (None, stacked) if transposed else (stacked, None)
    out_lay, out = _conv_core(a, node, lay, shape, n, w_out, w_in, m.groups, transposed, wshape)
    if m.bias is not None and out is not None:
        a.member(f"{node.target}.bias", 0, out, Role.WRITE, node)
    return out_lay


def conv_function(n: int, transposed: bool) -> Callable[[Analyzer, fx.Node], Any]:
    """``F.conv{n}d`` / ``F.conv_transpose{n}d`` (and their aten overloads)."""

    def rule(a: Analyzer, node: fx.Node) -> Any:
        return _conv_call(a, node, n, transposed)

    return rule


def _conv_call(a: Analyzer, node: fx.Node, n: int, transposed: bool) -> Any:
    x, weight, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)  # same position for conv and conv_transpose
    if not isinstance(weight, fx.Node) or isinstance(groups, fx.Node):
        return unknown(a, node)
    wl, wshape = a.value(weight), a.shape(weight)
    if weight.op == "get_attr":
        a.set_role(weight.target, 0 if transposed else 1, Role.READ)
        if len(weight.users) == 1:  # (as a conv module's weight: kernel dims, and the index within a group, are no group)
            a.forget(weight.target, range(1 if groups > 1 else 2, len(wshape)))
    _only_on(a, node, wl, {0, 1}, "kernel dims of a convolution weight")
    w0, w1 = a.axis_ids(wl, 0), a.axis_ids(wl, 1)
    if groups > 1:
        a.pin(w1, node, "within-group channel index of a grouped convolution")
        w_out, w_in = (None, w0) if transposed else (w0, None)
    else:
        w_out, w_in = (w1, w0) if transposed else (w0, w1)
    out_lay, out = _conv_core(a, node, a.value(x), a.shape(x), n, w_out, w_in, groups, transposed, wshape)
    zero = wl.zero
    if isinstance(bias, fx.Node):
        bl = a.value(bias)
        b0 = a.axis_ids(bl, 0)
        if out is not None and b0 is not None:
            a.unify(out, b0)
        elif b0 is not None:
            a.pin(b0, node, "bias of a convolution with fixed output channels")
        zero = zero and bl.zero
    return out_lay.with_zero(zero)


def linear_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    w = f"{node.target}.weight"
    out = a.tensor_ids(w, 0, m.weight.shape[0])
    inp = a.tensor_ids(w, 1, m.weight.shape[1])
    a.member(w, 0, out, Role.WRITE, node)
    a.member(w, 1, inp, Role.READ, node)
    if m.bias is not None:
        a.member(f"{node.target}.bias", 0, out, Role.WRITE, node)
    return _linear_core(a, node, a.value(node.args[0]), a.shape(node.args[0]), out, inp).with_zero(True)


def _linear_core(a: Analyzer, node: fx.Node, x: Layout, shape: Sequence[int], out: np.ndarray | None, inp: np.ndarray | None) -> Layout:
    last = len(shape) - 1
    f = x.on(last)
    if f is not None and len(f.dims) > 1:
        a.pin(f.ids, node, "Linear input features spread over several dims")
        f = None
    if f is not None:
        if inp is not None:
            a.unify(f.ids, inp)
            _not_zero_reader(a, node, x, f.ids)
        else:
            a.pin(f.ids, node, "Linear weight has a fixed number of input features")
    elif inp is not None:
        a.pin(inp, node, "Linear input has a fixed number of features")
    rest = tuple(g for g in x.factors if last not in g.dims)
    if out is not None:
        rest = (*rest, Factor((last,), out))
    return Layout(rest, x.zero)


def linear_function(a: Analyzer, node: fx.Node) -> Any:
    x, weight, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not isinstance(weight, fx.Node):
        return unknown(a, node)
    wl = a.value(weight)
    if weight.op == "get_attr":
        a.set_role(weight.target, 1, Role.READ)
    out, inp = a.axis_ids(wl, 0), a.axis_ids(wl, 1)
    zero = wl.zero
    if isinstance(bias, fx.Node):
        b0 = a.axis_ids(a.value(bias), 0)
        if out is not None and b0 is not None:
            a.unify(out, b0)
        elif b0 is not None:
            a.pin(b0, node, "bias of a linear layer with fixed outputs")
        zero = zero and a.value(bias).zero
    return _linear_core(a, node, a.value(x), a.shape(x), out, inp).with_zero(zero)


def matmul(a: Analyzer, node: fx.Node) -> Any:
    x, y = node.args[0], node.args[1]
    lx, ly, sx, sy = a.value(x), a.value(y), a.shape(x), a.shape(y)
    if len(sx) < 2 or len(sy) < 2:
        return unknown(a, node)
    out_shape = a.shape(node)
    nd = len(out_shape)
    rest_x, kx = a.drop_dim(lx, len(sx) - 1)
    rest_y, ky = a.drop_dim(ly, len(sy) - 2)
    _contract(a, node, (lx, kx), (ly, ky), "matmul")
    # x: (..., n) -> output (..., n, 1);  y: (..., m) -> output (..., 1, m)
    ox, oy = nd - len(sx), nd - len(sy)
    ax = rest_x.shift({d: d + ox for d in rest_x.dims})
    ay = rest_y.shift({d: (d + oy if d < len(sy) - 2 else nd - 1) for d in rest_y.dims})
    shape_x = (*((1,) * ox), *sx[:-1], 1)
    shape_y = (*((1,) * oy), *sy[:-2], 1, sy[-1])
    factors = a.broadcast(node, [(ax, shape_x), (ay, shape_y)], out_shape)
    return Layout(factors, _product_zero(factors, (ax, ay)))


def grouped_mm(a: Analyzer, node: fx.Node) -> Any:
    """``grouped_mm(input (S, K), weight (E, K, N), offs)``: row s of the input (tokens
    sorted by expert) times the matrix of the expert it belongs to (a mixture of experts:
    ``F.grouped_mm``, transformers' ``grouped_mm_fallback``). K is contracted: the input's
    channels are united with every expert's rows. The output's N channels are the weight's
    dim 2, one set of ids for all experts, so a channel goes from every expert at once; a
    channel zero in every expert gives a zero output channel. The expert dim is pinned:
    the router picks each token's experts at run time (removing an expert changes routing)."""
    x, w = node.args[0], node.args[1]
    lx, lw, sx, sw = a.value(x), a.value(w), a.shape(x), a.shape(w)
    if not (isinstance(lx, Layout) and isinstance(lw, Layout) and len(sx) == 2 and len(sw) == 3):
        return unknown(a, node)
    rest_x, kx = a.drop_dim(lx, 1)
    rest_w, kw = a.drop_dim(lw, 1)
    _contract(a, node, (lx, kx), (lw, kw), "grouped matmul")
    _only_on(a, node, rest_x, set(), "the rows of a grouped matmul (tokens sorted by expert)")
    rest_w = _only_on(a, node, rest_w, {2}, "the experts of a grouped matmul: the router picks them per token")
    for arg in (*node.args[2:], *node.kwargs.values()):
        if isinstance(arg, fx.Node):
            a.pin_value(a.value(arg), node, "grouped matmul offsets")
    return Layout(rest_w.shift({2: 1}).factors, lw.zero)


def _contract(a: Analyzer, node: fx.Node, x: tuple[Layout, np.ndarray | None], y: tuple[Layout, np.ndarray | None], what: str) -> None:
    """Both operands of a product contract one dim (``(layout, ids along it)``): its channels
    are united; removing them is exact when one operand's masked channels are zero; an
    operand of fixed size there pins the other's channels."""
    (lx, kx), (ly, ky) = x, y
    if kx is not None and ky is not None:
        a.unify(kx, ky)
        if not (lx.zero or ly.zero):
            a.mark_inexact(kx, node, f"{what} contracts channels whose masked values are not zero")
    elif kx is not None or ky is not None:
        a.pin(kx if kx is not None else ky, node, f"{what} with a fixed-size operand on the contracted dim")


def _product_zero(factors: Sequence[Factor], operands: Sequence[Layout]) -> bool:
    """A product's masked channels are zero when one operand whose masked channels are zero
    carries every tracked dim of the result: along a batch-like dim (attention heads) a
    product is zero when *either* operand is."""
    out_dims = {d for f in factors for d in f.dims}
    return any(lay.zero and out_dims <= lay.dims for lay in operands)


def batchnorm_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    cdim = 1 if len(shape) > 1 else 0
    ids = a.axis_ids(lay, cdim)
    if ids is not None:
        for pname, role in (("weight", Role.WRITE), ("bias", Role.WRITE), ("running_mean", Role.STAT), ("running_var", Role.STAT)):
            t = getattr(m, pname, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                a.member(f"{node.target}.{pname}", 0, ids, role, node)
    if m.affine:
        return lay.with_zero(True)
    instance_stats = isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats
    return lay.with_zero(lay.zero and instance_stats)


def frozen_batchnorm_module(a: Analyzer, node: fx.Node) -> Any:
    """torchvision's ``FrozenBatchNorm2d``: an evaluation-mode BatchNorm whose ``weight`` and
    ``bias`` are buffers. They write the channel as a BatchNorm's parameters do."""
    x = node.args[0]
    ids = a.axis_ids(a.value(x), 1)
    if ids is None:
        return unknown(a, node)
    for pname, role in (("weight", Role.WRITE), ("bias", Role.WRITE), ("running_mean", Role.STAT), ("running_var", Role.STAT)):
        a.member(f"{node.target}.{pname}", 0, ids, role, node)
    return a.value(x).with_zero(True)


F_BATCH_NORM_ARGS = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
ATEN_BATCH_NORM_ARGS = ((3, "running_mean"), (4, "running_var"), (1, "weight"), (2, "bias"))


def batchnorm_call(positions: Sequence[tuple[int, str]]) -> Callable[[Analyzer, fx.Node], Any]:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)``; aten orders them
    ``(x, weight, bias, running_mean, running_var, ...)``."""

    def rule(a: Analyzer, node: fx.Node) -> Any:
        return _batchnorm_call(a, node, [_arg(node, i, n) for i, n in positions])

    return rule


def _batchnorm_call(a: Analyzer, node: fx.Node, params: list[Any]) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    ids = a.axis_ids(lay, 1 if len(shape) > 1 else 0)
    for p in params:
        if isinstance(p, fx.Node):
            pid = a.axis_ids(a.value(p), 0)
            if ids is not None and pid is not None:
                a.unify(ids, pid)
            elif pid is not None:
                a.pin(pid, node, "batch_norm parameter of a fixed-size channel dim")
    w, b = params[2], params[3]
    zero = isinstance(w, fx.Node) and isinstance(b, fx.Node) and a.value(w).zero and a.value(b).zero
    return lay.with_zero(bool(zero))


def groupnorm_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    return _groupnorm(a, node, m.num_groups, f"{node.target}.weight" if m.affine else None, f"{node.target}.bias" if m.affine else None)


def _groupnorm(a: Analyzer, node: fx.Node, groups: int, weight: Any, bias: Any) -> Any:
    x = node.args[0]
    lay = a.value(x)
    ids = a.axis_ids(lay, 1)
    if ids is None:
        _pin_params(a, node, (weight, bias), 0, "group_norm over a fixed number of channels")
    if ids is not None:
        rows = ids.reshape(groups, -1)  # GroupNorm statistics mix a group: prune whole groups
        a.unify(rows[:, :1], rows)
        for p in (weight, bias):
            if isinstance(p, str):
                a.member(p, 0, ids, Role.WRITE, node)
            elif isinstance(p, fx.Node):
                pid = a.axis_ids(a.value(p), 0)
                if pid is not None:
                    a.unify(ids, pid)
    return lay.with_zero(True if weight is not None else lay.zero)


def groupnorm_function(a: Analyzer, node: fx.Node) -> Any:
    groups = _arg(node, 1, "num_groups")
    if isinstance(groups, fx.Node):
        return unknown(a, node)
    return _groupnorm(a, node, groups, _arg(node, 2, "weight"), _arg(node, 3, "bias"))


def layernorm_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    params = [f"{node.target}.weight" if m.weight is not None else None, f"{node.target}.bias" if getattr(m, "bias", None) is not None else None]
    return _layernorm(a, node, len(m.normalized_shape), params)


def _layernorm(a: Analyzer, node: fx.Node, k: int, params: Sequence[Any]) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    nd = len(shape)
    for d in range(nd - k, nd):
        ids = a.axis_ids(lay, d)
        if ids is None:
            _pin_params(a, node, params, d - (nd - k), "layer_norm over a fixed-size dim")
            continue
        a.mark_inexact(ids, node, "LayerNorm normalizes over these channels: its mean and variance change when channels are removed")
        for p in params:
            if isinstance(p, str):
                a.member(p, d - (nd - k), ids, Role.WRITE, node)
            elif isinstance(p, fx.Node):
                pid = a.axis_ids(a.value(p), d - (nd - k))
                if pid is not None:
                    a.unify(ids, pid)
    has_affine = any(p is not None for p in params)
    return lay.with_zero(has_affine)


def _pin_params(a: Analyzer, node: fx.Node, params: Sequence[Any], dim: int, why: str) -> None:
    """Affine parameters passed as values (``F.layer_norm(x, s, w, b)``, aten graphs) of a
    norm over channels the analysis does not track: their ids must not form a group of
    their own."""
    for p in params:
        if isinstance(p, fx.Node) and isinstance(a.value(p), Layout):
            a.pin(a.axis_ids(a.value(p), dim), node, why)


def layernorm_function(a: Analyzer, node: fx.Node) -> Any:
    shape = _arg(node, 1, "normalized_shape")
    if isinstance(shape, fx.Node) or any(isinstance(s, fx.Node) for s in shape):
        return unknown(a, node)
    return _layernorm(a, node, len(shape), [_arg(node, 2, "weight"), _arg(node, 3, "bias")])


def embedding_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    x = node.args[0]
    a.pin_value(a.value(x), node, "embedding indices")
    w = f"{node.target}.weight"
    ids = a.tensor_ids(w, 1, m.weight.shape[1])
    a.member(w, 1, ids, Role.WRITE, node)
    nd = len(a.shape(node))
    return Layout((Factor((nd - 1,), ids),), True)


def prelu_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    x = node.args[0]
    lay = a.value(x)
    if m.num_parameters > 1:
        ids = a.axis_ids(lay, 1)
        if ids is not None:
            a.member(f"{node.target}.weight", 0, ids, Role.STAT, node)
    return lay


def branch_constant(a: Analyzer, node: fx.Node) -> Any:
    """A removed residual branch's constant (``prunefx.nn.BranchConstant``): its values
    write channel dim 1, like a bias added to the stream it joins."""
    m = a.module(node)
    names = [f"{node.target}.eval_value"] + ([f"{node.target}.train_value"] if m.train_value is not None else [])
    ids = a.tensor_ids(names[0], 1, m.eval_value.shape[1])
    for name in names:
        a.member(name, 1, ids, Role.WRITE, node)
    return Layout((Factor((1,), ids),), True)


def multihead_attention(a: Analyzer, node: fx.Node) -> Any:
    """Heads are the unit: the q, k and v rows of head i (packed in ``in_proj_weight``) and
    the output-projection columns reading it form one slot. The model width (the stream
    read by the input projection and written by the output projection) is another group."""
    m = a.module(node)
    if not getattr(m, "_qkv_same_embed_dim", True) or getattr(m, "bias_k", None) is not None or getattr(m, "add_zero_attn", False):
        return unknown(a, node)
    t = node.target
    h = m.num_heads
    d = getattr(m, "head_dim", None) or m.embed_dim // h
    w, wo = f"{t}.in_proj_weight", f"{t}.out_proj.weight"
    inner, width = m.in_proj_weight.shape[0] // 3, m.in_proj_weight.shape[1]
    rows = a.tensor_ids(w, 0, 3 * inner)
    heads = rows.reshape(3, h, d).transpose(1, 0, 2).reshape(h, 3 * d)
    a.unify(heads[:, :1], heads)
    cols = a.tensor_ids(wo, 1, inner)
    a.unify(cols.reshape(h, d), heads[:, :1])
    stream_in, stream_out = a.tensor_ids(w, 1, width), a.tensor_ids(wo, 0, m.out_proj.weight.shape[0])
    a.member(w, 0, rows, Role.WRITE, node)
    a.member(w, 1, stream_in, Role.READ, node)
    a.member(wo, 1, cols, Role.READ, node)
    a.member(wo, 0, stream_out, Role.WRITE, node)
    if m.in_proj_bias is not None:
        a.member(f"{t}.in_proj_bias", 0, rows, Role.WRITE, node)
    if m.out_proj.bias is not None:
        a.member(f"{t}.out_proj.bias", 0, stream_out, Role.WRITE, node)
    for i, name in enumerate(("query", "key", "value")):
        x = _arg(node, i, name)
        lay, shape = a.value(x), a.shape(x)
        last = len(shape) - 1
        lay = _only_on(a, node, lay, {last}, "attention mixes the sequence")
        ids = a.axis_ids(lay, last)
        if ids is not None:
            a.unify(ids, stream_in)
            _not_zero_reader(a, node, lay, ids)
        else:
            a.pin(stream_in, node, "attention input has a fixed width")
    head_ids = a.uf.find(heads[:, 0])
    out_shape, weights_shape = a.shape(node)
    out = Layout((Factor((len(out_shape) - 1,), stream_out),), True)
    a.module_outputs.setdefault(t, stream_out)
    weights = None
    if isinstance(weights_shape, torch.Size):
        average = _arg(node, 6, "average_attn_weights", True)
        used = any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0 for u in node.users)
        if average:
            if used:
                a.mark_inexact(head_ids, node, "the returned attention weights are averaged over heads")
            weights = Layout((), False)
        else:
            weights = Layout((Factor((len(weights_shape) - 3,), head_ids),), False)
    return (out, weights)


def window_attention(a: Analyzer, node: fx.Node) -> Any:
    """Swin's ``shifted_window_attention(input, qkv_weight, proj_weight, bias, window,
    num_heads, ...)``: heads are slots (q/k/v rows, output-projection columns, the
    relative-position bias and logit scale of a head); the stream is read by ``qkv_weight``
    and written by ``proj_weight``. The rewrite calls ``prunefx.nn.shifted_window_attention``,
    which takes the attention width from ``qkv_weight`` (see passes/fix_shape_args.py)."""
    x, qkv_w, proj_w, bias = (_arg(node, i, n) for i, n in enumerate(("input", "qkv_weight", "proj_weight", "relative_position_bias")))
    heads = _arg(node, 5, "num_heads")
    qkv_b, proj_b, scale = _arg(node, 9, "qkv_bias"), _arg(node, 10, "proj_bias"), _arg(node, 11, "logit_scale")
    if not all(isinstance(v, fx.Node) for v in (x, qkv_w, proj_w, bias)) or not isinstance(heads, int):
        return unknown(a, node)
    shape = a.shape(x)
    last = len(shape) - 1
    lay = _only_on(a, node, a.value(x), {last}, "windowed attention mixes positions")
    stream_in = a.axis_ids(lay, last)
    qkv, proj = a.value(qkv_w), a.value(proj_w)
    rows, cols = a.axis_ids(qkv, 0), a.axis_ids(qkv, 1)
    p_in, p_out = a.axis_ids(proj, 1), a.axis_ids(proj, 0)
    if rows is None or p_in is None:
        return unknown(a, node)
    for w in (qkv_w, proj_w):
        if w.op == "get_attr":
            a.set_role(w.target, 1, Role.READ)
    if stream_in is not None and cols is not None:
        a.unify(stream_in, cols)
        _not_zero_reader(a, node, lay, stream_in)
    else:
        a.pin(stream_in, node, "attention input of fixed width")
        a.pin(cols, node, "attention input of fixed width")
    d = len(rows) // 3 // heads
    grid = rows.reshape(3, heads, d).transpose(1, 0, 2).reshape(heads, 3 * d)
    a.unify(grid[:, :1], grid)
    head = grid[:, 0]
    a.unify(p_in.reshape(heads, d), head[:, None])
    for extra, dim in ((qkv_b, 0), (bias, 1), (scale, 0)):
        if isinstance(extra, fx.Node):
            ids = a.axis_ids(a.value(extra), dim)
            if extra is qkv_b and ids is not None:
                a.unify(ids, rows)
            elif ids is not None:
                a.unify(ids, head)
            a.pin_value(Layout(tuple(f for f in a.value(extra).factors if dim not in f.dims)), node, "attention bias layout")
    zero = proj.zero
    if isinstance(proj_b, fx.Node):
        b = a.axis_ids(a.value(proj_b), 0)
        if b is not None and p_out is not None:
            a.unify(b, p_out)
        zero = zero and a.value(proj_b).zero
    if p_out is None:
        return Layout((), zero)
    return Layout((Factor((last,), p_out),), zero)


def relative_position_bias(a: Analyzer, node: fx.Node) -> Any:
    """torchvision's ``_get_relative_position_bias(table (L, heads), index, window)`` ->
    (1, heads, N, N): the heads of the table become dim 1."""
    table, index = node.args[0], node.args[1]
    lay = a.value(table)
    heads = a.axis_ids(lay, len(a.shape(table)) - 1)
    a.pin_value(Layout(tuple(f for f in lay.factors if len(a.shape(table)) - 1 not in f.dims)), node, "relative position table rows")
    a.pin_value(a.value(index), node, "relative position index")
    if heads is None:
        return Layout((), lay.zero)
    return Layout((Factor((1,), heads),), lay.zero)


def patch_merging_pad(a: Analyzer, node: fx.Node) -> Any:
    """torchvision's ``_patch_merging_pad``: four strided spatial slices concatenated on the
    channel dim, so the channel ids repeat four times."""
    x = node.args[0]
    shape = a.shape(x)
    last = len(shape) - 1
    lay = _only_on(a, node, a.value(x), {last}, "patch merging mixes positions")
    ids = a.axis_ids(lay, last)
    return Layout((Factor((last,), np.tile(ids, 4)),) if ids is not None else (), lay.zero)


def lrn(a: Analyzer, node: fx.Node) -> Any:
    lay = a.value(node.args[0])
    f = lay.on(1)
    if f is not None:
        a.mark_inexact(f.ids, node, "local response normalization mixes neighbouring channels")
    return lay


def flatten_module(a: Analyzer, node: fx.Node) -> Any:
    return reshape(a, node)


def channel_shuffle_module(a: Analyzer, node: fx.Node) -> Any:
    m = a.module(node)
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    g = m.groups
    split_shape = (shape[0], g, shape[1] // g, *shape[2:])
    grid = a.reshape(node, lay, shape, split_shape)
    perm = list(range(len(split_shape)))
    perm[1], perm[2] = 2, 1
    swapped = grid.permute(perm)
    return a.reshape(node, swapped, [split_shape[p] for p in perm], shape)


# ---------------------------------------------------------------------------------------
# ops of aten-level graphs (the torch.export front-end) and their Python spellings
# ---------------------------------------------------------------------------------------
def no_channels(a: Analyzer, node: fx.Node) -> Any:
    """Ops that build masks, positions or constants (arange, comparisons of positions,
    new_ones, assertions): their outputs carry no channels and they pin nothing."""
    return empty_like_shape(a.shape(node), zero=False)


def select(a: Analyzer, node: fx.Node) -> Any:
    """``aten.select.int(x, dim, index)`` == ``x[(slice(None),) * dim + (index,)]``."""
    x, dim, index = node.args[0], node.args[1], node.args[2]
    if isinstance(index, fx.Node):
        return unknown(a, node)
    shape = a.shape(x)
    return _index_tensor(a, node, a.value(x), shape, (*[slice(None)] * _norm_dim(dim, len(shape)), index))


def slice_dim(a: Analyzer, node: fx.Node) -> Any:
    """``aten.slice.Tensor(x, dim, start, end, step)`` == ``x[..., start:end:step, ...]``."""
    x = node.args[0]
    dim, start, end, step = _arg(node, 1, "dim", 0), _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    if any(isinstance(v, fx.Node) for v in (dim, start, end, step)):
        lay = a.value(x)
        f = lay.on(_norm_dim(dim, len(a.shape(x)))) if not isinstance(dim, fx.Node) else None
        if f is None and not isinstance(dim, fx.Node):
            return lay  # a dynamic slice of a dim without channels (a sequence)
        return unknown(a, node)
    shape = a.shape(x)
    return _index_tensor(a, node, a.value(x), shape, (*[slice(None)] * _norm_dim(dim, len(shape)), slice(start, end, step)))


def index_tensors(a: Analyzer, node: fx.Node) -> Any:
    """``aten.index.Tensor(x, [i0, None, i2, ...])`` (advanced indexing): indexed dims must
    carry no channels (else they are pinned); when the indexed dims are contiguous the others
    keep their channels, moved to where the index result puts them."""
    x, indices = node.args[0], node.args[1]
    lay, shape, out = a.value(x), a.shape(x), a.shape(node)
    if not isinstance(lay, Layout):
        return unknown(a, node)
    hit = [d for d, i in enumerate(indices) if i is not None]
    for d in hit:
        f = lay.on(d)
        if f is not None:
            a.pin(f.ids, node, "a channel dim indexed by a tensor")
    a.pin_value([a.value(i) for i in indices if isinstance(i, fx.Node)], node, "index tensor")
    rest = Layout(tuple(f for f in lay.factors if not set(f.dims) & set(hit)), lay.zero)
    if not rest.factors:
        return Layout((), lay.zero)
    if hit != list(range(hit[0], hit[-1] + 1)):
        a.pin_value(rest, node, "advanced indexing over non-contiguous dims moves channel dims")
        return Layout((), lay.zero)
    grown = len(out) - (len(shape) - len(hit))  # dims of the broadcast index result
    mapping = {d: (d if d < hit[0] else d - len(hit) + grown) for d in rest.dims}
    return rest.shift(mapping)


def gather(a: Analyzer, node: fx.Node) -> Any:
    """``gather(x, dim, index)`` / ``index_select(x, dim, index)``: channels along ``dim``
    are pinned (the index picks among them); other dims keep their channels when the result
    has the same size there."""
    x, dim, index = node.args[0], node.args[1], node.args[2]
    lay, shape, out = a.value(x), a.shape(x), a.shape(node)
    if not isinstance(lay, Layout) or isinstance(dim, fx.Node):
        return unknown(a, node)
    dim = _norm_dim(dim, len(shape))
    a.pin_value(a.value(index), node, "index tensor")
    kept = []
    for f in lay.factors:
        if dim in f.dims or any(out[d] != shape[d] for d in f.dims):
            a.pin(f.ids, node, "gathered along a channel dim")
        else:
            kept.append(f)
    return Layout(tuple(kept), lay.zero)


def along_dims(dims_of: Callable[[fx.Node, int], set[int]], zero_preserving: bool) -> Callable[[Analyzer, fx.Node], Any]:
    """Scans and rolls along some dims (cumsum, diff, roll): channels on those dims are
    pinned (the op mixes or moves them); every other dim keeps its channels."""

    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = node.args[0]
        lay, shape = a.value(x), a.shape(x)
        if not isinstance(lay, Layout) or a.shape(node) != shape:
            return unknown(a, node)
        dims = dims_of(node, len(shape))
        return _only_on(a, node, lay, set(range(len(shape))) - dims, "a scan or roll mixes or moves entries along this dim").with_zero(lay.zero and zero_preserving)

    return rule


def _dim_at(index: int) -> Callable[[fx.Node, int], set[int]]:
    return lambda node, nd: {_norm_dim(_arg(node, index, "dim", -1), nd)}


def _roll_dims(node: fx.Node, nd: int) -> set[int]:
    dims = _arg(node, 2, "dims")
    if dims is None or dims == []:  # rolls the flattened tensor
        return set(range(nd))
    return {_norm_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims)}


cumulative = along_dims(_dim_at(1), zero_preserving=True)  # cumsum(x, dim)
difference = along_dims(_dim_at(2), zero_preserving=True)  # diff(x, n, dim)
roll = along_dims(_roll_dims, zero_preserving=True)


def masked_fill(a: Analyzer, node: fx.Node) -> Any:
    """``x.masked_fill(mask, value)``: elementwise in x and the (broadcast) mask; masked
    channels stay zero only when the fill value is 0."""
    x, mask, value = node.args[0], node.args[1], _arg(node, 2, "value")
    operands = [(a.value(v), a.shape(v)) for v in (x, mask) if isinstance(v, fx.Node) and isinstance(a.value(v), Layout)]
    factors = a.broadcast(node, operands, a.shape(node))
    return Layout(factors, a.value(x).zero and value == 0)


def embedding_function(a: Analyzer, node: fx.Node) -> Any:
    """``aten.embedding(weight, indices)`` / ``F.embedding(indices, weight)``: the table's
    rows are the vocabulary (pinned: indices address them), its columns write the output's
    last dim."""
    weight, indices = (node.args[0], node.args[1]) if node.target is torch.ops.aten.embedding.default else (node.args[1], node.args[0])
    wl = a.value(weight)
    a.pin_value(a.value(indices), node, "embedding indices")
    if not isinstance(wl, Layout):
        return unknown(a, node)
    rows, cols = a.axis_ids(wl, 0), a.axis_ids(wl, 1)
    a.pin(rows, node, "embedding rows are addressed by token ids")
    nd = len(a.shape(node))
    return Layout((Factor((nd - 1,), cols),) if cols is not None else (), wl.zero)


def addmm(a: Analyzer, node: fx.Node) -> Any:
    """``addmm(bias, x, W)`` with ``W`` of shape (in, out), as GPT-2's Conv1D computes a
    linear layer: ``x`` (N, in) -> (N, out)."""
    bias, x, weight = node.args[0], node.args[1], node.args[2]
    wl = a.value(weight)
    if not isinstance(weight, fx.Node) or not isinstance(wl, Layout) or len(a.shape(weight)) != 2:
        return unknown(a, node)
    if weight.op == "get_attr":
        a.set_role(weight.target, 0, Role.READ)
    inp, out = a.axis_ids(wl, 0), a.axis_ids(wl, 1)
    zero = wl.zero
    if isinstance(bias, fx.Node):
        bl = a.value(bias)
        b = a.axis_ids(bl, len(a.shape(bias)) - 1)
        if out is not None and b is not None:
            a.unify(out, b)
        elif b is not None:
            a.pin(b, node, "bias of a linear layer with fixed outputs")
        zero = zero and bl.zero
    return _linear_core(a, node, a.value(x), a.shape(x), out, inp).with_zero(zero)


def scaled_dot_product_attention(a: Analyzer, node: fx.Node) -> Any:
    """``sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`` on (..., heads,
    L, E) tensors: q and k contract their head dims E (their channels are united); heads are
    a batch-like dim shared by q, k and v (with ``enable_gqa``, query head h reads KV head
    h // (Hq / Hkv)); the output carries v's heads and value dims. A head masked in v gives
    a zero head. With the default scale 1/sqrt(E), a shrinking E is rewritten to keep the
    original scale (passes/fix_shape_args.py)."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    lq, lk, lv = a.value(q), a.value(k), a.value(v)
    sq, sk, sv = a.shape(q), a.shape(k), a.shape(v)
    if not all(isinstance(t, Layout) for t in (lq, lk, lv)) or not len(sq) == len(sk) == len(sv) >= 3:
        return unknown(a, node)
    nd = len(sq)
    rest_q, eq = a.drop_dim(lq, nd - 1)
    rest_k, ek = a.drop_dim(lk, nd - 1)
    _contract(a, node, (lq, eq), (lk, ek), "attention scores")
    rest_v = _only_on(a, node, lv, set(range(nd)) - {nd - 2}, "the sequence dim of the values")
    rest_q = _only_on(a, node, rest_q, set(range(nd - 2)), "the sequence dim of the queries")
    rest_k = _only_on(a, node, rest_k, set(range(nd - 2)), "the sequence dim of the keys")
    hq, hk = sq[nd - 3], sk[nd - 3]
    if hk != hq and hk and hq % hk == 0:  # enable_gqa: repeat each KV head for its query heads
        rest_k, rest_v = (_repeat_dim(t, nd - 3, hq // hk) for t in (rest_k, rest_v))
    batch = tuple(sq[: nd - 2])
    out_shape = a.shape(node)
    operands = [(rest_q, (*batch, sq[nd - 2], 1)), (rest_k, (*batch, 1, 1)), (rest_v, (*batch, 1, sv[nd - 1]))]
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):  # added to the scores (..., heads, L, S): a per-head bias (relative positions) follows the heads
        lm, sm = a.value(mask), a.shape(mask)
        if isinstance(lm, Layout) and isinstance(sm, torch.Size) and len(sm) >= 2:
            lm = _only_on(a, node, lm, set(range(len(sm) - 2)), "the sequence dims of an attention mask")
            operands.append((lm, (*sm[:-2], 1, 1)))
        else:
            a.pin_value(lm, node, "attention mask")
    factors = a.broadcast(node, operands, out_shape)
    return Layout(factors, _product_zero(factors, (rest_v,)))


def _repeat_dim(lay: Layout, dim: int, times: int) -> Layout:
    out = []
    for f in lay.factors:
        out.append(Factor(f.dims, np.repeat(f.ids, times, axis=f.axis(dim))) if dim in f.dims else f)
    return Layout(tuple(out), lay.zero)




def apply(a: Analyzer, node: fx.Node) -> Any:
    """The output value of ``node`` (rules update the analyzer as a side effect)."""
    if node.op == "placeholder":
        return placeholder(a, node)
    if node.op == "get_attr":
        return get_attr(a, node)
    if node.op == "output":
        return output(a, node)
    spec = ops.lookup(node, a.modules)
    if node.op == "call_module":
        m = a.module(node)
        value = (spec.rule if spec is not None else unknown)(a, node)
        _record_module_output(a, node, m, value)
        return value
    if not _tensor_args(a, node) and not isinstance(a.shape(node), torch.Size):
        return None  # arithmetic on Python values (sizes): see passes/size_values.py
    value = (spec.rule if spec is not None else unknown)(a, node)
    owner = a.traced.owners.get(node)
    if owner is not None and isinstance(value, Layout):  # export graphs: the last node a module computes is its output
        _record_owner_output(a, node, owner, value)
    return value


def _record_owner_output(a: Analyzer, node: fx.Node, owner: str, value: Layout) -> None:
    """The output channels of the module that computed ``node`` (its last node wins): dim 1
    of (N, C, H, W...) maps, else the last dim (tokens)."""
    nd = len(a.shape(node))
    for dim in ((1, nd - 1) if nd >= 4 else (nd - 1, 1)):
        f = value.on(dim)
        if f is not None and len(f.dims) == 1:
            a.module_outputs[owner] = f.ids
            return
    a.module_outputs.pop(owner, None)


def _record_module_output(a: Analyzer, node: fx.Node, m: nn.Module, value: Any) -> None:
    if node.target in a.module_outputs or not isinstance(value, Layout):
        return
    shape = a.shape(node)
    nd = len(shape)
    dim = nd - 1 if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)) or nd < 2 else 1
    f = value.on(dim)
    if f is not None and len(f.dims) == 1:
        a.module_outputs[node.target] = f.ids

