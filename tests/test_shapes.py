"""Shape formulas (``prunefx.shape_rules``, attached to op records as ``OpSpec.shape``) give
what the op's own meta kernel gives: shape, strides and dtype of every output; anything
unusual returns None, so the kernel runs and its own error names what is wrong. And shape
propagation with the formulas records the same tensor metadata as without them."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunefx
from prunefx import shape_rules as sr
from prunefx import shapes

aten = torch.ops.aten


def _layout(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.stride(), out.dtype, out.device.type)
    if isinstance(out, tuple):
        return tuple(_layout(o) for o in out)
    return out


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _run(op: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(op, str):  # a Tensor method
        return getattr(args[0], op)(*args[1:], **kwargs)
    with torch.no_grad():
        return op(*args, **kwargs)


def _same_as_kernel(rule: Any, op: Any, args: tuple, kwargs: dict | None = None) -> None:
    kwargs = kwargs or {}
    out = rule(op, args, kwargs)
    assert out is not None, "the rule handles this call"
    assert _layout(out) == _layout(_run(op, args, kwargs))


x4, c4 = _meta(2, 8, 5, 5), _meta(1, 8, 1, 1)
ELEMENTWISE = {
    "add broadcast": (operator.add, (x4, c4), {}),
    "mul scalar right": (operator.mul, (x4, 0.5), {}),
    "rsub scalar left": (operator.sub, (1, x4), {}),
    "truediv int": (operator.truediv, (x4, 3), {}),
    "torch.add alpha": (torch.add, (x4, c4), {"alpha": 2}),
    "div rounding": (torch.div, (x4, c4), {"rounding_mode": "floor"}),
    "0-dim tensor": (operator.mul, (x4, _meta()), {}),
    "size-1 middle dims": (operator.add, (_meta(3, 1, 4), _meta(1, 5, 1)), {}),
    "half": (operator.add, (_meta(2, 3, dtype=torch.float16), _meta(3, dtype=torch.float16)), {}),
    "F.relu": (F.relu, (x4,), {}),
    "F.gelu tanh": (F.gelu, (x4,), {"approximate": "tanh"}),
    "F.leaky_relu": (F.leaky_relu, (x4, 0.2), {}),
    "F.hardtanh": (F.hardtanh, (x4,), {"min_val": -2.0, "max_val": 2.0}),
    "torch.sigmoid": (torch.sigmoid, (x4,), {}),
    "method add": ("add", (x4, c4), {}),
    "method sigmoid": ("sigmoid", (x4,), {}),
    "aten.add": (aten.add.Tensor, (x4, c4), {"alpha": 1}),
    "aten.gelu": (aten.gelu.default, (x4,), {}),
    "aten.neg": (aten.neg.default, (x4,), {}),
    "nn.SiLU": (nn.SiLU(), (x4,), {}),
    "nn.Hardswish": (nn.Hardswish(), (x4,), {}),
    "nn.Softplus": (nn.Softplus(beta=2.0), (x4,), {}),
}


@pytest.mark.parametrize("op, args, kwargs", ELEMENTWISE.values(), ids=ELEMENTWISE.keys())
def test_elementwise(op: Any, args: tuple, kwargs: dict) -> None:
    _same_as_kernel(sr.elementwise, op, args, kwargs)


cl = _meta(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
ELEMENTWISE_REFUSED = {
    "channels last": (operator.add, (cl, cl), {}),
    "strided view": (F.relu, (x4.transpose(2, 3),), {}),
    "mixed dtypes": (operator.add, (x4, _meta(1, 8, 1, 1, dtype=torch.float64)), {}),
    "integer tensor": (operator.add, (_meta(2, 3, dtype=torch.int64), 1), {}),
    "bool operand": (operator.mul, (x4, True), {}),
    "in place by name": (torch.relu_, (x4,), {}),
    "in place by keyword": (F.relu, (x4,), {"inplace": True}),
    "in place module": (nn.ReLU(inplace=True), (x4,), {}),
    "in place aten": (aten.relu_.default, (x4,), {}),
    "in place method": ("add_", (x4, c4), {}),
    "sizes that do not broadcast": (operator.add, (x4, _meta(3)), {}),
    "real tensor": (operator.add, (x4, torch.ones(1)), {}),
    "device argument": (torch.add, (x4, c4), {"device": torch.device("meta")}),
    "out argument": (torch.add, (x4, c4), {"out": _meta(2, 8, 5, 5)}),
}


@pytest.mark.parametrize("op, args, kwargs", ELEMENTWISE_REFUSED.values(), ids=ELEMENTWISE_REFUSED.keys())
def test_elementwise_refuses(op: Any, args: tuple, kwargs: dict) -> None:
    assert sr.elementwise(op, args, kwargs) is None


POOLS = {
    "module 2d to 1": (nn.AdaptiveAvgPool2d(1), (x4,), {}),
    "module 2d keeps one dim": (nn.AdaptiveAvgPool2d((None, 2)), (x4,), {}),
    "module 1d unbatched": (nn.AdaptiveAvgPool1d(3), (_meta(8, 10),), {}),
    "module 3d": (nn.AdaptiveAvgPool3d((1, 2, 3)), (_meta(1, 4, 5, 6, 7),), {}),
    "F 2d": (F.adaptive_avg_pool2d, (x4, (2, 3)), {}),
    "F 2d by keyword": (F.adaptive_avg_pool2d, (x4,), {"output_size": 1}),
}


@pytest.mark.parametrize("op, args, kwargs", POOLS.values(), ids=POOLS.keys())
def test_adaptive_avg_pool(op: Any, args: tuple, kwargs: dict) -> None:
    _same_as_kernel(sr.adaptive_avg_pool, op, args, kwargs)


def test_adaptive_avg_pool_refuses() -> None:
    assert sr.adaptive_avg_pool(nn.AdaptiveAvgPool2d(1), (cl,), {}) is None, "channels last"
    assert sr.adaptive_avg_pool(nn.AdaptiveAvgPool2d(1), (_meta(2, 3),), {}) is None, "too few dims: the kernel's error"
    assert sr.adaptive_avg_pool(F.adaptive_avg_pool2d, (x4, (1, 2, 3)), {}) is None
    assert sr.adaptive_avg_pool(aten.adaptive_avg_pool2d.default, (x4, [1, 1]), {}) is None


CONVS = {
    "2d": (nn.Conv2d(8, 16, 3), (2, 8, 9, 9)),
    "2d stride padding dilation": (nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), (2, 8, 11, 12)),
    "2d groups": (nn.Conv2d(8, 16, 3, groups=4, padding=1), (1, 8, 7, 7)),
    "2d same": (nn.Conv2d(8, 16, (3, 5), padding="same"), (1, 8, 7, 9)),
    "2d valid": (nn.Conv2d(8, 16, 3, padding="valid"), (1, 8, 7, 9)),
    "2d circular": (nn.Conv2d(8, 16, 3, padding=1, padding_mode="circular"), (1, 8, 6, 6)),
    "2d unbatched": (nn.Conv2d(8, 16, 3), (8, 9, 9)),
    "1d": (nn.Conv1d(4, 6, 5, stride=3), (2, 4, 20)),
    "3d": (nn.Conv3d(4, 6, 3, padding=(0, 1, 2)), (1, 4, 5, 6, 7)),
}


@pytest.mark.parametrize("mod, shape", CONVS.values(), ids=CONVS.keys())
def test_conv(mod: nn.Module, shape: tuple) -> None:
    mod = mod.to("meta")
    _same_as_kernel(sr.conv_module, mod, (_meta(*shape),))


def test_conv_refuses() -> None:
    conv = nn.Conv2d(8, 16, 3, device="meta")
    assert sr.conv_module(conv, (_meta(1, 4, 9, 9),), {}) is None, "wrong channels: the kernel's own error"
    assert sr.conv_module(conv, (_meta(1, 8, 2, 2),), {}) is None, "input smaller than the kernel"
    assert sr.conv_module(conv, (_meta(1, 8, 9, 9).contiguous(memory_format=torch.channels_last),), {}) is None
    assert sr.conv_module(nn.ConvTranspose2d(8, 4, 3, device="meta"), (_meta(1, 8, 9, 9),), {}) is None
    for k in (3, 1):  # a 1x1 channels-last weight passes is_contiguous()
        weight_cl = nn.Conv2d(8, 16, k, device="meta").to(memory_format=torch.channels_last)
        assert sr.conv_module(weight_cl, (_meta(1, 8, 9, 9),), {}) is None, "a channels-last weight decides the output layout"


LINEAR_INPUTS = {
    "1-d": lambda: _meta(16),
    "2-d": lambda: _meta(4, 16),
    "3-d": lambda: _meta(2, 5, 16),
    "4-d permuted": lambda: _meta(2, 16, 3, 5).permute(0, 2, 3, 1),
    "3-d transposed": lambda: _meta(5, 2, 16).transpose(0, 1),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("make", LINEAR_INPUTS.values(), ids=LINEAR_INPUTS.keys())
def test_linear(make: Any, bias: bool) -> None:
    _same_as_kernel(sr.linear_module, nn.Linear(16, 24, bias=bias, device="meta"), (make(),))


ATTENTION_CALLS = {
    "self, batch first, no weights": (True, {}, {"need_weights": False}),
    "self, sequence first, averaged weights": (False, {}, {}),
    "self, per-head weights": (True, {}, {"average_attn_weights": False}),
    "cross, kdim/vdim": (True, {"kdim": 12, "vdim": 20}, {}),
}


@pytest.mark.parametrize("batch_first, extra, call", ATTENTION_CALLS.values(), ids=ATTENTION_CALLS.keys())
def test_attention(batch_first: bool, extra: dict, call: dict) -> None:
    mod = nn.MultiheadAttention(32, 4, batch_first=batch_first, device="meta", **extra).eval()
    length, source, batch = 7, 9, 2
    order = (lambda n, b: (b, n)) if batch_first else (lambda n, b: (n, b))
    q = _meta(*order(length, batch), 32)
    k = _meta(*order(source, batch), extra.get("kdim", 32)) if extra else q
    v = _meta(*order(source, batch), extra.get("vdim", 32)) if extra else q
    _same_as_kernel(sr.attention_module, mod, (q, k, v), call)


def test_unusual_calls_run_the_module() -> None:
    lin = nn.Linear(16, 24, device="meta")
    assert sr.linear_module(lin, (_meta(4, 8),), {}) is None, "wrong width: the module's own error"
    assert sr.linear_module(lin, (_meta(4, 16, dtype=torch.float16),), {}) is None

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).sum(-1)

    assert sr.linear_module(Scaled(16, 24, device="meta"), (_meta(4, 16),), {}) is None, "its own forward"
    mha = nn.MultiheadAttention(32, 4, batch_first=True, device="meta")
    q = _meta(2, 7, 32)
    assert sr.attention_module(mha, (q, q, q), {"attn_mask": _meta(7, 7)}) is None
    assert sr.attention_module(mha, (q, q, q), {"key_padding_mask": _meta(2, 7, dtype=torch.bool)}) is None
    assert sr.attention_module(mha, (q, q, q), {"is_causal": True, "attn_mask": _meta(7, 7)}) is None
    assert sr.attention_module(mha, (q, _meta(3, 7, 32), _meta(3, 7, 32)), {}) is None, "batch sizes differ"
    assert sr.attention_module(mha, (_meta(7, 32),) * 3, {}) is None, "unbatched"


def _window_call(width: int = 16, inner: int | None = None, out: int | None = None, size: tuple[int, int] = (8, 8), *,
                 bias: bool = True, shift: tuple[int, int] = (2, 2), dtype: torch.dtype = torch.float32) -> tuple:
    inner, out = width if inner is None else inner, width if out is None else out
    heads, window = 4, [4, 4]
    return (_meta(2, *size, width, dtype=dtype), _meta(3 * inner, width, dtype=dtype), _meta(out, inner, dtype=dtype),
            _meta(1, heads, 16, 16, dtype=dtype), window, heads, list(shift), 0.0, 0.0,
            _meta(3 * inner, dtype=dtype) if bias else None, _meta(out, dtype=dtype) if bias else None)


WINDOWS = {
    "torchvision, shifted": (torchvision.models.swin_transformer.shifted_window_attention, _window_call(), True),
    "torchvision, not shifted, no biases": (
        torchvision.models.swin_transformer.shifted_window_attention, _window_call(bias=False, shift=(0, 0)), True),
    "torchvision, padded windows": (torchvision.models.swin_transformer.shifted_window_attention, _window_call(size=(6, 9)), True),
    "torchvision, window larger than the map": (
        torchvision.models.swin_transformer.shifted_window_attention, _window_call(size=(3, 2)), True),
    "prunefx, pruned heads and output": (prunefx.nn.shifted_window_attention, _window_call(inner=8, out=12), False),
    "prunefx, half": (prunefx.nn.shifted_window_attention, _window_call(inner=8, dtype=torch.float16), False),
}


@pytest.mark.parametrize("op, args, inner_is_width", WINDOWS.values(), ids=WINDOWS.keys())
def test_window_attention(op: Any, args: tuple, inner_is_width: bool) -> None:
    _same_as_kernel(sr.window_attention(inner_is_width), op, args)


def test_window_attention_refuses() -> None:
    tv = sr.window_attention(inner_is_width=True)
    fn = torchvision.models.swin_transformer.shifted_window_attention
    call = _window_call()
    assert tv(fn, _window_call(inner=8), {}) is None, "torchvision reshapes the attention to the input width"
    assert tv(fn, _window_call(out=12), {}) is None, "and the projection's output too"
    assert tv(fn, call[:11] + (_meta(4, 1, 1),), {}) is None, "Swin v2's logit scale"
    assert tv(fn, (call[0].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), *call[1:]), {}) is None, "strided input"
    assert tv(fn, (call[0], _meta(48, 12), *call[2:]), {}) is None, "qkv weight of another width"
    assert tv(fn, (*call[:3], _meta(1, 4, 9, 9), *call[4:]), {}) is None, "bias of another window"
    assert tv(fn, (*call[:5], 5, *call[6:]), {}) is None, "heads that do not divide the width"
    assert tv(fn, (*call[:9], _meta(47), call[10]), {}) is None, "qkv bias of another size"
    assert tv(fn, (call[0], call[1].to(torch.float64), *call[2:]), {}) is None, "mixed dtypes"
    assert tv(fn, call, {"window_size": [4, 4]}) is None, "an argument twice"


def _metadata(graph: prunefx.PruneGraph) -> list[str]:
    return [repr(n.meta.get("tensor_meta")) for gm in graph.traced.graphs for n in gm.graph.nodes]


MODELS = {
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "resnet18 channels-last": lambda: torchvision.models.resnet18().to(memory_format=torch.channels_last),
    "vit": lambda: torchvision.models.VisionTransformer(64, 16, 2, 4, 64, 96),
    "swin_t": lambda: torchvision.models.swin_t(),
}


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_propagation_records_what_the_kernels_give(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make().eval()
    x = torch.randn(1, 3, 64, 64)
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    with_rules = _metadata(prunefx.trace(model, x))
    monkeypatch.setattr(shapes, "_ShapesOnly", shapes._MetaShapeProp)  # every op runs its kernel
    assert with_rules == _metadata(prunefx.trace(model, x))


KEEPS_SHAPE_MODULES = {  # an instance of each abstract or argument-taking class that a record says keeps shape
    nn.modules.batchnorm._NormBase: lambda: nn.BatchNorm2d(8),
    nn.GroupNorm: lambda: nn.GroupNorm(2, 8),
    nn.LayerNorm: lambda: nn.LayerNorm(5),
    nn.LocalResponseNorm: lambda: nn.LocalResponseNorm(2),
    nn.Threshold: lambda: nn.Threshold(0.1, 0.0),
}
KEEPS_SHAPE_INPUTS = {nn.Dropout1d: (2, 8, 5), nn.Dropout3d: (2, 8, 5, 5, 5)}  # the rest take (2, 8, 5, 5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("training", [False, True])
def test_modules_said_to_keep_shape_do(memory_format: torch.memory_format, training: bool) -> None:
    """The meta interpreters do not run a module whose record says ``keeps_shape``: they take
    a tensor like its input. Every such module's own meta kernel must agree on shape and
    dtype, and on strides for a contiguous input (for a channels-last one kernels differ:
    GroupNorm keeps them on the CPU but not on meta, LayerNorm and InstanceNorm drop them;
    the copy keeps them)."""
    from prunefx import ops

    checked = []
    for spec in ops.table().specs:
        if not spec.keeps_shape:
            continue
        for cls in spec.modules:
            mod = KEEPS_SHAPE_MODULES.get(cls, cls)().to("meta").train(training)
            x = _meta(*KEEPS_SHAPE_INPUTS.get(cls, (2, 8, 5, 5)))
            if x.dim() == 4:  # channels-last is a 4-d layout
                x = x.contiguous(memory_format=memory_format)
            like, out = _layout(shapes._like(x)), _layout(_run(mod, (x,), {}))
            if memory_format == torch.channels_last:
                like, out = (like[0], like[2]), (out[0], out[2])
            assert like == out, cls.__name__
            checked.append(cls)
    assert {nn.modules.batchnorm._NormBase, nn.ReLU, nn.Dropout1d, nn.Dropout3d} <= set(checked)
