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

import builtins
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunefx import nn as pnn
from prunefx.analysis.layout import Factor, Layout
from prunefx.analysis.propagate import Analyzer, Role, empty_like_shape

__all__ = ["apply", "accepts_empty", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES"]


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
    role = Role.WRITE if is_param else Role.STAT
    lay = a.param_layout(node.target, node, {d: role for d in range(len(shape)) if shape[d] > 1})
    return lay.with_zero(is_param)


# ---- elementwise -------------------------------------------------------------------------
_ADD, _MUL, _DIV = "add", "mul", "div"


def _elementwise(kind: str) -> Callable[[Analyzer, fx.Node], Any]:
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

        if kind == _ADD:
            zero = all(covers(lay, shp) for lay, shp in operands) and all(v == 0 for v in scalars)
        elif kind == _MUL:
            zero = any(covers(lay, shp) for lay, shp in operands) or any(v == 0 for v in scalars)
        else:  # division: zero numerator
            first = node.args[0]
            zero = isinstance(first, fx.Node) and isinstance(a.value(first), Layout) and covers(a.value(first), a.shape(first))
        return Layout(factors, zero)

    return rule


def _where(a: Analyzer, node: fx.Node) -> Any:
    cond, x, y = node.args[:3]
    operands = [(a.value(v), a.shape(v)) for v in (cond, x, y) if isinstance(v, fx.Node) and isinstance(a.value(v), Layout)]
    factors = a.broadcast(node, operands, a.shape(node))
    zero = all(isinstance(v, fx.Node) and a.value(v).zero for v in (x, y))
    return Layout(factors, zero)


def _unary(zero_preserving: bool) -> Callable[[Analyzer, fx.Node], Any]:
    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = a.value(node.args[0]) if node.args else a.value(node.kwargs.get("input"))
        if not isinstance(x, Layout):
            return unknown(a, node) if isinstance(a.shape(node), torch.Size) else None
        return x.with_zero(x.zero and zero_preserving)

    return rule


def _clamp(a: Analyzer, node: fx.Node) -> Any:
    lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    x = a.value(node.args[0])
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node) or not isinstance(x, Layout):
        return unknown(a, node)
    keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return x.with_zero(x.zero and keeps_zero)


def _pow(a: Analyzer, node: fx.Node) -> Any:
    x, e = node.args[0], _arg(node, 1, "exponent")
    if not isinstance(x, fx.Node) or isinstance(e, fx.Node):
        return unknown(a, node)
    lay = a.value(x)
    return lay.with_zero(lay.zero and isinstance(e, (int, float)) and e > 0)


def _like(zero: bool) -> Callable[[Analyzer, fx.Node], Any]:
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


def _perm_of(node: fx.Node, nd: int) -> list[int]:
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("permute",):
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        if not dims:
            dims = node.kwargs["dims"]
        return [_norm_dim(d, nd) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name == "t":
        return list(range(nd))[::-1]
    if name == "movedim":
        src, dst = node.args[1], node.args[2]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [_norm_dim(s, nd) for s in src]
        dst = [_norm_dim(d, nd) for d in dst]
        rest = [d for d in range(nd) if d not in src]
        perm: list[int] = [-1] * nd
        for s, d in zip(src, dst, strict=True):
            perm[d] = s
        it = iter(rest)
        return [p if p >= 0 else next(it) for p in perm]
    raise KeyError(name)


def permute(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    return a.value(x).permute(_perm_of(node, len(a.shape(x))))


def expand(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay = a.value(x)
    operands = [(lay, a.shape(x))]
    if node.target in ("expand_as",) and isinstance(node.args[1], fx.Node):
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
    pieces, others = [], []
    for t in tensors:
        lay, shape = a.value(t), a.shape(t)
        ids = a.axis_ids(lay, dim)
        if ids is None:
            ids = a.fresh(shape[dim])
            a.pin(ids, node, "a fixed-size input of this concatenation")
        pieces.append(ids)
        rest = Layout(tuple(f for f in lay.factors if dim not in f.dims), lay.zero)
        # other dims must align across inputs: broadcast them against the output (with the
        # concatenated dim seen as size 1, so it never conflicts)
        others.append((rest, tuple(1 if d == dim else s for d, s in enumerate(shape))))
    base = tuple(1 if d == dim else s for d, s in enumerate(out_shape))
    factors = a.broadcast(node, others, base)
    joined = Factor((dim,), np.concatenate(pieces))
    zero = all(a.value(t).zero for t in tensors)
    return Layout(tuple(sorted((*factors, joined), key=lambda f: f.dims)), zero)


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
            if it.step not in (None, 1):
                a.pin(f.ids, node, "strided slice of a channel dim")
            factors[f] = np.take(factors[f], np.arange(shape[in_dim])[it], axis=k)
        mapping[in_dim] = out_dim
        in_dim += 1
        out_dim += 1
    nd_out = len(a.shape(node))
    for d in range(in_dim, len(shape)):
        mapping[d] = d - in_dim + out_dim
    # integer indices select one channel: pin it (it cannot be removed) and drop the dim
    for f, d, i in dropped:
        k = dims_of[f].index(d)
        ids = factors[f]
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


def _reduction(kind: str) -> Callable[[Analyzer, fx.Node], Any]:
    def rule(a: Analyzer, node: fx.Node) -> Any:
        x = node.args[0]
        lay, shape = a.value(x), a.shape(x)
        if not isinstance(lay, Layout) or not isinstance(a.shape(node), torch.Size):
            return unknown(a, node)
        nd = len(shape)
        dims = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
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
        zero = lay.zero and kind in ("sum", "mean", "amax", "amin")
        return out_lay.with_zero(zero)

    return rule


def _spatial(nspatial: int | None, zero_preserving: bool = True) -> Callable[[Analyzer, fx.Node], Any]:
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
        return out.with_zero(out.zero and zero_preserving and _pad_keeps_zero(node))

    return rule


def _pad_keeps_zero(node: fx.Node) -> bool:
    value = _arg(node, 3, "value", 0) if node.op == "call_function" and node.target is F.pad else 0
    return value in (0, None)


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


def conv_function(a: Analyzer, node: fx.Node) -> Any:
    name = node.target.__name__
    transposed = "transpose" in name
    n = int(name[-2])
    x, weight, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)  # same position for conv and conv_transpose
    if not isinstance(weight, fx.Node) or isinstance(groups, fx.Node):
        return unknown(a, node)
    wl, wshape = a.value(weight), a.shape(weight)
    if weight.op == "get_attr":
        a.set_role(weight.target, 0 if transposed else 1, Role.READ)
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
    if kx is not None and ky is not None:
        a.unify(kx, ky)
        if not (lx.zero or ly.zero):
            a.mark_inexact(kx, node, "matmul contracts channels whose masked values are not zero")
    elif kx is not None or ky is not None:
        a.pin(kx if kx is not None else ky, node, "matmul with a fixed-size operand on the contracted dim")
    # x: (..., n) -> output (..., n, 1);  y: (..., m) -> output (..., 1, m)
    ox, oy = nd - len(sx), nd - len(sy)
    ax = rest_x.shift({d: d + ox for d in rest_x.dims})
    ay = rest_y.shift({d: (d + oy if d < len(sy) - 2 else nd - 1) for d in rest_y.dims})
    shape_x = (*((1,) * ox), *sx[:-1], 1)
    shape_y = (*((1,) * oy), *sy[:-2], 1, sy[-1])
    factors = a.broadcast(node, [(ax, shape_x), (ay, shape_y)], out_shape)
    return Layout(factors, lx.zero and ly.zero)


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


def batchnorm_function(a: Analyzer, node: fx.Node) -> Any:
    x = node.args[0]
    lay, shape = a.value(x), a.shape(x)
    ids = a.axis_ids(lay, 1 if len(shape) > 1 else 0)
    params = [_arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
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
# the tables
# ---------------------------------------------------------------------------------------
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Identity,
    nn.modules.dropout._DropoutNd, nn.Threshold,
)
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)

MODULE_RULES: dict[type, Callable[[Analyzer, fx.Node], Any]] = {
    nn.Conv1d: conv_module, nn.Conv2d: conv_module, nn.Conv3d: conv_module,
    nn.ConvTranspose1d: conv_module, nn.ConvTranspose2d: conv_module, nn.ConvTranspose3d: conv_module,
    nn.Linear: linear_module,
    nn.modules.batchnorm._NormBase: batchnorm_module,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm: groupnorm_module,
    nn.LayerNorm: layernorm_module,
    nn.Embedding: embedding_module,
    nn.PReLU: prelu_module,
    nn.LocalResponseNorm: lrn,
    nn.MultiheadAttention: multihead_attention,
    pnn.MultiheadAttention: multihead_attention,
    pnn.BranchConstant: branch_constant,
    nn.Flatten: flatten_module, nn.Unflatten: flatten_module,
    nn.Softmax: softmax, nn.LogSoftmax: softmax, nn.Softmin: softmax,
    nn.ChannelShuffle: channel_shuffle_module,
    **{k: _unary(True) for k in _ZERO_PRESERVING_MODULES},
    **{k: _unary(False) for k in _NONZERO_MODULES},
    **{k: _spatial(None) for k in (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
        nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
        nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
        nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    )},
}

_ZERO_PRESERVING_FUNCTIONS: list[Any] = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardtanh, F.tanh, torch.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, torch.abs, torch.neg, operator.neg, torch.sqrt, torch.square,
    torch.sin, torch.erf, torch.nn.functional.softshrink, torch.nn.functional.hardshrink, F.tanhshrink,
    operator.pos,
]
_NONZERO_FUNCTIONS: list[Any] = [
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, torch.exp, torch.cos, torch.log,
    torch.rsqrt, torch.reciprocal,
]
_ADD_FUNCTIONS = [operator.add, operator.sub, torch.add, torch.sub, torch.subtract, torch.maximum, torch.minimum, torch.fmax, torch.fmin, operator.iadd, operator.isub]
_MUL_FUNCTIONS = [operator.mul, torch.mul, torch.multiply, operator.imul]
_DIV_FUNCTIONS = [operator.truediv, torch.div, torch.true_divide, torch.divide, operator.itruediv]

FUNCTION_RULES: dict[Any, Callable[[Analyzer, fx.Node], Any]] = {
    **{f: _unary(True) for f in _ZERO_PRESERVING_FUNCTIONS},
    **{f: _unary(False) for f in _NONZERO_FUNCTIONS},
    **{f: _elementwise(_ADD) for f in _ADD_FUNCTIONS},
    **{f: _elementwise(_MUL) for f in _MUL_FUNCTIONS},
    **{f: _elementwise(_DIV) for f in _DIV_FUNCTIONS},
    torch.where: _where,
    torch.clamp: _clamp, torch.clip: _clamp, torch.pow: _pow, operator.pow: _pow,
    torch.zeros_like: _like(True), torch.ones_like: _like(False), torch.empty_like: _like(False),
    torch.full_like: _like(False), torch.rand_like: _like(False), torch.randn_like: _like(False),
    torch.flatten: reshape, torch.reshape: reshape, torch.squeeze: reshape, torch.unsqueeze: reshape,
    torch.unflatten: reshape,
    torch.permute: permute, torch.transpose: permute, torch.swapaxes: permute, torch.t: permute,
    torch.movedim: permute,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.split: split, torch.chunk: split,
    operator.getitem: getitem,
    torch.narrow: narrow,
    torch.sum: _reduction("sum"), torch.mean: _reduction("mean"), torch.amax: _reduction("amax"),
    torch.amin: _reduction("amin"),
    F.adaptive_avg_pool1d: _spatial(1), F.adaptive_avg_pool2d: _spatial(2), F.adaptive_avg_pool3d: _spatial(3),
    F.adaptive_max_pool1d: _spatial(1), F.adaptive_max_pool2d: _spatial(2), F.adaptive_max_pool3d: _spatial(3),
    F.avg_pool1d: _spatial(1), F.avg_pool2d: _spatial(2), F.avg_pool3d: _spatial(3),
    F.max_pool1d: _spatial(1), F.max_pool2d: _spatial(2), F.max_pool3d: _spatial(3),
    F.lp_pool1d: _spatial(1), F.lp_pool2d: _spatial(2),
    F.interpolate: _spatial(None), F.upsample: _spatial(None), F.pad: _spatial(None),
    F.conv1d: conv_function, F.conv2d: conv_function, F.conv3d: conv_function,
    F.conv_transpose1d: conv_function, F.conv_transpose2d: conv_function, F.conv_transpose3d: conv_function,
    F.linear: linear_function,
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul, torch.mm: matmul,
    F.batch_norm: batchnorm_function, F.instance_norm: batchnorm_function,
    F.group_norm: groupnorm_function, F.layer_norm: layernorm_function,
    F.softmax: softmax, F.log_softmax: softmax, torch.softmax: softmax, torch.log_softmax: softmax,
    F.normalize: normalize,
    builtins.getattr: metadata,
}

FUNCTION_RULES[pnn.shifted_window_attention] = window_attention

try:  # torchvision wraps these for fx, so they are single nodes in traced graphs
    from torchvision.models import swin_transformer as _swin
    from torchvision.ops import stochastic_depth as _stochastic_depth

    FUNCTION_RULES[_stochastic_depth] = _unary(True)  # scales whole samples
    FUNCTION_RULES[_swin.shifted_window_attention] = window_attention
    FUNCTION_RULES[_swin._get_relative_position_bias] = relative_position_bias
    FUNCTION_RULES[_swin._patch_merging_pad] = patch_merging_pad
except ImportError:  # pragma: no cover - torchvision is optional
    pass

_METHOD_ALIASES: dict[str, Any] = {
    "add": _elementwise(_ADD), "add_": _elementwise(_ADD), "sub": _elementwise(_ADD), "sub_": _elementwise(_ADD),
    "__add__": _elementwise(_ADD), "__radd__": _elementwise(_ADD),
    "mul": _elementwise(_MUL), "mul_": _elementwise(_MUL), "div": _elementwise(_DIV), "div_": _elementwise(_DIV),
    "maximum": _elementwise(_ADD), "minimum": _elementwise(_ADD),
    "relu": _unary(True), "relu_": _unary(True), "tanh": _unary(True), "tanh_": _unary(True),
    "abs": _unary(True), "neg": _unary(True), "sqrt": _unary(True), "square": _unary(True),
    "sigmoid": _unary(False), "sigmoid_": _unary(False), "exp": _unary(False), "rsqrt": _unary(False),
    "clamp": _clamp, "clamp_": _clamp, "clip": _clamp, "pow": _pow,
    "contiguous": identity, "clone": identity, "detach": identity, "to": identity, "float": identity,
    "half": identity, "double": identity, "bfloat16": identity, "type_as": identity, "requires_grad_": identity,
    "cpu": identity, "cuda": identity,
    "view": reshape, "reshape": reshape, "flatten": reshape, "unflatten": reshape, "squeeze": reshape,
    "unsqueeze": reshape, "view_as": reshape_as, "reshape_as": reshape_as,
    "permute": permute, "transpose": permute, "t": permute, "swapaxes": permute, "movedim": permute,
    "expand": expand, "expand_as": expand, "repeat": repeat,
    "split": split, "chunk": split, "narrow": narrow,
    "sum": _reduction("sum"), "mean": _reduction("mean"), "amax": _reduction("amax"), "amin": _reduction("amin"),
    "softmax": softmax, "log_softmax": softmax,
    "size": metadata, "dim": metadata, "numel": metadata,
    "matmul": matmul, "bmm": matmul,
}
METHOD_RULES: dict[str, Callable[[Analyzer, fx.Node], Any]] = _METHOD_ALIASES


# Consumers that handle a tensor whose channel dim the mask empties (a split piece whose
# group keeps channels elsewhere). torch's pooling, interpolation and norms raise on 0
# channels, and a convolution reading 0 channels silently returns 0 channels instead of its
# bias, so every consumer not listed here makes reconfigure refuse such a mask.
_EMPTY_SAFE_MODULES = (
    *_ZERO_PRESERVING_MODULES, *_NONZERO_MODULES, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Flatten, nn.Linear,
)
_EMPTY_SAFE_FUNCTIONS = {
    *_ZERO_PRESERVING_FUNCTIONS, *_NONZERO_FUNCTIONS, *_ADD_FUNCTIONS, *_MUL_FUNCTIONS, *_DIV_FUNCTIONS,
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.split, torch.chunk, operator.getitem,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.sum, torch.mean, F.linear, F.pad,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}
_EMPTY_SAFE_METHODS = {
    "add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "sigmoid", "tanh", "view", "reshape", "flatten",
    "permute", "transpose", "contiguous", "clone", "mean", "sum", "split", "chunk", "size", "dim", "to",
}


def accepts_empty(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` works when one of its tensor inputs has 0 channels."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _EMPTY_SAFE_MODULES)  # type: ignore[arg-type]
    if node.op == "call_function":
        return node.target in _EMPTY_SAFE_FUNCTIONS
    return node.op == "call_method" and node.target in _EMPTY_SAFE_METHODS


def _module_rule(m: nn.Module) -> Callable[[Analyzer, fx.Node], Any]:
    for cls in type(m).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return unknown


def apply(a: Analyzer, node: fx.Node) -> Any:
    """The output value of ``node`` (rules update the analyzer as a side effect)."""
    if node.op == "placeholder":
        return placeholder(a, node)
    if node.op == "get_attr":
        return get_attr(a, node)
    if node.op == "output":
        return output(a, node)
    if node.op == "call_module":
        m = a.module(node)
        value = _module_rule(m)(a, node)
        _record_module_output(a, node, m, value)
        return value
    if node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
    else:
        rule = METHOD_RULES.get(node.target)  # type: ignore[arg-type]
    if not _tensor_args(a, node) and not isinstance(a.shape(node), torch.Size):
        return None  # arithmetic on Python values (sizes): see passes/size_values.py
    return (rule or unknown)(a, node)


def _record_module_output(a: Analyzer, node: fx.Node, m: nn.Module, value: Any) -> None:
    if node.target in a.module_outputs or not isinstance(value, Layout):
        return
    shape = a.shape(node)
    nd = len(shape)
    dim = nd - 1 if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)) or nd < 2 else 1
    f = value.on(dim)
    if f is not None and len(f.dims) == 1:
        a.module_outputs[node.target] = f.ids

