"""Optimizer follow-up for ``reconfigure(..., optimizer=opt)``.

Every parameter of the traced model is replaced by its sliced copy in ``opt.param_groups``
(per-group hyper-parameters untouched), and every per-parameter state tensor is sliced with
the parameter's kept indices, dim by dim:

    state dim d == parameter dim d   -> sliced like the parameter (SGD momentum, Adam moments,
                                        RMSprop square averages, ...)
    state dim d == 1 < parameter's   -> kept: a statistic reduced over that dim (Adafactor's
                                        factored ``row_var`` (..., R, 1) and ``col_var``
                                        (..., 1, C) keep the estimate of the remaining rows or
                                        columns; its normalisation is scale-free)
    a 0-dim tensor or a non-tensor   -> kept (Adam's ``step``)

A state tensor of any other shape along a pruned dim (a flattened buffer, a preconditioner
matrix) cannot follow the channels: ``ReconfigureError`` names the parameter and the state
key. So does an optimizer that holds none of the model's parameters (built for another
model instance). Everything is computed before anything is assigned, so a failure leaves the
optimizer as it was. The optimizer object stays the same, so learning-rate schedulers and
GradScaler keep working.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from prunefx.errors import ReconfigureError
from prunefx.passes.base import RewriteState
from prunefx.passes.slice_tensors import slice_tensor

__all__ = ["repoint_optimizer"]


def repoint_optimizer(optimizer: torch.optim.Optimizer, state: RewriteState) -> None:
    index = state.plan.index
    mapping: dict[int, tuple[str, torch.Tensor, dict[int, torch.Tensor] | None]] = {}
    for name, p in state.source_tensors().items():
        if isinstance(p, torch.nn.Parameter):
            mapping[id(p)] = (name, state.tensors[name], index.get(name))
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if held and mapping and not any(id(p) in mapping for p in held):
        raise ReconfigureError(
            f"optimizer {type(optimizer).__name__} holds none of the reconfigured model's parameters (it was built for "
            "another model instance, or graph= was traced from one): pass the optimizer of this model"
        )

    new_groups = [[mapping[id(p)][1] if id(p) in mapping else p for p in g["params"]] for g in optimizer.param_groups]
    new_state: dict[Any, Any] = defaultdict(dict)
    for p, st in optimizer.state.items():
        if id(p) not in mapping:
            new_state[p] = st
            continue
        name, new_p, idx = mapping[id(p)]
        new_state[new_p] = {k: _slice_state(optimizer, name, p, k, v, idx) for k, v in st.items()}
    for g, params in zip(optimizer.param_groups, new_groups, strict=True):
        g["params"] = params
    optimizer.state = new_state


def _slice_state(optimizer: torch.optim.Optimizer, name: str, p: torch.Tensor, key: str, v: Any, idx: dict[int, torch.Tensor] | None) -> Any:
    """``v`` (the state ``key`` of parameter ``name``) with the parameter's kept indices."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    if v.shape == p.shape:
        return slice_tensor(v, idx)
    if not idx:
        return v
    if v.dim() == p.dim() and all(v.shape[d] in (p.shape[d], 1) for d in idx):
        return slice_tensor(v, {d: i for d, i in idx.items() if v.shape[d] == p.shape[d]})
    raise ReconfigureError(
        f"{type(optimizer).__name__} state '{key}' of parameter '{name}' has shape {list(v.shape)}, which does not follow "
        f"the parameter's {list(p.shape)} along the pruned dim(s) {sorted(idx)}: prunefx cannot slice it; reconfigure "
        "without optimizer= and build a new optimizer for the result"
    )
