"""Shape formulas (``prunefx.shapes._closed_form``) give what the module's own meta run
gives: shape, strides and dtype, for every output; anything unusual runs the module."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from prunefx.shapes import _closed_form


def _layout(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.stride(), out.dtype, out.device.type)
    if isinstance(out, tuple):
        return tuple(_layout(o) for o in out)
    return out


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


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
    mod = nn.Linear(16, 24, bias=bias, device="meta")
    x = make()
    out = _closed_form(mod, x, (x,), {})
    assert out is not None
    assert _layout(out) == _layout(mod(x))


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
    out = _closed_form(mod, q, (q, k, v), call)
    assert out is not None
    with torch.no_grad():
        assert _layout(out) == _layout(mod(q, k, v, **call))


def test_unusual_calls_run_the_module() -> None:
    lin = nn.Linear(16, 24, device="meta")
    assert _closed_form(lin, _meta(4, 8), (_meta(4, 8),), {}) is None, "wrong width: the module's own error"
    assert _closed_form(lin, _meta(4, 16, dtype=torch.float16), (_meta(4, 16, dtype=torch.float16),), {}) is None
    mha = nn.MultiheadAttention(32, 4, batch_first=True, device="meta")
    q = _meta(2, 7, 32)
    assert _closed_form(mha, q, (q, q, q), {"attn_mask": _meta(7, 7)}) is None
    assert _closed_form(mha, q, (q, q, q), {"key_padding_mask": _meta(2, 7, dtype=torch.bool)}) is None
    assert _closed_form(mha, q, (q, q, q), {"is_causal": True, "attn_mask": _meta(7, 7)}) is None
    assert _closed_form(mha, q, (q, _meta(3, 7, 32), _meta(3, 7, 32)), {}) is None, "batch sizes differ"
    assert _closed_form(mha, _meta(7, 32), (_meta(7, 32),) * 3, {}) is None, "unbatched"
    assert _closed_form(nn.Conv2d(3, 8, 3, device="meta"), _meta(1, 3, 8, 8), (_meta(1, 3, 8, 8),), {}) is None
