"""Output shapes by formula: what common ops return on meta tensors, without their meta kernels.

Shape propagation (``prunefx.shapes``) runs every node on meta tensors. For many ops the meta
kernel is a Python decomposition: an elementwise op ~0.1 ms, a ReLU ~0.4 ms, a convolution
~0.08 ms, a Linear ~0.7 ms, a MultiheadAttention ~4 ms, Swin's window attention ~1.5 ms,
against a few microseconds for ``torch.empty``. A rule here gives the same output (shape,
strides, dtype) from the inputs' sizes for the common, unambiguous case, and ``None`` for
anything else (other dtypes, channels-last or strided inputs, masks, sizes that do not fit,
in-place calls), which then runs the real meta kernel, so its own checks still name what
is wrong.

A rule is attached to an op in its record (``OpSpec.shape`` in ``prunefx/ops/records.py``)
and called as ``rule(op, args, kwargs)``: ``op`` is the module of a ``call_module`` node,
else the node's target. ``tests/test_shapes.py`` checks every rule against the meta kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ShapeRule", "elementwise", "adaptive_avg_pool", "conv_module", "linear_module", "attention_module", "window_attention"]

ShapeRule = Callable[[Any, tuple, dict], Any]  # (module or target, args, kwargs) -> output, or None

_META = torch.device("meta")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _plain(t: Any) -> bool:
    """A floating-point meta tensor with the strides of a new contiguous tensor (the case
    every rule handles; ``is_contiguous`` alone ignores the strides of size-1 dims, which
    kernels copy from their inputs)."""
    return isinstance(t, torch.Tensor) and t.is_meta and t.dtype in _FLOATS and _standard_strides(t)


def _standard_strides(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        if stride != expected:
            return False
        expected *= max(size, 1)
    return True


def _empty(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=_META)


def elementwise(op: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Broadcasting elementwise ops and activations (``x + y``, ``x * s``, ``F.relu(x)``,
    ``nn.SiLU``): contiguous inputs of one floating dtype, with Python numbers beside them,
    give a contiguous output of the broadcast shape in that dtype. In-place calls return
    their input: not handled."""
    schema = getattr(op, "_schema", None)  # an aten overload: in place when it mutates
    if kwargs.get("inplace") or getattr(op, "inplace", False) or "out" in kwargs or (
            schema.is_mutable if schema is not None else str(getattr(op, "__name__", op)).endswith("_")):
        return None
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    if not tensors or not all(_plain(t) for t in tensors) or len({t.dtype for t in tensors}) != 1:
        return None
    # numbers beside the tensors keep their dtype (a bool operand would not); flags by keyword
    if not all(isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in args):
        return None
    if not all(isinstance(v, (torch.Tensor, int, float, str, type(None))) for v in kwargs.values()):
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None  # the op's own error says which sizes
    return _empty(shape, tensors[0].dtype)


_ADAPTIVE_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                  "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3}


def adaptive_avg_pool(op: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``nn.AdaptiveAvgPool{1,2,3}d`` and ``F.adaptive_avg_pool{1,2,3}d``: the spatial dims
    become ``output_size`` (``None`` keeps one), a contiguous output."""
    if isinstance(op, nn.Module):
        d, size, x = _ADAPTIVE_DIMS.get(type(op)), op.output_size, (args[0] if len(args) == 1 and not kwargs else None)
    else:
        d = _ADAPTIVE_DIMS.get(getattr(op, "__name__", ""))  # the F functions (aten overloads run their kernel)
        call = dict(zip(("input", "output_size"), args, strict=False)) | kwargs
        size, x = call.get("output_size"), call.get("input") if len(call) == 2 else None
    if d is None or x is None or not _plain(x) or x.dim() not in (d + 1, d + 2):
        return None
    sizes = (size,) * d if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else None
    if sizes is None or len(sizes) != d:
        return None
    out = [n if s is None else s for s, n in zip(sizes, x.shape[-d:], strict=True)]
    if not all(isinstance(s, int) and s > 0 for s in out):
        return None
    return _empty((*x.shape[:-d], *out), x.dtype)


def linear_module(mod: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``nn.Linear`` (its own forward): ``(..., in) -> (..., out)``, contiguous."""
    x = args[0] if len(args) == 1 and not kwargs else None
    if type(mod).forward is not nn.Linear.forward or x is None or not isinstance(x, torch.Tensor) or not x.is_meta:
        return None
    if x.dtype != mod.weight.dtype or x.dim() < 1 or x.shape[-1] != mod.in_features:
        return None
    return _empty((*x.shape[:-1], mod.out_features), x.dtype)


_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def conv_module(mod: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``nn.Conv1d/2d/3d`` (their own forward), batched or not, contiguous input and weight:
    ``L_out = (L + 2p - d (k - 1) - 1) // s + 1`` per spatial dim (``padding="same"``:
    ``L``), a contiguous output. Transposed convolutions run their kernel."""
    d = _CONVS.get(type(mod))  # type: ignore[arg-type]
    x = args[0] if len(args) == 1 and not kwargs else None
    if d is None or x is None or not _plain(x) or not _standard_strides(mod.weight) or x.dtype != mod.weight.dtype:
        return None
    if x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != mod.in_channels:
        return None
    padding = (0,) * d if mod.padding == "valid" else mod.padding
    sizes = []
    for i, n in enumerate(x.shape[-d:]):
        if padding == "same":
            out = n
        else:
            out = (n + 2 * padding[i] - mod.dilation[i] * (mod.kernel_size[i] - 1) - 1) // mod.stride[i] + 1
        if out <= 0:
            return None
        sizes.append(out)
    return _empty((*x.shape[:-d - 1], mod.out_channels, *sizes), x.dtype)


_ATTENTION_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def attention_module(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``nn.MultiheadAttention`` (its own forward), self- or cross-attention of batched 3-D
    inputs without masks: ``(out, weights)``; batch-first ``out`` is a transposed view, as
    the module returns it."""
    if type(mod).forward is not nn.MultiheadAttention.forward:
        return None
    call = dict(zip(_ATTENTION_ARGS, args, strict=False))  # more args than names: refused below
    if len(args) > len(_ATTENTION_ARGS) or set(kwargs) - set(_ATTENTION_ARGS) or set(call) & set(kwargs):
        return None
    call.update(kwargs)
    query, key, value = call.get("query"), call.get("key"), call.get("value")
    if call.get("key_padding_mask") is not None or call.get("attn_mask") is not None or call.get("is_causal"):
        return None
    if not all(isinstance(t, torch.Tensor) and t.is_meta and t.dim() == 3 for t in (query, key, value)):
        return None
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    if len({query.dtype, key.dtype, value.dtype, mod.out_proj.weight.dtype}) != 1:
        return None
    b = 0 if mod.batch_first else 1
    batch, length, source = query.shape[b], query.shape[1 - b], key.shape[1 - b]
    if (query.shape[2], key.shape[2], value.shape[2]) != (mod.embed_dim, mod.kdim, mod.vdim) or key.shape[:2] != value.shape[:2] \
            or key.shape[b] != batch:
        return None
    out = _empty((length, batch, mod.embed_dim), query.dtype)
    out = out.transpose(0, 1) if mod.batch_first else out
    if not call.get("need_weights", True):
        return out, None
    if call.get("average_attn_weights", True):
        return out, _empty((batch, length, source), query.dtype)
    return out, _empty((batch, mod.num_heads, length, source), query.dtype)


_WINDOW_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
                "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def _ints(value: Any, count: int, least: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == count and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value)


def window_attention(inner_is_width: bool) -> ShapeRule:
    """Swin's ``shifted_window_attention(input, qkv_weight, proj_weight, ...)``: ``(N, H, W, C)``
    -> ``(N, H, W, proj_weight.shape[0])``, contiguous (the windows are padded, attended and
    cropped back). Swin v1 calls only (no ``logit_scale``), with every tensor a meta tensor of
    the input's dtype and sizes that fit: ``qkv_weight`` ``(3 * inner, C)`` with ``inner`` a
    multiple of ``num_heads``, ``proj_weight`` ``(out, inner)``, a relative position bias
    broadcasting to ``(1, heads, tokens, tokens)``. ``inner_is_width``: torchvision's function,
    which reshapes the attention and the projection's outputs to ``C`` channels, so ``inner``
    and ``out`` must be ``C`` (``prunefx.nn.shifted_window_attention`` takes any sizes)."""

    def rule(op: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        call = dict(zip(_WINDOW_ARGS, args, strict=False))
        if len(args) > len(_WINDOW_ARGS) or set(kwargs) - set(_WINDOW_ARGS) or set(call) & set(kwargs):
            return None
        call.update(kwargs)
        x, qkv, proj, bias = (call.get(k) for k in ("input", "qkv_weight", "proj_weight", "relative_position_bias"))
        window, heads, shift = call.get("window_size"), call.get("num_heads"), call.get("shift_size")
        if call.get("logit_scale") is not None or not _plain(x) or x.dim() != 4 or 0 in x.shape:
            return None
        tensors = [qkv, proj, bias, *(t for t in (call.get("qkv_bias"), call.get("proj_bias")) if t is not None)]
        if not all(isinstance(t, torch.Tensor) and t.is_meta and t.dtype == x.dtype for t in tensors):
            return None
        if not _ints(window, 2, 1) or not _ints(shift, 2, 0) or not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            return None
        width = x.shape[-1]
        if qkv.dim() != 2 or proj.dim() != 2 or qkv.shape[1] != width or qkv.shape[0] % (3 * heads):
            return None
        inner = qkv.shape[0] // 3
        if proj.shape[1] != inner or (inner_is_width and (inner != width or proj.shape[0] != width)):
            return None
        qkv_bias, proj_bias = call.get("qkv_bias"), call.get("proj_bias")
        if (qkv_bias is not None and tuple(qkv_bias.shape) != (3 * inner,)) or (
                proj_bias is not None and tuple(proj_bias.shape) != (proj.shape[0],)):
            return None
        tokens = window[0] * window[1]
        try:
            if torch.broadcast_shapes(bias.shape, (1, heads, tokens, tokens)) != (1, heads, tokens, tokens):
                return None
        except RuntimeError:
            return None
        return _empty((*x.shape[:3], proj.shape[0]), x.dtype)

    return rule

