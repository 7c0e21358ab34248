"""Cost of a model on given inputs: FLOPs (``torch.utils.flop_counter``) and parameters.

Runs on meta tensors (the model's parameters are swapped for meta copies for the duration
of the call), so counting FLOPs of a large model costs no arithmetic and no memory. A
traceable model runs through the same interpreter as shape propagation, which skips
shape-preserving modules (FlopCounterMode counts no FLOPs for them).

``flop_counter()`` is the ``FlopCounterMode`` every count in prunefx uses (this module, the
inspector, ``prunefx.masks`` cost measurements): torch's formulas plus the grouped matmul of a
mixture of experts (``aten._grouped_mm``, transformers' ``grouped_mm_fallback``), which torch
has no formula for: ``2 * S * K * N`` for ``S`` rows of ``K`` channels and ``N`` outputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode

from prunefx.shapes import _MetaShapeProp, _to_meta

__all__ = ["count_flops", "count_params", "flop_counter"]


def _grouped_mm_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Each of the S rows of ``x`` (S, K) meets one expert's (K, N) matrix."""
    return 2 * int(x_shape[0]) * int(x_shape[1]) * int(w_shape[-1])


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts grouped matmuls."""
    extra: dict[Any, Any] = {}
    for namespace, name in (("aten", "_grouped_mm"), ("transformers", "grouped_mm_fallback")):
        packet = getattr(getattr(torch.ops, namespace, None), name, None) if hasattr(torch.ops, namespace) else None
        if packet is not None:
            extra[packet] = _grouped_mm_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs of ``model(*example_inputs)`` as counted by FlopCounterMode."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:  # norms and activations add no FLOPs in FlopCounterMode: skip their meta kernels
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        run = _MetaShapeProp(gm).propagate
    except Exception:  # not traceable: run the module itself on meta tensors
        gm, run = model, model
    # the module that runs (a traced graph holds only the modules its mode uses)
    meta = {n: torch.empty_like(t, device="meta") for n, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False))}
    with _reparametrize_module(gm, meta), torch.no_grad(), flop_counter() as counter:
        run(*_to_meta(inputs))
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
