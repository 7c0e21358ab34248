"""RecordLayout: remember, on the result, which channels of the *original* model it keeps.

For every parameter/buffer, ``kept[dim]`` lists the indices of the original tensor's
``dim`` that survive. Reconfiguring an already reconfigured model composes them:

    kept_new[d] = kept_old[d][index_this_round[d]]

The record (``prunefx.provenance.LAYOUT_ATTR`` on the GraphModule, a plain attribute, not
state) is what ``prunefx.state_dict`` saves so a fresh process can rebuild the model from the
original architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prunefx.passes.base import Pass, RewriteState
from prunefx.provenance import LAYOUT_ATTR

__all__ = ["RecordLayout"]


@dataclass(frozen=True)
class RecordLayout(Pass):
    def run(self, state: RewriteState) -> None:
        assert state.result is not None
        origin: dict[str, Any] = state.origin or {}
        old = origin.get("tensors", {})
        tensors: dict[str, Any] = {}
        for name, t in state.source_tensors().items():
            prev = old.get(name, {"shape": list(t.shape), "kept": {}})
            kept = dict(prev["kept"])
            for dim, idx in state.plan.index.get(name, {}).items():
                base = kept.get(dim)
                kept[dim] = base[idx] if base is not None else idx.clone()
            tensors[name] = {"shape": list(prev["shape"]), "kept": kept}
        inputs = origin.get("inputs") or [
            {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for x in state.inputs if isinstance(x, torch.Tensor)
        ]
        # carried over: e.g. "branches" (PruneTrain); not "emit", which this reconfiguration sets anew
        extra = {k: v for k, v in origin.items() if k not in ("version", "inputs", "tensors", "emit")}
        setattr(state.result, LAYOUT_ATTR, {**extra, "version": 1, "inputs": inputs, "tensors": tensors})
