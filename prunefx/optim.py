"""Optimizer follow-up for ``reconfigure(..., optimizer=opt)``.

Every parameter of the traced model is replaced by its sliced copy in ``opt.param_groups``
(per-group hyper-parameters untouched), and every per-parameter state tensor shaped like its
parameter (SGD momentum, Adam moments, RMSprop square averages, ...) is sliced with the same
indices; other state (Adam's ``step``) is kept. Everything is computed before anything is
assigned, so a failure leaves the optimizer as it was. The optimizer object stays the same,
so learning-rate schedulers and GradScaler keep working.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from prunefx.passes.base import RewriteState
from prunefx.passes.slice_tensors import slice_tensor

__all__ = ["repoint_optimizer"]


def repoint_optimizer(optimizer: torch.optim.Optimizer, state: RewriteState) -> None:
    index = state.plan.index
    mapping: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor] | None]] = {}
    for name, p in state.source_tensors().items():
        if isinstance(p, torch.nn.Parameter):
            mapping[id(p)] = (state.tensors[name], index.get(name))

    new_groups = [[mapping[id(p)][0] if id(p) in mapping else p for p in g["params"]] for g in optimizer.param_groups]
    new_state: dict[Any, Any] = defaultdict(dict)
    for p, st in optimizer.state.items():
        if id(p) not in mapping:
            new_state[p] = st
            continue
        new_p, idx = mapping[id(p)]
        new_state[new_p] = {
            k: (slice_tensor(v, idx) if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0 else v)
            for k, v in st.items()
        }
    for g, params in zip(optimizer.param_groups, new_groups, strict=True):
        g["params"] = params
    optimizer.state = new_state
