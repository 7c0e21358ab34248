"""ONNX translations the dynamo exporter gets from prunefx instead of onnxscript's torch_lib,
where torch_lib's does not compute what PyTorch computes.

``aten.scaled_dot_product_attention`` with a boolean mask, below opset 23. PyTorch's
attention gives a query whose mask row allows no key at all an output of zeros (a "safe"
softmax); torch_lib fills masked scores with the dtype's lowest value, so such a row attends
uniformly to every key. Transformers models make such rows at every left-padded position of
a causal LM (the padded query sees no unpadded key before it), so the file would not verify
on a padded batch. The rule applied on top of torch_lib's translation:

    out = sdpa(q, k, v, mask) * max_j mask[..., i, j]      (a row with no allowed key -> 0)

Opset 23 has the ONNX ``Attention`` op, which torch translates itself; nothing is replaced there.
"""

# No ``from __future__ import annotations``: onnxscript reads the translation's annotations as
# objects to tell inputs from attributes.
import logging
from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []

log = logging.getLogger(__name__)

_ATTENTION_OPSET = 23  # ONNX Attention; torch's own translation from here on


def _custom_translations(opset: int) -> dict[Any, Callable[..., Any]]:
    """The translation table for ``torch.onnx.export(dynamo=True, custom_translation_table=...)``;
    empty when onnxscript's internals are not where this onnxscript version had them (the
    verification then judges torch_lib's own translation)."""
    if opset >= _ATTENTION_OPSET:
        return {}
    try:
        sdpa = _safe_sdpa()
    except (ImportError, AttributeError) as exc:
        log.info("prunefx.export_onnx: onnxscript's attention translation is used as is (%s)", exc)
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa}


def _safe_sdpa() -> Callable[..., Any]:
    from typing import Optional

    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import nn as torch_lib_nn
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
    from onnxscript.onnx_types import TensorType

    attention = torch_lib_nn.aten_scaled_dot_product_attention

    # The annotations are the op's ONNX signature (inputs vs attributes), as torch_lib writes them.
    def aten_scaled_dot_product_attention(
        query: TFloat,
        key: TFloat,
        value: TFloat,
        attn_mask: Optional[TensorType] = None,  # noqa: UP045 - onnxscript reads typing.Optional
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Optional[float] = None,  # noqa: UP045
        enable_gqa: bool = False,
    ) -> TFloat:
        out = attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if attn_mask is None or attn_mask.dtype != ir.DataType.BOOL:
            return out
        allowed = op.ReduceMax(op.Cast(attn_mask, to=query.dtype), op.Constant(value_ints=[-1]), keepdims=1)
        return op.Mul(out, allowed)

    return aten_scaled_dot_product_attention
